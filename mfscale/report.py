"""What a training run reports: its curves as it trains (:class:`Window`) and, at the end, ``metrics.json``,
the final TensorBoard scalars and hparams, and the movie embeddings in TensorBoard's projector.

Rank 0 writes; the sums behind every number are taken over all ranks.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import polars as pl
import torch
from tqdm import tqdm

from . import distributed
from .config import JobConfig
from .distributed import DistEnv
from .evaluate import evaluate, ranking_metrics
from .layout import TableLayout
from .model import capped
from .monitor import Monitor
from .optim import Optimizers
from .shards import TRAIN_ROW_BYTES, write_json_atomic

log = logging.getLogger("mfscale")


class Window:
    """The training loss, ratings, time and data wait between two log points, then logged (TensorBoard, bar)."""

    def __init__(self, env: DistEnv):
        self.env = env
        self._reset()

    def _reset(self) -> None:
        self.sse = torch.zeros((), dtype=torch.float64, device=self.env.device)
        self.rows, self.steps, self.wait, self.t0 = 0, 0, 0.0, time.perf_counter()

    def add(self, sse: torch.Tensor, global_rows: int, wait: float) -> None:
        self.sse += sse
        self.rows += global_rows  # summed per step: already the count over all ranks
        self.wait += wait
        self.steps += 1

    def log(self, step: int, optims: Optimizers, monitor: Monitor, bar: tqdm) -> tuple[float, int]:
        """Log the window at global ``step`` and start a new one; returns its (seconds, ratings)."""
        distributed.synchronize(self.env)
        elapsed = time.perf_counter() - self.t0
        sse = float(distributed.all_reduce_sum(self.env, self.sse.clone()))
        rows = max(self.rows, 1)
        mse = sse / rows
        rate = rows / max(elapsed, 1e-9)
        lr_users, lr_movies, lr_dense = optims.lrs
        monitor.scalars(step, {
            "train/loss": mse, "train/rmse": math.sqrt(mse), "throughput/ratings_per_s": rate,
            "time/step_ms": 1000 * elapsed / self.steps, "time/data_wait_pct": 100 * self.wait / max(elapsed, 1e-9),
            "lr/sparse": lr_users, "lr/sparse_movies": lr_movies, "lr/dense": lr_dense,
        })
        bar.set_postfix(loss=f"{mse:.4f}", ratings_per_s=f"{rate / 1e6:.2f}M")
        out = (elapsed, rows)
        self._reset()
        return out


def peak_rss_per_rank(env: DistEnv) -> list[float]:
    """Each rank's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return distributed.gather(env, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _fmt(v: object, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


def final(cfg: JobConfig, env: DistEnv, layout: TableLayout, monitor: Monitor, run: dict[str, Any], *,
          test: bool = True) -> dict[str, Any]:
    """Test and ranking metrics of the layout's (best) tables, with ``run``'s numbers (progress, throughput),
    into ``metrics.json``, TensorBoard and the projector; returns the metrics. ``test`` False: the test split is
    not read (its metrics are None)."""
    data = layout.data
    tables = layout.eval_tables()  # once for all three uses (under blocks an all_gather of movies)
    scored = evaluate(layout, "test", batch_size=cfg.train.eval_batch_size, tables=tables) if test else None
    ranking = (ranking_metrics(layout, "test", k=cfg.train.ranking_k, tables=tables)
               if cfg.train.ranking_k and test else None)
    test = scored
    metrics = {
        "test_rmse": test["rmse"] if test else None,
        "test_mae": test["mae"] if test else None,
        "test_count": test["count"] if test else 0,
        **run,
        "world_size": env.world_size,
        "tables": layout.name,
        "table_bytes_sent": layout.bytes_sent,  # by rank 0, in this process, for the tables
        "peak_rss_mib_per_rank": peak_rss_per_rank(env),
        "decoded_bytes_per_rank": distributed.gather(env, layout.decoded_bytes),  # of the training split, at start-up
        "train_split_decode_bytes": data.split_rows("train") * TRAIN_ROW_BYTES,  # the whole split, decoded
        "collectives_by_kind": dict(env.collectives),  # rank 0's, the whole job so far
        "batch_size": layout.batch_size,
        "device": str(env.device),
        **(ranking or {}),
    }
    synthetic = data.manifest["source"].get("params") or {}
    if "best_rmse" in synthetic and test:
        metrics["synthetic_best_rmse"] = synthetic["best_rmse"]
        metrics["test_rmse_over_best"] = test["rmse"] / synthetic["best_rmse"]
    if env.is_main:
        write_json_atomic(Path(cfg.run_dir) / "metrics.json", metrics)
        step = metrics["steps"]
        # The test and ranking metrics are scalars of the hparams record (``~final/test_rmse``, ...), the last
        # group of TensorBoard's Time Series view: as ``test/*`` they were one-point cards above the curves.
        monitor.hparams(cfg.to_dict(), {f"hparam/{k}": v for k, v in metrics.items()
                                        if isinstance(v, int | float) and v is not None})
        _projector(cfg, layout, monitor, tables[1], step)
    log.info("done: test rmse %s, best val rmse %s, %s ratings/s", _fmt(metrics["test_rmse"]),
             _fmt(metrics["best_val_rmse"]), _fmt(metrics["train_ratings_per_s"], ",.0f"))
    return metrics


def _projector(cfg: JobConfig, layout: TableLayout, monitor: Monitor, movie_table: torch.Tensor, step: int) -> None:
    """Movie embeddings with title/year/genres labels (the most-rated movies, to keep it light)."""
    movies = pl.read_parquet(layout.data.root / "movies.parquet")
    top = movies.sort("n_train", descending=True).head(10_000)
    idx = torch.tensor(top["item_idx"].to_list(), dtype=torch.long)
    q = capped(movie_table, cfg.model.max_norm)[:, : cfg.model.dim]  # as predictions see them (max_norm)
    labels = [{"title": r["title"] or f"movie {r['movie_id']}", "year": r["year"], "genres": r["genres"],
               "movie_id": r["movie_id"], "ratings": r["n_train"]} for r in top.iter_rows(named=True)]
    monitor.embeddings(q.detach()[idx.to(q.device)].cpu(), labels, tag="movies", step=step)

"""RMSE/MAE and ranking metrics against brute-force references, with one rank and with two."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mfscale import config, distributed
from mfscale.distributed import DistEnv
from mfscale.evaluate import evaluate, ranking_metrics
from mfscale.layout import Blocks, Replicated, TableLayout
from mfscale.model import BiasedMF
from mfscale.shards import Dataset

from .conftest import as_rank, free_port, spawn_ranks

CPU = torch.device("cpu")


def layout_of(model: BiasedMF, data: Dataset, env: DistEnv, tables: str = "replicated") -> TableLayout:
    """A layout of the given kind holding ``model``'s weights (what evaluation reads): replicated, or this
    rank's blocks of it."""
    cfg = config.replace(config.JobConfig(), data__path=str(data.root), data__resident="off", model__dim=model.dim,
                         model__init_std=0.0)
    if tables == "replicated":
        lay: TableLayout = Replicated(cfg, env, data, batch_size=1024)
        lay.model.load_state_dict(model.state_dict())
        return lay
    lay = Blocks(cfg, env, data, batch_size=1024)
    users, items = lay.held_ids(lay.position())
    rows = lay.local_rows(lay.position())[1]  # movie pieces sit in slots, maybe with gaps between them
    rows = np.arange(len(items)) if rows is None else rows
    with torch.no_grad():
        lay.model.users.weight.copy_(model.users.weight[torch.from_numpy(users)])
        lay.model.items.weight[torch.from_numpy(rows)] = model.items.weight[torch.from_numpy(items)]
        lay.model.global_bias.copy_(model.global_bias)
    return lay


def reference(model: BiasedMF, data: Dataset, k: int) -> dict[str, float]:
    train, test = data.read_split("train"), data.read_split("test")
    p, _, q, bi = (t.detach().numpy() for t in model.factors())
    seen: dict[int, set] = {}
    for u, i in zip(train["user"], train["item"], strict=True):
        seen.setdefault(int(u), set()).add(int(i))
    rel: dict[int, set] = {}
    for u, i, r in zip(test["user"], test["item"], test["rating"], strict=True):
        if r >= 4:
            rel.setdefault(int(u), set()).add(int(i))
    recall = ndcg = ap = 0.0
    for u, items in rel.items():
        scores = p[u] @ q.T + bi
        ranked = [i for i in np.argsort(-scores, kind="stable") if i not in seen.get(u, set())][:k]
        hits = [1.0 if i in items else 0.0 for i in ranked]
        recall += sum(hits) / len(items)
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        ndcg += dcg / sum(1 / math.log2(r + 2) for r in range(min(k, len(items))))
        ap += sum(h * sum(hits[: r + 1]) / (r + 1) for r, h in enumerate(hits)) / min(k, len(items))
    n = len(rel)
    return {f"recall@{k}": recall / n, f"ndcg@{k}": ndcg / n, f"map@{k}": ap / n, "ranking_users": n}


def test_ranking_metrics_match_brute_force(small_data):
    data = Dataset(small_data)
    torch.manual_seed(0)
    model = BiasedMF(data.n_users, data.n_items, 8, init_std=0.5)
    with torch.no_grad():
        model.items.weight[:, 8] = torch.randn(data.n_items)
    env = DistEnv(0, 1, 0, CPU)
    for k in (5, 10):
        # A small score budget forces several user batches.
        got = ranking_metrics(layout_of(model, data, env), "test", k=k, score_budget=data.n_items * 7)
        want = reference(model, data, k)
        assert got["ranking_users"] == want["ranking_users"]
        for key in (f"recall@{k}", f"ndcg@{k}", f"map@{k}"):
            assert math.isclose(got[key], want[key], rel_tol=1e-9, abs_tol=1e-12), key


def random_model(data: Dataset, seed: int = 0) -> BiasedMF:
    """Large random factors and biases around the middle of the scale: predictions overshoot both ends."""
    torch.manual_seed(seed)
    lo, hi = data.rating_range
    model = BiasedMF(data.n_users, data.n_items, 8, mean=(lo + hi) / 2, init_std=0.5)
    with torch.no_grad():
        for table in (model.users, model.items):
            table.weight[:, 8] = torch.randn(table.num_embeddings) * (hi - lo) / 3
    return model


def brute_force_rmse_mae(model: BiasedMF, data: Dataset, split: str,
                         days: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, float, np.ndarray]:
    """float64 NumPy: clip(mean + b_u + b_i + p_u . q_i [+ b_{u,day}]) against each row's own rating; ``days``: the
    user-day biases (sorted keys user * 2^20 + timestamp // 86400, biases; checkpoint.day_biases), 0 for a day not
    among them."""
    held = data.read_split(split)
    p, bu, q, bi = (t.detach().double().numpy() for t in model.factors())
    u, i = held["user"], held["item"]
    pred = float(model.global_bias.detach()) + bu[u] + bi[i] + np.einsum("nd,nd->n", p[u], q[i])
    if days is not None:
        keys = u.astype(np.int64) * 2**20 + held["timestamp"].astype(np.int64) // 86_400
        at = np.minimum(np.searchsorted(days[0], keys), len(days[0]) - 1)
        pred = pred + np.where(days[0][at] == keys, days[1][at].astype(np.float64), 0.0)
    err = np.clip(pred, *data.rating_range) - held["rating"].astype(np.float64)
    return float(np.sqrt(np.mean(err**2))), float(np.mean(np.abs(err))), pred


def test_rmse_and_mae_match_brute_force_with_clipping_at_both_ends(odd_data):
    data = Dataset(odd_data)
    model = random_model(data)
    rmse, mae, pred = brute_force_rmse_mae(model, data, "test")
    lo, hi = data.rating_range
    assert (pred < lo).sum() > 10 and (pred > hi).sum() > 10 and ((pred > lo) & (pred < hi)).sum() > 10
    # several batches, a short last
    got = evaluate(layout_of(model, data, DistEnv(0, 1, 0, CPU)), "test", batch_size=37)
    assert got["count"] == data.split_rows("test")
    assert math.isclose(got["rmse"], rmse, rel_tol=1e-6) and math.isclose(got["mae"], mae, rel_tol=1e-6)


def _eval_rank(rank: int, port: int, data: str, model_file: str, out: str, tables: str) -> None:
    as_rank(rank, 2, port)
    env = distributed.init("cpu", 60)
    try:
        ds = Dataset(data)
        model = BiasedMF(ds.n_users, ds.n_items, 8)
        model.load_state_dict(torch.load(model_file))
        lay = layout_of(model, ds, env, tables)
        result = {"eval": evaluate(lay, "test", batch_size=37),
                  "ranking": ranking_metrics(lay, "test", k=5, score_budget=ds.n_items * 7)}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        distributed.destroy()


@pytest.mark.parametrize("tables", ["replicated", "blocks"])
def test_two_ranks_give_the_global_metrics_of_one(odd_data, tmp_path, tables):
    """Each rank scores its users' share (unequal); the sums are global, never a mean of per-rank means. Under
    blocks each rank holds only its user block and one movie block."""
    data = Dataset(odd_data)
    model = random_model(data, seed=1)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    env = DistEnv(0, 1, 0, CPU)
    lay = layout_of(model, data, env)
    one = {"eval": evaluate(lay, "test", batch_size=37),
           "ranking": ranking_metrics(lay, "test", k=5, score_budget=data.n_items * 7)}
    assert one["ranking"]["ranking_users"] > 20
    args = (free_port(), str(odd_data), str(tmp_path / "model.pt"), str(tmp_path), tables)
    assert spawn_ranks(_eval_rank, 2, args, 120) == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank returns the global result
    assert ranks[0]["eval"]["count"] == one["eval"]["count"]
    for part in ("eval", "ranking"):
        for key, value in one[part].items():
            # float32 predictions round differently in differently shaped batches; far below the ~1e-4 of a
            # mean of per-rank means here
            assert math.isclose(ranks[0][part][key], value, rel_tol=1e-9), (part, key)

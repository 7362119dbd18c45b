"""``torchrun --nproc_per_node=N -m mfscale.train --data DIR --run-dir DIR``: the training job.

Plain ``python -m mfscale.train`` runs the same job as a world of one. The trainer assembles the job from the
modules that own each part, then runs one loop:

- ``mfscale.layout.build``: where the tables' rows live, their optimizer and this rank's batches;
- ``mfscale.optim.Optimizers``: the tables' and the global bias's optimizers and their schedule;
- ``mfscale.step.build``: the step variant (C++ op, compiled or eager torch ops, autograd);
- ``mfscale.resume.Checkpoints``: save and resume (the newest valid checkpoint on disk);
- ``mfscale.report``: the curves while training, metrics.json and TensorBoard at the end.

Rank 0 alone writes the run directory (config, TensorBoard, metrics), every file atomically; checkpoints are
written as one part per rank that holds rows of its own plus rank 0's metadata.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import config, distributed, layout, report, step
from .config import JobConfig
from .distributed import DistEnv, StopSignal
from .errors import cli_entry
from .evaluate import evaluate
from .monitor import Monitor
from .optim import Optimizers
from .resume import Checkpoints, Progress, keep_started_optimizer
from .shards import Dataset, write_text_atomic

__all__ = ["StopSignal", "Trainer", "main", "run"]

PROG = "mfscale.train"
log = logging.getLogger("mfscale")


class Trainer:
    """The training loop over parts that other modules build; it never asks which layout, step or device."""

    def __init__(self, cfg: JobConfig, env: DistEnv, stop: StopSignal | None = None, *,
                 on_epoch_end: Callable[[int, float | None], None] | None = None, final_test: bool = True):
        """``on_epoch_end(epochs done, val RMSE or None)`` after each epoch's validation and checkpoint (the tuner
        reports to its pruner there; an exception it raises ends ``fit``); ``final_test`` False: the test split
        is never read (the tuner's trials)."""
        self.cfg, self.env = cfg, env
        self.on_epoch_end, self.final_test = on_epoch_end, final_test
        self.stop = stop or StopSignal()  # not installed: only run() owns the process's signal handlers
        self.run_dir = Path(cfg.run_dir)
        step.keep_step_memory()  # host memory: CPU steps, and the stream's batches on any device
        data = Dataset(cfg.data.path, verify=cfg.data.verify, hash_share=(env.local_rank, env.local_world_size))
        torch.manual_seed(cfg.train.seed)
        keep_started_optimizer(cfg, env)  # a resumed run's tables keep the optimizer state they were saved with
        self.layout = layout.build(cfg, env, data)
        self.model = self.layout.model
        self.optims = Optimizers(cfg.optim, self.layout.opt, self.model.dense_parameters(),
                                 self.layout.steps_per_epoch * cfg.train.epochs)
        self.step_fn = step.build(cfg, env, self.layout, self.optims)
        self.checkpoints = Checkpoints(cfg, env, self.layout, self.optims, self.step_fn)
        self.progress = Progress()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.epoch_collectives: int | None = None  # the last epoch's, in this process (metrics.json)
        self.stopped_on_signal = False

    def resume(self) -> bool:
        """Continue from the newest valid checkpoint in the run directory, if any."""
        resumed = self.checkpoints.resume(self.progress)
        if resumed:
            self.best_weights = resumed.best_weights
        return resumed is not None

    def train_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """One optimizer step on this rank's batch; returns the batch's summed squared error."""
        dev = self.env.device
        move = dev.type != "cpu"  # on a CPU the batch is there already (and a step's Python runs cold: CppStep)
        cols = {k: batch[k].to(dev, non_blocking=True) if move else batch[k]
                for k in ("user", "item", "rating", "day_row", "time_bin", "time_dev") if k in batch}
        sse = self.step_fn(cols.pop("user"), cols.pop("item"), cols.pop("rating"), max(int(batch["global_rows"]), 1),
                           self.progress.global_step, **cols)
        self.optims.schedule_step()
        return sse

    def fit(self) -> dict[str, Any]:
        cfg, env, p = self.cfg, self.env, self.progress
        resumed = self.resume()
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / "config.toml", config.to_toml(cfg))  # after resume: its settings
        monitor = Monitor(self.run_dir / "tb", enabled=env.is_main, purge_step=p.global_step if resumed else None)
        if not resumed:
            monitor.text_config(cfg.to_dict())
        data = self.layout.data
        log.info("training %s ratings (%d users, %d movies), batch %d x %d ranks, %d steps/epoch, device %s",
                 f"{data.split_rows('train'):,}", data.n_users, data.n_items, self.layout.batch_size,
                 env.world_size, self.layout.steps_per_epoch, env.device)
        stopped_early = False
        try:
            while p.epoch < cfg.train.epochs and not stopped_early:
                self._train_epoch(monitor)
                if self.stopped_on_signal:  # checkpointed mid-epoch; a requeued job resumes from there
                    monitor.close()
                    return {"stopped_on_signal": True, "steps": p.global_step, "world_size": env.world_size}
                stopped_early = self._end_epoch(monitor)
                if self.on_epoch_end is not None:
                    self.on_epoch_end(p.epoch, p.history[-1].get("val_rmse"))
        except BaseException:
            monitor.close()
            raise
        if self.best_weights is not None:
            self.layout.load_weights(self.best_weights)
        metrics = report.final(cfg, env, self.layout, monitor, test=self.final_test, run={
            "best_val_rmse": p.best_val if math.isfinite(p.best_val) else None, "best_epoch": p.best_epoch,
            "epochs": p.epoch, "steps": p.global_step,
            "train_ratings_per_s": p.train_ratings / p.train_seconds if p.train_seconds else None,
            "collectives_per_epoch": self.epoch_collectives if env.distributed else 0, "history": p.history})
        monitor.close()
        return metrics

    def _train_epoch(self, monitor: Monitor) -> None:
        cfg, p = self.cfg, self.progress
        steps = self.layout.steps_per_epoch
        bar = tqdm(total=steps, initial=p.step_in_epoch, desc=f"epoch {p.epoch}", unit="step", dynamic_ncols=True,
                   disable=not (self.env.is_main and sys.stderr.isatty()))
        window = report.Window(self.env)
        self._collectives_at_start = self.env.collectives.total()

        def log_window() -> None:
            seconds, ratings = window.log(p.global_step, self.optims, monitor, bar)
            p.train_seconds += seconds
            p.train_ratings += ratings

        batches = self.layout.batches(p.epoch, p.step_in_epoch)
        while True:
            t_wait = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            wait = time.perf_counter() - t_wait
            window.add(self.train_step(batch), int(batch["global_rows"]), wait)
            p.global_step += 1
            p.step_in_epoch += 1
            bar.update(1)
            # Where the ranks meet (sync_point) they reconcile, sum the loss and vote on stopping; between those
            # points no collective of the loop's own holds a rank back.
            sync = self.layout.sync_point(p.step_in_epoch)
            if sync:
                self.step_fn.reconcile()
            if sync and (window.steps >= cfg.train.log_every or p.step_in_epoch == steps):
                log_window()
            if cfg.checkpoint.every_steps and p.global_step % cfg.checkpoint.every_steps == 0 \
                    and p.step_in_epoch < steps:
                self.checkpoints.save(p)
            if sync and self.stop.requested(self.env):
                if window.steps:
                    log_window()  # count the partial window's time and ratings
                self.checkpoints.save(p)  # ends with a barrier: no rank exits before the files are written
                self.stopped_on_signal = True
                log.info("stopping on signal at step %d, checkpoint saved; requeue to continue", p.global_step)
                break
        bar.close()

    def _end_epoch(self, monitor: Monitor) -> bool:
        """Validate, track the best weights, checkpoint; True when early stopping says stop."""
        p = self.progress
        val = evaluate(self.layout, "val", batch_size=self.cfg.train.eval_batch_size)
        record: dict[str, Any] = {"epoch": p.epoch}
        # this epoch's training steps and validation in this process (not its checkpoint's 2 barriers)
        self.epoch_collectives = self.env.collectives.total() - self._collectives_at_start
        p.epoch += 1
        p.step_in_epoch = 0
        is_best = False
        if val is not None:
            monitor.scalars(p.global_step, {"val/rmse": val["rmse"], "val/mae": val["mae"]})
            record.update(val_rmse=val["rmse"], val_mae=val["mae"])
            if val["rmse"] < p.best_val:
                p.best_val, p.best_epoch, p.bad_epochs, is_best = val["rmse"], record["epoch"], 0, True
                self.best_weights = self.layout.weights()
            else:
                p.bad_epochs += 1
            log.info("epoch %d: val rmse %.4f mae %.4f (best %.4f at epoch %d)", record["epoch"], val["rmse"],
                     val["mae"], p.best_val, p.best_epoch)
        else:
            log.info("epoch %d done (no validation split)", record["epoch"])
        p.history.append(record)
        self.checkpoints.save(p, is_best=is_best)
        monitor.flush()
        patience = self.cfg.train.patience
        return bool(val is not None and patience and p.bad_epochs >= patience)


def setup_logging(rank: int) -> None:
    # Rank 0 narrates; the other ranks only warn, so logs are not N copies of the same lines.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr, force=True,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")


def run(cfg: JobConfig) -> dict[str, Any]:
    """Run one job in this process (one rank of it under torchrun)."""
    stop = StopSignal()
    stop.install()  # first: a signal during startup stops at the first step
    try:
        env = distributed.init(cfg.train.device, cfg.train.timeout_s)
        setup_logging(env.rank)
        return Trainer(cfg, env, stop).fit()
    finally:
        stop.restore()
        distributed.destroy()


@cli_entry(PROG)
def main(argv: list[str] | None = None) -> int:
    cfg = config.from_args(argv)
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())

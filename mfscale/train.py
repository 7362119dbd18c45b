"""``torchrun --nproc_per_node=N -m mfscale.train --data DIR --run-dir DIR``: the training job.

Plain ``python -m mfscale.train`` runs the same job as a world of one. Each rank streams its share of
the training shards; the dense global bias goes through DDP, the sparse tables are synchronized by
``sync.sync_sparse_grads``; rank 0 alone writes the run directory (config, checkpoints, TensorBoard,
metrics), every file atomically. Resume is decided by what is on disk: the newest valid checkpoint.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import platform
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import checkpoint, config, distributed
from .config import JobConfig
from .distributed import DistEnv
from .errors import ConfigError, DataError, cli_entry
from .evaluate import evaluate, ranking_metrics
from .model import SPARSE_TABLES, BiasedMF, batch_errors, compiled_batch_errors
from .monitor import Monitor
from .optim import LazyAdam
from .shards import Dataset, write_json_atomic, write_text_atomic
from .stream import RatingStream, make_loader, resident_fits
from .sync import all_sum_rows, sync_sparse_grads, sync_sparse_rows

PROG = "mfscale.train"
log = logging.getLogger("mfscale")

AUTO_STEPS_PER_EPOCH = 200
AUTO_GLOBAL_MIN, AUTO_GLOBAL_MAX, AUTO_RANK_MIN = 1024, 262_144, 256

# Stop on a signal (SLURM's --signal=B:USR1@T, relayed by srun and torchrun; SIGTERM from scancel, a time
# limit or torchrun's own shutdown): the handler only records it; at the next step boundary every rank
# agrees (Trainer._stop_requested), rank 0 checkpoints and the job exits 0 without metrics.json: a
# clean stop, not a failure, so torchrun does not restart workers that the scheduler is about to stop.
# The launcher (launch/slurm/train.sbatch) requeues, and the next run resumes from that checkpoint.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# Ranks compare flags every this many global steps (all ranks share global_step, so they check together):
# one tiny all_reduce took ~0.2 ms against ~6-8 ms steps with 2 gloo ranks on 2 CPU cores; every 10th
# step makes that ~0.3%, and stopping a few steps later is nothing against a 300 s warning.
STOP_CHECK_EVERY = 10


class StopSignal:
    """Records the first stop signal while installed; the handler does nothing else (async-signal safe)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum

    def install(self) -> None:
        # signal.signal only works in the main thread; elsewhere (tests, notebooks) stopping is not offered.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
            for s in STOP_SIGNALS:
                signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


# Fused kernels are compiled (a one-off 10-60 s) only for data where an epoch takes longer than that.
COMPILE_MIN_ROWS = 1_000_000
# A masked sweep over a whole table costs the same whatever the share of rows a step touches; the
# gather/scatter form costs per touched row. On the 2-core CPU (ml-10m synthetic, d=64) the sweep lost with
# 17% of the user rows touched and won clearly with 34% (steps 7.6 vs 10.0 ms); measured in
# benchmarks/RESULTS.md.
DENSE_SWEEP_MIN_FRACTION = 0.3


def auto_batch_size(n_train: int, world_size: int) -> int:
    """Per-rank batch for about AUTO_STEPS_PER_EPOCH steps per epoch.

    The global batch (all ranks together) depends only on the data size, so a job gets the same number
    of updates, and so the same quality, whatever the number of processes it runs on.
    """
    global_batch = min(AUTO_GLOBAL_MAX, max(AUTO_GLOBAL_MIN, n_train // AUTO_STEPS_PER_EPOCH // 1024 * 1024))
    return max(AUTO_RANK_MIN, global_batch // world_size)


def _sum_allreduce_hook(state, bucket):  # no annotations: DDP checks them and ours are strings (PEP 563)
    """DDP comm hook that sums instead of averaging: losses are already divided by the global batch."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


# glibc malloc: requests up to this size come from the heap, and freed heap memory up to the trim threshold
# stays mapped. By default glibc mmaps (and on free unmaps) blocks of 128 KiB and up until its adaptive
# threshold has grown, so every step's multi-MB temporaries were fresh pages: ~2,400 page faults per step
# at batch 42k, 1.3-1.5x slower steps (benchmarks/RESULTS.md). Same effect as MALLOC_MMAP_THRESHOLD_ /
# MALLOC_TRIM_THRESHOLD_, which only work if set before the process starts.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
MALLOC_TRIM_THRESHOLD = 1 << 30


def keep_step_memory() -> bool:
    """Tune glibc's malloc so a training step's temporaries reuse mapped memory (no-op elsewhere)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD,
                                                                               MALLOC_TRIM_THRESHOLD))


def _lr_lambda(schedule: str, total_steps: int, min_frac: float):
    def f(step: int) -> float:
        t = min(step, total_steps) / max(total_steps, 1)
        if schedule == "cosine":
            return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * t))
        if schedule == "linear":
            return 1 - (1 - min_frac) * t
        return 1.0

    return f


class Trainer:
    def __init__(self, cfg: JobConfig, env: DistEnv, stop: StopSignal | None = None):
        self.cfg, self.env = cfg, env
        self.stop = stop or StopSignal()  # not installed: only run() owns the process's signal handlers
        self.run_dir = Path(cfg.run_dir)
        self.data = Dataset(cfg.data.path)
        self.n_train = self.data.split_rows("train")
        if self.n_train == 0:
            raise DataError(f"{cfg.data.path}: the training split is empty")
        t = cfg.train
        self.batch_size = t.batch_size or auto_batch_size(self.n_train, env.world_size)
        self.device = env.device
        keep_step_memory()  # host memory: CPU steps, and the stream's batches on any device
        self._check_precision()
        # The same seed on every rank gives identical initial tables, so replicas start equal.
        torch.manual_seed(t.seed)
        mean = float(self.data.manifest["rating"].get("train_mean", self.data.manifest["rating"]["mean"]))
        self.model = BiasedMF(self.data.n_users, self.data.n_items, cfg.model.dim, mean=mean,
                              init_std=cfg.model.init_std).to(self.device)
        # Embedding rows stay in the tables' dtype under autocast (pytorch#98814), so these match them.
        self.reg_weights = torch.full((cfg.model.dim + 1,), cfg.optim.reg_factor, device=self.device,
                                      dtype=self.model.users.weight.dtype)
        self.reg_weights[-1] = cfg.optim.reg_bias
        self.forward_model: torch.nn.Module = self.model
        if env.distributed:
            DDP._set_params_and_buffers_to_ignore_for_model(self.model, list(SPARSE_TABLES))
            ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                      broadcast_buffers=False)
            ddp.register_comm_hook(None, _sum_allreduce_hook)
            self.forward_model = ddp
        o = cfg.optim
        # The fused step computes the loss's gradients in closed form (BiasedMF.closed_form_grads) and feeds
        # LazyAdam unique rows; autograd + SparseAdam stays as the reference and for what fused lacks.
        self.fused = t.step == "fused" or (t.step == "auto" and not cfg.fused_blockers())
        use_compile = self.fused and (t.compile == "on" or (t.compile == "auto" and self.n_train >= COMPILE_MIN_ROWS))
        # LazyAdam computes SparseAdam's update without its coalesce() (mfscale/optim.py); same state layout.
        if o.optimizer == "lazy_adam":
            self.opt_sparse = LazyAdam(self.model.sparse_parameters(), lr=o.lr, compile=use_compile)
        else:
            self.opt_sparse = torch.optim.SparseAdam(self.model.sparse_parameters(), lr=o.lr)
        self.errors = compiled_batch_errors() if use_compile else batch_errors
        # Whole-table (masked) optimizer sweeps for steps that touch at least DENSE_SWEEP_MIN_FRACTION of a
        # table's rows; one process only (ranks exchange touched rows), compiled kernels only.
        self.dense_min = None
        if use_compile and not env.distributed:
            self.dense_min = tuple(math.ceil(DENSE_SWEEP_MIN_FRACTION * n) for n in (self.data.n_users,
                                                                                  self.data.n_items))
        if use_compile:
            self._warm_up_compiled(required=t.compile == "on")
        self.opt_dense = torch.optim.Adam(self.model.dense_parameters(), lr=o.dense_lr)
        self._grad_scratch: dict[str, torch.Tensor] = {}  # the fused step's gradient rows, reused every step
        self.resident = self._use_resident()
        self.stream = RatingStream(self.data, "train", batch_size=self.batch_size, rank=env.rank,
                                   world_size=env.world_size, seed=t.seed,
                                   resident=self.device if self.resident else None)
        self.steps_per_epoch = self.stream.steps_per_epoch
        total = self.steps_per_epoch * t.epochs
        lam = _lr_lambda(o.schedule, total, o.min_lr_frac)
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(opt, lam) for opt in (self.opt_sparse, self.opt_dense)]
        self.scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        # Progress: where the next step starts, and early-stopping state.
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_val, self.best_epoch, self.bad_epochs = math.inf, -1, 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, Any]] = []
        self.train_seconds, self.train_ratings = 0.0, 0
        self.stopped_on_signal = False

    def _use_resident(self) -> bool:
        """Keep the training split on the device (batches cut there, identical to streamed ones)?"""
        mode = self.cfg.data.resident
        if mode == "on":
            if self.cfg.data.workers:
                raise ConfigError("--data.resident on reads batches in the training process; use --workers 0")
            return True
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return mode == "auto" and not self.cfg.data.workers and resident_fits(self.n_train, self.device, local_world)

    def _warm_up_compiled(self, required: bool) -> None:
        """Compile the fused kernels now, on a throwaway model, so a missing compiler shows up before training.

        With ``--train.compile auto`` a failure falls back to the same kernels run eagerly (identical math).
        """
        # Sizes all different (9 ratings; 3 of 5 user rows, 4 of 7 movie rows touched), so that the kernels are
        # compiled for symbolic sizes and training reuses them: equal sizes here would be assumed equal later.
        scratch = BiasedMF(5, 7, self.cfg.model.dim).to(self.device)
        opt = LazyAdam(scratch.sparse_parameters(), lr=1e-3, compile=True)
        try:
            user = torch.tensor([0, 1, 2, 1, 0, 2, 1, 0, 2], device=self.device)
            item = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0], device=self.device)
            w = torch.ones(self.cfg.model.dim + 1, device=self.device)
            for dense_min in (None, (0, 0)):  # both kernel forms (rows, whole table)
                gu, gi, _, _ = scratch.closed_form_grads(user, item, torch.ones(9, device=self.device), 9,
                                                          errors=self.errors, dense_min=dense_min)
                opt.step(rows=[(g.ids, g.rows, g.counts.to(w.dtype), w) for g in (gu, gi)])
        except Exception as exc:  # compile errors come from many layers (dynamo, inductor, the C++ compiler)
            if required:
                raise ConfigError(f"--train.compile on: torch.compile failed ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}); use --train.compile off") from exc
            log.warning("torch.compile failed (%s); running the fused step without it", type(exc).__name__)
            self.opt_sparse.compile = False
            self.errors = batch_errors
            self.dense_min = None
        log.info("training step: fused, kernels compiled: %s", self.errors is not batch_errors)

    def _check_precision(self) -> None:
        p = self.cfg.train.precision
        if p == "fp32":
            return
        if self.device.type != "cuda":
            raise ConfigError(f"--precision {p} needs a CUDA device (mixed precision is autocast on CUDA); "
                              "use --precision fp32 on CPU")
        if p == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("--precision bf16 is not supported by this GPU; use fp16 or fp32")

    # ---- checkpoints -------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "model_shape": self.model.shape,
            "data_fingerprint": self.data.fingerprint,
            "opt_sparse": self.opt_sparse.state_dict(),
            "opt_dense": self.opt_dense.state_dict(),
            "scheds": [s.state_dict() for s in self.scheds],
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "batch_size": self.batch_size, "world_size": self.env.world_size,
            "best_val": self.best_val, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
            "history": self.history, "train_seconds": self.train_seconds, "train_ratings": self.train_ratings,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }

    def save(self, is_best: bool = False) -> None:
        if self.env.is_main:
            checkpoint.save_checkpoint(self.run_dir, self._state(), step=self.global_step,
                                       keep_last=self.cfg.checkpoint.keep_last, is_best=is_best)

    def resume(self) -> bool:
        """Load the newest valid checkpoint that rank 0 finds; every rank loads the same file."""
        if self.cfg.checkpoint.resume == "never":
            return False
        found = checkpoint.load_latest(self.run_dir) if self.env.is_main else None
        path = distributed.broadcast_object(self.env, str(found[1]) if found else None)
        if path is None:
            return False
        state = found[0] if found else checkpoint.load_checkpoint_file(Path(path))
        self._check_compatible(state, path)
        self.model.load_state_dict(state["model"])
        self.opt_sparse.load_state_dict(state["opt_sparse"])
        self.opt_dense.load_state_dict(state["opt_dense"])
        for s, sd in zip(self.scheds, state["scheds"], strict=True):
            s.load_state_dict(sd)
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        for k in ("epoch", "step_in_epoch", "global_step", "best_val", "best_epoch", "bad_epochs", "history",
                  "train_seconds", "train_ratings"):
            setattr(self, k, state[k])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        best = checkpoint.load_best(self.run_dir) if self.best_epoch >= 0 else None
        if best is not None:
            self.best_state = {k: v.cpu() for k, v in best[0]["model"].items()}
        log.info("resumed from %s at epoch %d step %d", path, self.epoch, self.step_in_epoch)
        return True

    def _check_compatible(self, state: dict[str, Any], path: str) -> None:
        hint = "use a new --run-dir, or --checkpoint.resume never to start over"
        if state["data_fingerprint"] != self.data.fingerprint:
            raise ConfigError(f"checkpoint {path} was trained on a different dataset; {hint}")
        if state["model_shape"] != self.model.shape:
            raise ConfigError(f"checkpoint {path} has model shape {state['model_shape']}, this run "
                              f"{self.model.shape}; {hint}")
        if state["step_in_epoch"] and (state["world_size"], state["batch_size"]) != (
                self.env.world_size, self.batch_size):
            raise ConfigError(f"checkpoint {path} stopped mid-epoch with world size {state['world_size']} and "
                              f"batch size {state['batch_size']}; resume with the same values")

    # ---- training ----------------------------------------------------------------------------------
    def _dropout_mask(self, n: int) -> torch.Tensor | None:
        p = self.cfg.model.dropout
        if p == 0:
            return None
        # Keyed by (seed, rank, step), so a resumed run draws the same masks without saving RNG streams.
        g = torch.Generator(device=self.device)
        g.manual_seed(hash((self.cfg.train.seed, self.env.rank, self.global_step)) & 0x7FFF_FFFF_FFFF)
        keep = torch.rand((n, self.cfg.model.dim + 1), generator=g, device=self.device) >= p  # bias column unused
        return keep.to(torch.float32) / (1 - p)

    def train_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """One optimizer step on this rank's batch; returns the batch's summed squared error."""
        o = self.cfg.optim
        dev = self.device
        user = batch["user"].to(dev, non_blocking=True)
        item = batch["item"].to(dev, non_blocking=True)
        rating = batch["rating"].to(dev, non_blocking=True)
        global_rows = max(int(batch["global_rows"]), 1)
        if self.fused:
            return self._fused_step(user, item, rating, global_rows)
        with torch.autocast(dev.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            pred, (u, v) = self.forward_model(user, item, self._dropout_mask(user.numel()))
            err = pred.to(torch.promote_types(pred.dtype, torch.float32)) - rating  # fp32 at least, f64 kept
            sse = err.square().sum()
            # Per-column weights (reg_factor on factors, reg_bias on the bias column) in one matmul each.
            reg = (u.square() @ self.reg_weights).sum() + (v.square() @ self.reg_weights).sum()
            loss = (sse + reg) / global_rows
            if o.gravity > 0:
                d = self.cfg.model.dim
                loss = loss + self._gravity(u[:, :d], v[:, :d], global_rows)
        if self.scaler:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        synced = None
        if self.env.distributed:
            if isinstance(self.opt_sparse, LazyAdam) and not self.scaler:
                synced = sync_sparse_rows(self.model.sparse_parameters())  # unique rows: no second dedupe
            else:
                sync_sparse_grads(self.model.sparse_parameters())
        if self.scaler:
            self.scaler.step(self.opt_sparse)
            self.scaler.step(self.opt_dense)
            self.scaler.update()
        else:
            if synced is None:
                self.opt_sparse.step()
            else:
                self.opt_sparse.step(rows=synced)
            self.opt_dense.step()
        self.opt_sparse.zero_grad(set_to_none=True)
        self.opt_dense.zero_grad(set_to_none=True)
        for s in self.scheds:
            s.step()
        return sse.detach()

    def _fused_step(self, user: torch.Tensor, item: torch.Tensor, rating: torch.Tensor,
                    global_rows: int) -> torch.Tensor:
        """train_step without autograd: closed-form row gradients, summed over ranks, into LazyAdam.

        Same objective as the autograd step: the per-rating L2 term reaches LazyAdam as (how many ratings of
        the global batch touched each row) x (per-column weight); ranks sum their counts with the rows, as
        one extra column of the same all_gather.
        """
        gu, gi, g_mean, sse = self.model.closed_form_grads(user, item, rating, global_rows, errors=self.errors,
                                                           dense_min=self.dense_min, scratch=self._grad_scratch)
        dtype = gu.rows.dtype
        tables = [(g.ids, g.rows, g.counts.to(dtype)) for g in (gu, gi)]
        if self.env.distributed:
            local = [(ids, torch.cat([rows, counts[:, None]], 1)) for ids, rows, counts in tables]
            synced = all_sum_rows(local, [self.data.n_users, self.data.n_items])
            tables = [(ids, v[:, :-1], v[:, -1]) for ids, v in synced]
            dist.all_reduce(g_mean)
        col_weights = self.reg_weights * (2.0 / global_rows)
        self.model.global_bias.grad = g_mean.reshape(()).to(self.model.global_bias.dtype)
        self.opt_sparse.step(rows=[(ids, rows, counts, col_weights) for ids, rows, counts in tables])
        self.opt_dense.step()
        self.opt_dense.zero_grad(set_to_none=True)
        for s in self.scheds:
            s.step()
        return sse

    def _gravity(self, p: torch.Tensor, q: torch.Tensor, global_rows: int) -> torch.Tensor:
        """gravity * mean over the global batch's (user, movie) pairs of <p_u, q_i>^2, via d x d Grams.

        sum_{a,b} <p_a, q_b>^2 = <P^T P, Q^T Q>_F. With A, C the Grams summed over ranks, the surrogate
        <A_r, C> + <A, C_r> (other side detached) has exactly the gradient of <A, C> for this rank's rows.
        """
        a_local, c_local = p.T @ p, q.T @ q
        a_all, c_all = a_local.detach().clone(), c_local.detach().clone()
        if self.env.distributed:
            dist.all_reduce(a_all)
            dist.all_reduce(c_all)
        scale = self.cfg.optim.gravity / float(global_rows) ** 2
        return scale * ((a_local * c_all).sum() + (a_all * c_local).sum())

    def fit(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        resumed = self.resume()
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / "config.toml", config.to_toml(cfg))
        monitor = Monitor(self.run_dir / "tb", enabled=env.is_main,
                          purge_step=self.global_step if resumed else None)
        if not resumed:
            monitor.text_config(cfg.to_dict())
        log.info("training %s ratings (%d users, %d movies), batch %d x %d ranks, %d steps/epoch, device %s",
                 f"{self.n_train:,}", self.data.n_users, self.data.n_items, self.batch_size, env.world_size,
                 self.steps_per_epoch, self.device)
        stopped_early = False
        while self.epoch < cfg.train.epochs and not stopped_early:
            self._train_epoch(monitor)
            if self.stopped_on_signal:  # checkpointed mid-epoch; a requeued job resumes from there
                monitor.close()
                return {"stopped_on_signal": True, "steps": self.global_step, "world_size": env.world_size}
            stopped_early = self._end_epoch(monitor)
        metrics = self._finish(monitor)
        monitor.close()
        return metrics

    def _train_epoch(self, monitor: Monitor) -> None:
        cfg, env = self.cfg, self.env
        self.stream.set_epoch(self.epoch, self.step_in_epoch)
        loader = self.stream if self.resident else make_loader(self.stream, cfg.data.workers,
                                                                pin_memory=self.device.type == "cuda")
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {self.epoch}",
                   disable=not (env.is_main and sys.stderr.isatty()), unit="step", dynamic_ncols=True)
        window = {"sse": torch.zeros((), dtype=torch.float64, device=self.device), "rows": 0, "wait": 0.0,
                  "t0": time.perf_counter(), "steps": 0}
        it = iter(loader)
        while True:
            t_wait = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            window["wait"] += time.perf_counter() - t_wait
            window["sse"] += self.train_step(batch)
            window["rows"] += int(batch["global_rows"])
            window["steps"] += 1
            self.global_step += 1
            self.step_in_epoch += 1
            bar.update(1)
            if window["steps"] == cfg.train.log_every or self.step_in_epoch == self.steps_per_epoch:
                self._log_window(window, monitor, bar)
            if cfg.checkpoint.every_steps and self.global_step % cfg.checkpoint.every_steps == 0 \
                    and self.step_in_epoch < self.steps_per_epoch:
                self.save()
            if self._stop_requested():
                if window["steps"]:
                    self._log_window(window, monitor, bar)  # count the partial window's time and ratings
                self.save()
                if env.distributed:
                    dist.barrier()  # no rank exits (and lets the launcher tear down) before the file is written
                self.stopped_on_signal = True
                log.info("stopping on signal at step %d, checkpoint saved; requeue to continue", self.global_step)
                break
        bar.close()

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal. A collective when distributed, so all stop at the same step."""
        if not self.env.distributed:
            return self.stop.signum != 0
        if self.global_step % STOP_CHECK_EVERY:
            return False
        flag = torch.tensor([self.stop.signum], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _log_window(self, w: dict[str, Any], monitor: Monitor, bar: tqdm) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - w["t0"]
        sse = float(distributed.all_reduce_sum(self.env, w["sse"].clone()))
        rows = max(w["rows"], 1)  # global_rows summed per step: already the count over all ranks
        mse = sse / rows
        rate = rows / max(elapsed, 1e-9)
        self.train_seconds += elapsed
        self.train_ratings += rows
        lr = self.opt_sparse.param_groups[0]["lr"]
        monitor.scalars(self.global_step, {
            "train/loss": mse, "train/rmse": math.sqrt(mse), "throughput/ratings_per_s": rate,
            "time/step_ms": 1000 * elapsed / w["steps"], "time/data_wait_pct": 100 * w["wait"] / max(elapsed, 1e-9),
            "lr/sparse": lr, "lr/dense": self.opt_dense.param_groups[0]["lr"],
        })
        bar.set_postfix(loss=f"{mse:.4f}", ratings_per_s=f"{rate / 1e6:.2f}M")
        w.update(sse=torch.zeros((), dtype=torch.float64, device=self.device), rows=0, wait=0.0,
                 t0=time.perf_counter(), steps=0)

    def _end_epoch(self, monitor: Monitor) -> bool:
        """Validate, track the best weights, checkpoint; True when early stopping says stop."""
        cfg = self.cfg
        val = evaluate(self.model, self.data, "val", self.env, batch_size=cfg.train.eval_batch_size)
        finished_epoch = self.epoch
        self.epoch += 1
        self.step_in_epoch = 0
        is_best = False
        record: dict[str, Any] = {"epoch": finished_epoch}
        if val is not None:
            monitor.scalars(self.global_step, {"val/rmse": val["rmse"], "val/mae": val["mae"]})
            record.update(val_rmse=val["rmse"], val_mae=val["mae"])
            if val["rmse"] < self.best_val:
                self.best_val, self.best_epoch, self.bad_epochs, is_best = val["rmse"], finished_epoch, 0, True
                self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            else:
                self.bad_epochs += 1
            log.info("epoch %d: val rmse %.4f mae %.4f (best %.4f at epoch %d)", finished_epoch, val["rmse"],
                     val["mae"], self.best_val, self.best_epoch)
        else:
            log.info("epoch %d done (no validation split)", finished_epoch)
        self.history.append(record)
        self.save(is_best=is_best)
        monitor.flush()
        patience = cfg.train.patience
        return bool(val is not None and patience and self.bad_epochs >= patience)

    def _finish(self, monitor: Monitor) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        if self.best_state is not None:
            self.model.load_state_dict({k: v.to(self.device) for k, v in self.best_state.items()})
        test = evaluate(self.model, self.data, "test", env, batch_size=cfg.train.eval_batch_size)
        ranking = ranking_metrics(self.model, self.data, "test", env, k=cfg.train.ranking_k) \
            if cfg.train.ranking_k else None
        metrics = {
            "test_rmse": test["rmse"] if test else None,
            "test_mae": test["mae"] if test else None,
            "test_count": test["count"] if test else 0,
            "best_val_rmse": self.best_val if math.isfinite(self.best_val) else None,
            "best_epoch": self.best_epoch,
            "epochs": self.epoch,
            "steps": self.global_step,
            "train_ratings_per_s": self.train_ratings / self.train_seconds if self.train_seconds else None,
            "world_size": env.world_size,
            "batch_size": self.batch_size,
            "device": str(self.device),
            "history": self.history,
            **(ranking or {}),
        }
        synthetic = self.data.manifest["source"].get("params") or {}
        if "best_rmse" in synthetic and test:
            metrics["synthetic_best_rmse"] = synthetic["best_rmse"]
            metrics["test_rmse_over_best"] = test["rmse"] / synthetic["best_rmse"]
        if env.is_main:
            write_json_atomic(self.run_dir / "metrics.json", metrics)
            if test:
                monitor.scalars(self.global_step, {"test/rmse": test["rmse"], "test/mae": test["mae"]})
            if ranking:
                monitor.scalars(self.global_step, {f"test/{k}": v for k, v in ranking.items() if "@" in k})
            monitor.hparams(cfg.to_dict(), {f"hparam/{k}": v for k, v in metrics.items()
                                            if isinstance(v, int | float) and v is not None})
            self._projector(monitor)
        log.info("done: test rmse %s, best val rmse %s, %s ratings/s", _fmt(metrics["test_rmse"]),
                 _fmt(metrics["best_val_rmse"]), _fmt(metrics["train_ratings_per_s"], ",.0f"))
        return metrics

    def _projector(self, monitor: Monitor) -> None:
        """Movie embeddings with title/year/genres labels (the most-rated movies, to keep it light)."""
        import polars as pl

        movies = pl.read_parquet(self.data.root / "movies.parquet")
        top = movies.sort("n_train", descending=True).head(10_000)
        idx = torch.tensor(top["item_idx"].to_list(), dtype=torch.long)
        _, _, q, _ = self.model.factors()
        labels = [{"title": r["title"] or f"movie {r['movie_id']}", "year": r["year"], "genres": r["genres"],
                   "movie_id": r["movie_id"], "ratings": r["n_train"]} for r in top.iter_rows(named=True)]
        monitor.embeddings(q.detach()[idx.to(q.device)].cpu(), labels, tag="movies", step=self.global_step)


def _fmt(v: object, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


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

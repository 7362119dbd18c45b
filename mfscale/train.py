"""``torchrun --nproc_per_node=N -m mfscale.train --data DIR --run-dir DIR``: the training job.

Plain ``python -m mfscale.train`` runs the same job as a world of one. Where the tables live and how their
gradients reach them is the layout's business (``mfscale.layout``: replicated, or stratified blocks); the step
variant (``mfscale.step``: fused or autograd) computes gradients; the dense global bias is summed over ranks.
Rank 0 alone writes the run directory (config, TensorBoard, metrics), every file atomically; checkpoints are
written as one part per rank that holds rows of its own plus rank 0's metadata. Resume is decided by what is
on disk: the newest valid checkpoint.
"""

from __future__ import annotations

import ctypes
import logging
import math
import platform
import random
import resource
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

from . import checkpoint, config, cpu_step, distributed
from .config import JobConfig
from .distributed import DistEnv
from .errors import ConfigError, DataError, cli_entry
from .evaluate import evaluate, ranking_metrics
from .layout import Blocks, Replicated, TableLayout
from .layout import choose as layout_choose
from .model import SPARSE_TABLES, BiasedMF, batch_errors, compiled_batch_errors
from .monitor import Monitor
from .optim import LazyAdam
from .shards import Dataset, write_json_atomic, write_text_atomic
from .step import AutogradStep, FusedStep, KernelStep

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


def _load_param_groups(opt: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> None:
    """Restore hyperparameters (lr, initial_lr, betas, ...) saved from ``opt.state_dict()["param_groups"]``."""
    for group, saved in zip(opt.param_groups, groups, strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})


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
    """The training loop. Table layout (``mfscale.layout``) and step variant (``mfscale.step``) are chosen
    here once; the loop below only calls them."""

    def __init__(self, cfg: JobConfig, env: DistEnv, stop: StopSignal | None = None):
        self.cfg, self.env = cfg, env
        self.stop = stop or StopSignal()  # not installed: only run() owns the process's signal handlers
        self.run_dir = Path(cfg.run_dir)
        self.data = Dataset(cfg.data.path)
        self.n_train = self.data.split_rows("train")
        if self.n_train == 0:
            raise DataError(f"{cfg.data.path}: the training split is empty")
        t, o = cfg.train, cfg.optim
        self.batch_size = t.batch_size or auto_batch_size(self.n_train, env.world_size)
        self.device = env.device
        keep_step_memory()  # host memory: CPU steps, and the stream's batches on any device
        self._check_precision()
        torch.manual_seed(t.seed)
        mean = float(self.data.manifest["rating"].get("train_mean", self.data.manifest["rating"]["mean"]))
        # The fused step computes the loss's gradients in closed form (BiasedMF.closed_form_grads) and feeds
        # LazyAdam unique rows; autograd + SparseAdam stays as the reference and for what fused lacks.
        self.fused = t.step == "fused" or (t.step == "auto" and not cfg.fused_blockers())
        use_compile = self.fused and (t.compile == "on" or (t.compile == "auto" and self.n_train >= COMPILE_MIN_ROWS))
        self.layout = self._make_layout(mean, use_compile)
        self.model = self.layout.model
        self.opt_sparse = self.layout.opt
        self.steps_per_epoch = self.layout.steps_per_epoch
        # Embedding rows stay in the tables' dtype under autocast (pytorch#98814), so these match them.
        self.reg_weights = torch.full((cfg.model.dim + 1,), o.reg_factor, device=self.device,
                                      dtype=self.model.users.weight.dtype)
        self.reg_weights[-1] = o.reg_bias
        self.opt_dense = torch.optim.Adam(self.model.dense_parameters(), lr=o.dense_lr)
        self.scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        self.step: FusedStep | KernelStep | AutogradStep
        self.kernel = self.fused and self._use_cpu_kernel()
        if self.kernel:  # the C++ op replaces the torch kernels, compiled or not
            use_compile = self.opt_sparse.compile = False
        self.errors = compiled_batch_errors() if use_compile else batch_errors
        if use_compile:
            self._warm_up_compiled(required=t.compile == "on")
        if self.kernel:
            self.step = KernelStep(env, self.layout, self.opt_dense, self.reg_weights)
        elif self.fused:
            self.step = FusedStep(env, self.layout, self.opt_dense, self.reg_weights, self.errors,
                                  self.layout.dense_min if self.errors is not batch_errors else None)
        else:
            forward: torch.nn.Module = self.model
            if env.distributed:  # the dense global bias through DDP, the tables through the layout
                DDP._set_params_and_buffers_to_ignore_for_model(self.model, list(SPARSE_TABLES))
                forward = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                              broadcast_buffers=False)
                forward.register_comm_hook(None, _sum_allreduce_hook)
            self.step = AutogradStep(cfg, env, self.layout, self.opt_dense, self.reg_weights, forward,
                                     self.scaler, self.autocast_dtype)
        total = self.steps_per_epoch * t.epochs
        lam = _lr_lambda(o.schedule, total, o.min_lr_frac)
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(opt, lam) for opt in (self.opt_sparse, self.opt_dense)]
        # Progress: where the next step starts, and early-stopping state.
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_val, self.best_epoch, self.bad_epochs = math.inf, -1, 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, Any]] = []
        self.train_seconds, self.train_ratings = 0.0, 0
        self.stopped_on_signal = False

    def _make_layout(self, mean: float, use_compile: bool) -> TableLayout:
        cfg, env = self.cfg, self.env
        common = dict(dim=cfg.model.dim, init_std=cfg.model.init_std, seed=cfg.train.seed, mean=mean,
                      optimizer=cfg.optim.optimizer, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                      compile=use_compile,
                      batch_size=self.batch_size)
        name = layout_choose(cfg.train.tables, env.world_size)
        if name == "blocks":
            if cfg.data.workers and cfg.train.tables == "blocks":
                raise ConfigError("--train.tables blocks holds each rank's ratings in memory (no DataLoader "
                                  "workers); use --workers 0")
            if cfg.data.workers:
                log.warning("--workers %d ignored: blocks tables hold each rank's ratings in memory",
                            cfg.data.workers)
            return Blocks(env, self.data, resident=cfg.data.resident, **common)
        return Replicated(env, self.data, resident=cfg.data.resident, workers=cfg.data.workers, **common)

    @property
    def stream(self):
        """The replicated layout's RatingStream (tests and benchmarks drive it directly)."""
        return self.layout.stream

    @property
    def resident(self) -> bool:
        """Whether this rank's training ratings are held on the training device."""
        return self.layout.resident

    def _use_cpu_kernel(self) -> bool:
        """Whether the fused step runs as the C++ op (``--train.cpu_kernel``); builds it on first use."""
        mode = self.cfg.train.cpu_kernel
        if mode == "off" or not KernelStep.applies(self.env, self.layout):
            if mode == "on":
                raise ConfigError("--train.cpu_kernel on needs a CPU device and one process or --train.tables "
                                  "blocks (the replicated layout exchanges gradient rows between the ranks)")
            return False
        try:
            cpu_step.load()
        except cpu_step.KernelUnavailable as exc:
            if mode == "on":
                raise ConfigError(f"--train.cpu_kernel on: the C++ step could not be built ({exc}); use "
                                  "--train.cpu_kernel off") from exc
            log.warning("the C++ training step could not be built (%s); running the fused step as torch ops", exc)
            return False
        log.info("training step: fused, one C++ op (mfscale/csrc/fused_step.cpp)")
        return True

    def _warm_up_compiled(self, required: bool) -> None:
        """Compile the fused kernels now, on a throwaway model, so a missing compiler shows up before training.

        With ``--train.compile auto`` a failure falls back to the same kernels run eagerly (identical math).
        """
        # Sizes all different (9 ratings; 3 of 5 user rows, 4 of 7 movie rows touched), so that the kernels are
        # compiled for symbolic sizes and training reuses them: equal sizes here would be assumed equal later.
        scratch = BiasedMF(5, 7, self.cfg.model.dim).to(self.device)
        opt = LazyAdam(scratch.sparse_parameters(), lr=1e-3, betas=(self.cfg.optim.beta1, self.cfg.optim.beta2),
                       compile=True)
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
        """The checkpoint's metadata; the tables and their Adam state go into the layout's parts."""
        return {
            "config": self.cfg.to_dict(),
            "global_bias": self.model.global_bias.detach().cpu().clone(),
            "model_shape": {"n_users": self.data.n_users, "n_items": self.data.n_items, "dim": self.cfg.model.dim},
            "data_fingerprint": self.data.fingerprint,
            "layout": self.layout.name, "layout_position": self.layout.position(),
            "opt_sparse_groups": self.opt_sparse.state_dict()["param_groups"],
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
        """Every rank with rows of its own writes its part in parallel; rank 0 then writes the metadata."""
        n = self.layout.n_parts
        part = self.layout.part()
        if part is not None:
            checkpoint.write_part(self.run_dir, self.global_step, self.env.rank if n > 1 else 0, n, part)
        if self.env.distributed:
            dist.barrier()  # all parts on disk before the metadata that makes the checkpoint valid
        if self.env.is_main:
            checkpoint.save_checkpoint(self.run_dir, self._state(), step=self.global_step,
                                       keep_last=self.cfg.checkpoint.keep_last, is_best=is_best, n_parts=n)

    def _load_tables(self, path: Path, state: dict[str, Any], weights_only: bool = False) -> None:
        same = state.get("layout") == self.layout.name and state.get("world_size") == self.env.world_size
        which = [self.env.rank if self.layout.n_parts > 1 else 0] if same else None
        parts = (checkpoint.load_part(p) for p in checkpoint.part_paths(path, state, which))
        position = state.get("layout_position", {}) if same else {}
        self.layout.load_parts(parts, position, weights_only=weights_only)
        with torch.no_grad():
            self.model.global_bias.copy_(state["global_bias"])

    def resume(self) -> bool:
        """Load the newest valid checkpoint that rank 0 finds; every rank reads the rows it holds from it."""
        if self.cfg.checkpoint.resume == "never":
            return False
        found = checkpoint.load_latest(self.run_dir) if self.env.is_main else None
        path = distributed.broadcast_object(self.env, str(found[1]) if found else None)
        if path is None:
            return False
        state = found[0] if found else checkpoint.load_checkpoint_file(Path(path))
        self._check_compatible(state, path)
        if state["best_epoch"] >= 0:  # the best weights first: the latest state is loaded over them
            best = checkpoint.load_best(self.run_dir) if self.env.is_main else None
            best_path = distributed.broadcast_object(self.env, str(best[1]) if best else None)
            if best_path is not None:
                best_state = best[0] if best else checkpoint.load_checkpoint_file(Path(best_path))
                self._load_tables(Path(best_path), best_state, weights_only=True)
                self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        self._load_tables(Path(path), state)
        _load_param_groups(self.opt_sparse, state["opt_sparse_groups"])
        self._keep_started_optim(state)
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
        log.info("resumed from %s at epoch %d step %d", path, self.epoch, self.step_in_epoch)
        return True

    def _keep_started_optim(self, state: dict[str, Any]) -> None:
        """After the saved param groups are loaded: the run keeps the betas it started with (a run from before
        --optim.beta2 existed: torch's 0.999), and its config says so, since config.toml and checkpoints record it.
        The settings read from the config each step that this job's flags change (e.g. a default that moved between
        versions) are named; the learning rates come back with the optimizers' and schedules' states."""
        o = self.cfg.optim
        betas = tuple(self.opt_sparse.param_groups[0]["betas"])
        changed = []
        if betas != (o.beta1, o.beta2):
            changed.append(f"keeps the Adam betas it started with, {betas}, not ({o.beta1}, {o.beta2})")
            o.beta1, o.beta2 = betas
        started = state.get("config", {}).get("optim", {})
        for key in ("reg_factor", "reg_bias", "gravity"):
            if key in started and started[key] != getattr(o, key):
                changed.append(f"continues with optim.{key} {getattr(o, key)} (it started with {started[key]})")
        if changed and self.env.is_main:
            log.warning("resumed run %s", "; ".join(changed))

    def _check_compatible(self, state: dict[str, Any], path: str) -> None:
        hint = "use a new --run-dir, or --checkpoint.resume never to start over"
        if "parts" not in state or "layout" not in state:
            raise ConfigError(f"checkpoint {path} was written by an older mfscale (whole tables in one file); {hint}")
        if state["data_fingerprint"] != self.data.fingerprint:
            raise ConfigError(f"checkpoint {path} was trained on a different dataset; {hint}")
        shape = {"n_users": self.data.n_users, "n_items": self.data.n_items, "dim": self.cfg.model.dim}
        if state["model_shape"] != shape:
            raise ConfigError(f"checkpoint {path} has model shape {state['model_shape']}, this run {shape}; {hint}")
        if state["step_in_epoch"] and (state["world_size"], state["batch_size"], state["layout"]) != (
                self.env.world_size, self.batch_size, self.layout.name):
            raise ConfigError(f"checkpoint {path} stopped mid-epoch with world size {state['world_size']}, batch size "
                              f"{state['batch_size']} and {state['layout']} tables; resume with the same values "
                              "(any world size can resume from an epoch boundary)")

    # ---- training ----------------------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """One optimizer step on this rank's batch; returns the batch's summed squared error."""
        dev = self.device
        user = batch["user"].to(dev, non_blocking=True)
        item = batch["item"].to(dev, non_blocking=True)
        rating = batch["rating"].to(dev, non_blocking=True)
        if isinstance(self.step, AutogradStep):
            self.step.global_step = self.global_step
        sse = self.step(user, item, rating, max(int(batch["global_rows"]), 1))
        for s in self.scheds:
            s.step()
        return sse

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
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {self.epoch}",
                   disable=not (env.is_main and sys.stderr.isatty()), unit="step", dynamic_ncols=True)
        window = {"sse": torch.zeros((), dtype=torch.float64, device=self.device), "rows": 0, "wait": 0.0,
                  "t0": time.perf_counter(), "steps": 0}
        it = self.layout.batches(self.epoch, self.step_in_epoch)
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
        val = evaluate(self.layout, "val", batch_size=cfg.train.eval_batch_size)
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
        tables = self.layout.eval_tables()  # once for all three uses (under blocks an all_gather of movies)
        test = evaluate(self.layout, "test", batch_size=cfg.train.eval_batch_size, tables=tables)
        ranking = ranking_metrics(self.layout, "test", k=cfg.train.ranking_k, tables=tables) \
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
            "tables": self.layout.name,
            "table_bytes_sent": self.layout.bytes_sent,  # by rank 0, in this process, for the tables
            "peak_rss_mib_per_rank": _peak_rss_per_rank(env),
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
            self._projector(monitor, tables[1])
        log.info("done: test rmse %s, best val rmse %s, %s ratings/s", _fmt(metrics["test_rmse"]),
                 _fmt(metrics["best_val_rmse"]), _fmt(metrics["train_ratings_per_s"], ",.0f"))
        return metrics

    def _projector(self, monitor: Monitor, movie_table: torch.Tensor) -> None:
        """Movie embeddings with title/year/genres labels (the most-rated movies, to keep it light)."""
        import polars as pl

        movies = pl.read_parquet(self.data.root / "movies.parquet")
        top = movies.sort("n_train", descending=True).head(10_000)
        idx = torch.tensor(top["item_idx"].to_list(), dtype=torch.long)
        q = movie_table[:, : self.cfg.model.dim]
        labels = [{"title": r["title"] or f"movie {r['movie_id']}", "year": r["year"], "genres": r["genres"],
                   "movie_id": r["movie_id"], "ratings": r["n_train"]} for r in top.iter_rows(named=True)]
        monitor.embeddings(q.detach()[idx.to(q.device)].cpu(), labels, tag="movies", step=self.global_step)


def _peak_rss_per_rank(env: DistEnv) -> list[float]:
    """Each rank's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if not env.distributed:
        return [mine]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, mine)
    return out


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

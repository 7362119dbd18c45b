"""Saving and resuming a training job: what a checkpoint holds, which one to resume, whether it fits this job,
and which settings a resumed run keeps. ``mfscale.checkpoint`` writes and reads the files.

A checkpoint is rank 0's metadata (config, progress, optimizer settings and schedules, RNG states, the global
bias) plus one part per rank that holds rows of its own (``TableLayout.held_rows``). Resume is decided by what
is on disk: the newest valid checkpoint. Any world size and layout can resume from an epoch boundary.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint, distributed
from .config import JobConfig
from .distributed import DistEnv
from .errors import ConfigError, DataError
from .layout import TableLayout
from .optim import STATE_OF, Optimizers
from .step import Step

log = logging.getLogger("mfscale")


def _numpy_rng_state() -> tuple:
    """NumPy's global RNG state with its key array as a tensor (checkpoints hold no NumPy objects)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def _set_numpy_rng_state(state: tuple) -> None:
    name, keys, *rest = state
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))


def keep_started_optimizer(cfg: JobConfig, env: DistEnv) -> None:
    """Before the tables and their optimizer are built: a run that will resume keeps the optimizer and the model
    terms it started with, as it keeps its betas. Adam's moments and RowRMSprop's row state are different things,
    so a run started with one cannot continue with the other; a run started before RowRMSprop became the default
    continues with Adam whatever its command line says. Likewise a run started with or without user-day biases
    (``--model.day_bias``), time-aware biases (``--model.time_bins``, ``--model.user_drift``) or implicit feedback
    (``--model.implicit``) continues so.
    Rank 0 reads the newest checkpoint metadata that loads (all of a run's checkpoints name the same settings;
    damaged or refused files are left to the resume's vote, which reports them) and every rank takes its answer.
    The switched config is validated again (a one-line ConfigError)."""
    if cfg.checkpoint.resume == "never":
        return
    started = None
    if env.is_main:
        for path in reversed(checkpoint.list_checkpoints(Path(cfg.run_dir))):
            try:
                state = checkpoint.load_checkpoint_file(path)
            except Exception:  # damaged or refused: the resume's vote decides and says why
                continue
            saved = state.get("config", {})
            model = saved.get("model", {})
            started = (saved.get("optim", {}).get("optimizer", "lazy_adam"), bool(model.get("day_bias", False)),
                       int(model.get("time_bins", 0)), bool(model.get("user_drift", False)),
                       bool(model.get("implicit", False)))
            break
    if env.distributed and dist.is_initialized():  # (a DistEnv without a process group: tests of setup errors)
        box = [started]
        env.count("broadcast")
        dist.broadcast_object_list(box, src=0)
        started = box[0]
    if started is None:
        return
    optimizer, day_bias, *time = started
    time = list(time) + [0, False, False][len(time):]  # a checkpoint from before these terms existed had none
    changed = False
    if STATE_OF.get(optimizer) is not STATE_OF[cfg.optim.optimizer]:
        if env.is_main:
            log.warning("resumed run keeps the tables' optimizer it started with, %s, not %s", optimizer,
                        cfg.optim.optimizer)
        cfg.optim.optimizer, changed = optimizer, True
    if day_bias != cfg.model.day_bias:
        if env.is_main:
            on_off = {True: "on", False: "off"}
            log.warning("resumed run keeps --model.day_bias %s, as it started, not %s", on_off[day_bias],
                        on_off[cfg.model.day_bias])
        cfg.model.day_bias, changed = day_bias, True
    for name, was in zip(("time_bins", "user_drift", "implicit"), time, strict=True):
        if was != getattr(cfg.model, name):
            if env.is_main:
                log.warning("resumed run keeps --model.%s %s, as it started, not %s", name, was,
                            getattr(cfg.model, name))
            setattr(cfg.model, name, was)
            changed = True
    if changed:
        cfg.validate()  # e.g. --train.step fused with a run started with sparse_adam: one clear line


@dataclass
class Progress:
    """Where the next step starts, early stopping's state and the training clock: what the loop advances."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_val: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    train_ratings: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            setattr(self, f.name, state[f.name])


@dataclass
class Resumed:
    path: Path
    best_weights: dict[str, torch.Tensor] | None  # the model at the best validation so far (early stopping)


class Checkpoints:
    """One job's checkpoints: ``save`` from every rank, ``resume`` on every rank."""

    def __init__(self, cfg: JobConfig, env: DistEnv, layout: TableLayout, optims: Optimizers, step: Step):
        self.cfg, self.env, self.layout, self.optims, self.step = cfg, env, layout, optims, step
        self.run_dir = Path(cfg.run_dir)

    def _state(self, progress: Progress) -> dict[str, Any]:
        """The checkpoint's metadata; the tables and their Adam state go into the layout's parts."""
        lay, data = self.layout, self.layout.data
        return {
            "config": self.cfg.to_dict(),
            "global_bias": lay.model.global_bias.detach().cpu().clone(),
            "model_shape": {"n_users": data.n_users, "n_items": data.n_items, "dim": self.cfg.model.dim},
            "data_fingerprint": data.fingerprint,
            "layout": lay.name, "layout_position": lay.position(),
            **self.optims.state_dict(),
            "scaler": self.step.state_dict(),
            **progress.state_dict(),
            "batch_size": lay.batch_size, "world_size": self.env.world_size,
            "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(), "python": random.getstate()},
        }

    def save(self, progress: Progress, is_best: bool = False) -> None:
        """Every rank with rows of its own writes its part in parallel; rank 0 then writes the metadata."""
        n = self.layout.n_parts
        digest = None
        if self.layout.writes_part():
            part = self.layout.held_rows()
            if self.step.local_bias:  # between sync points each rank's global bias is its own
                part.dense = self.optims.dense_rank_state()
            digest = checkpoint.write_part(self.run_dir, progress.global_step, self.env.rank if n > 1 else 0, n,
                                           part)
        # every part on disk, and its digest with rank 0, before the metadata that makes the checkpoint valid
        digests = [d for d in distributed.gather(self.env, digest) if d is not None]
        self.env.count("barrier")
        if self.env.is_main:
            checkpoint.save_checkpoint(self.run_dir, self._state(progress), step=progress.global_step,
                                       keep_last=self.cfg.checkpoint.keep_last, is_best=is_best, n_parts=n,
                                       parts_sha256=digests)
        if self.env.distributed:
            # No rank starts its next part before rank 0 is done: save_checkpoint removes leftover temp files,
            # and with no collective per step (blocks) a fast rank could be writing its next part by then.
            dist.barrier()

    def _my_parts(self, path: Path, state: dict[str, Any]) -> list[tuple[Path, str | None]]:
        """The parts of a checkpoint this rank reads (its own where layout and world size are the same)."""
        same = state.get("layout") == self.layout.name and state.get("world_size") == self.env.world_size
        return checkpoint.part_paths(path, state, [self.env.rank if self.layout.n_parts > 1 else 0] if same else None)

    def _load_tables(self, path: Path, state: dict[str, Any], weights_only: bool = False) -> dict | None:
        """This rank's rows from the checkpoint's parts, and rank 0's global bias; returns this rank's own
        global-bias state where its part has one (same layout and world size, between sync points)."""
        same = state.get("layout") == self.layout.name and state.get("world_size") == self.env.world_size
        parts = [checkpoint.read_part(p, digest) for p, digest in self._my_parts(path, state)]
        position = state.get("layout_position", {}) if same else {}
        self.layout.load_parts(parts, position, weights_only=weights_only, where=path)
        with torch.no_grad():
            self.layout.model.global_bias.copy_(state["global_bias"])
        return parts[0].dense if same and len(parts) == 1 else None

    def _agreed(self, found: list[tuple[dict, Path]]) -> tuple[dict, Path] | None:
        """The first of rank 0's ``found`` checkpoints (newest first) whose parts every rank can read and verify:
        the ranks vote on each in turn (one collective per checkpoint tried), so none resumes from one checkpoint
        while another falls back to an older one. A skipped checkpoint is named in a warning."""
        paths = distributed.broadcast_object(self.env, [str(p) for _, p in found])
        tried = []
        for k, name in enumerate(paths):
            path = Path(name)
            why = ""
            try:
                state = found[k][0] if self.env.is_main else checkpoint.load_checkpoint_file(path)
                for part, digest in self._my_parts(path, state):
                    checkpoint.verify_part(part, digest)
            except checkpoint.UnsafeCheckpoint:
                raise
            except DataError as exc:
                why = str(exc)
            ok = torch.tensor([0 if why else 1], dtype=torch.int32, device=self.env.device)  # NCCL: on the GPU
            if self.env.distributed:
                self.env.count("all_reduce")
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if ok.item():
                if tried:
                    log.warning("resuming from %s: skipped the newer %s (a rank could not load it)", path.name,
                                ", ".join(tried))
                return state, path
            if why:
                log.warning("rank %d cannot use checkpoint %s: %s", self.env.rank, path.name, why)
            tried.append(path.name)
        if tried:
            raise DataError(f"no checkpoint in {checkpoint.checkpoint_dir(self.run_dir)} can be loaded by every rank "
                            f"(tried {', '.join(tried)}; the reasons are in the warnings above); use "
                            "--checkpoint.resume never or a new --run-dir to start over")
        return None

    def resume(self, progress: Progress) -> Resumed | None:
        """Load the newest checkpoint that every rank can load into the layout, optimizers, step and
        ``progress``; every rank reads the rows it holds from it. None when there is none (or resume never)."""
        if self.cfg.checkpoint.resume == "never":
            return None
        chosen = self._agreed(checkpoint.load_all(self.run_dir) if self.env.is_main else [])
        if chosen is None:
            return None
        state, path = chosen
        self._check_compatible(state, path)
        best_weights = None
        if state["best_epoch"] >= 0:  # the best weights first: the latest state is loaded over them
            best = checkpoint.load_best(self.run_dir) if self.env.is_main else None
            try:
                best = self._agreed([best] if best else [])
            except DataError as exc:  # the run goes on; only the best weights (early stopping) are lost
                log.warning("the best weights cannot be restored (%s); early stopping keeps the latest", exc)
                best = None
            if best is not None:
                self._load_tables(best[1], best[0], weights_only=True)
                best_weights = self.layout.weights()
        own_bias = self._load_tables(path, state)
        self.optims.load_state_dict(state)
        if own_bias is not None:
            self.optims.load_dense_rank_state(own_bias)
        self._keep_started_settings(state)
        self.step.load_state_dict(state["scaler"])
        progress.load_state_dict(state)
        torch.set_rng_state(state["rng"]["torch"])
        _set_numpy_rng_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        log.info("resumed from %s at epoch %d step %d", path, progress.epoch, progress.step_in_epoch)
        return Resumed(path, best_weights)

    def _keep_started_settings(self, state: dict[str, Any]) -> None:
        """After the saved optimizer settings are loaded: the run keeps the betas it started with (a run from
        before --optim.beta2 existed: torch's 0.999), and its config says so, since config.toml and checkpoints
        record it. The settings read from the config each step that this job's flags change (e.g. a default that
        moved between versions) are named; the learning rates come back with the optimizers' and schedules'
        states."""
        o = self.cfg.optim
        betas = self.optims.betas
        changed = []
        if betas != (o.beta1, o.beta2):
            changed.append(f"keeps the betas it started with, {betas}, not ({o.beta1}, {o.beta2})")
            o.beta1, o.beta2 = betas
        started = state.get("config", {}).get("optim", {})
        for key in ("reg_factor", "reg_bias", "gravity"):
            if key in started and started[key] != getattr(o, key):
                changed.append(f"continues with optim.{key} {getattr(o, key)} (it started with {started[key]})")
        started_norm = state.get("config", {}).get("model", {}).get("max_norm", 0.0)
        if started_norm != self.cfg.model.max_norm:
            changed.append(f"continues with model.max_norm {self.cfg.model.max_norm} (it started with {started_norm})")
        if changed and self.env.is_main:
            log.warning("resumed run %s", "; ".join(changed))

    def _check_compatible(self, state: dict[str, Any], path: Path) -> None:
        hint = "use a new --run-dir, or --checkpoint.resume never to start over"
        data = self.layout.data
        if "parts" not in state or "layout" not in state:
            raise ConfigError(f"checkpoint {path} was written by an older mfscale (whole tables in one file); {hint}")
        if state["data_fingerprint"] != data.fingerprint:
            raise ConfigError(f"checkpoint {path} was trained on a different dataset; {hint}")
        # Biases on and off are different models (off holds the bias columns at 0): no run switches midway.
        started = bool(state.get("config", {}).get("model", {}).get("biases", True))
        if started != self.cfg.model.biases:
            on_off = {True: "on", False: "off"}
            raise ConfigError(f"checkpoint {path} was trained with --model.biases {on_off[started]}, this run has "
                              f"--model.biases {on_off[self.cfg.model.biases]}; {hint}")
        # Adam's moments and RowRMSprop's row state are different things: no run switches between them midway
        # (keep_started_optimizer has chosen the run's optimizer; this holds if the checkpoints disagree).
        started_opt = state.get("config", {}).get("optim", {}).get("optimizer", "lazy_adam")
        if STATE_OF.get(started_opt) is not STATE_OF[self.cfg.optim.optimizer]:
            raise ConfigError(f"checkpoint {path} was trained with --optim.optimizer {started_opt}, this run has "
                              f"--optim.optimizer {self.cfg.optim.optimizer}; {hint}")
        shape = {"n_users": data.n_users, "n_items": data.n_items, "dim": self.cfg.model.dim}
        if state["model_shape"] != shape:
            raise ConfigError(f"checkpoint {path} has model shape {state['model_shape']}, this run {shape}; {hint}")
        if state["step_in_epoch"] and (state["world_size"], state["batch_size"], state["layout"]) != (
                self.env.world_size, self.layout.batch_size, self.layout.name):
            raise ConfigError(f"checkpoint {path} stopped mid-epoch with world size {state['world_size']}, batch size "
                              f"{state['batch_size']} and {state['layout']} tables; resume with the same values "
                              "(any world size can resume from an epoch boundary)")

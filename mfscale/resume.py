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
from .errors import ConfigError
from .layout import TableLayout
from .optim import Optimizers
from .step import Step

log = logging.getLogger("mfscale")


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
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }

    def save(self, progress: Progress, is_best: bool = False) -> None:
        """Every rank with rows of its own writes its part in parallel; rank 0 then writes the metadata."""
        n = self.layout.n_parts
        if self.layout.writes_part():
            part = self.layout.held_rows()
            if self.step.local_bias:  # between sync points each rank's global bias is its own
                part.dense = self.optims.dense_rank_state()
            checkpoint.write_part(self.run_dir, progress.global_step, self.env.rank if n > 1 else 0, n, part)
        self.env.count("barrier", 2)
        if self.env.distributed:
            dist.barrier()  # all parts on disk before the metadata that makes the checkpoint valid
        if self.env.is_main:
            checkpoint.save_checkpoint(self.run_dir, self._state(progress), step=progress.global_step,
                                       keep_last=self.cfg.checkpoint.keep_last, is_best=is_best, n_parts=n)
        if self.env.distributed:
            # No rank starts its next part before rank 0 is done: save_checkpoint removes leftover temp files,
            # and with no collective per step (blocks) a fast rank could be writing its next part by then.
            dist.barrier()

    def _load_tables(self, path: Path, state: dict[str, Any], weights_only: bool = False) -> dict | None:
        """This rank's rows from the checkpoint's parts, and rank 0's global bias; returns this rank's own
        global-bias state where its part has one (same layout and world size, between sync points)."""
        same = state.get("layout") == self.layout.name and state.get("world_size") == self.env.world_size
        which = [self.env.rank if self.layout.n_parts > 1 else 0] if same else None
        parts = [checkpoint.read_part(p) for p in checkpoint.part_paths(path, state, which)]
        position = state.get("layout_position", {}) if same else {}
        self.layout.load_parts(parts, position, weights_only=weights_only, where=path)
        with torch.no_grad():
            self.layout.model.global_bias.copy_(state["global_bias"])
        return parts[0].dense if same and len(parts) == 1 else None

    def _chosen(self, found: tuple[dict, Path] | None) -> tuple[dict, Path] | None:
        """Rank 0's find on every rank (the others load the file rank 0 chose)."""
        path = distributed.broadcast_object(self.env, str(found[1]) if found else None)
        if path is None:
            return None
        return found or (checkpoint.load_checkpoint_file(Path(path)), Path(path))

    def resume(self, progress: Progress) -> Resumed | None:
        """Load the newest valid checkpoint that rank 0 finds into the layout, optimizers, step and
        ``progress``; every rank reads the rows it holds from it. None when there is none (or resume never)."""
        if self.cfg.checkpoint.resume == "never":
            return None
        chosen = self._chosen(checkpoint.load_latest(self.run_dir) if self.env.is_main else None)
        if chosen is None:
            return None
        state, path = chosen
        self._check_compatible(state, path)
        best_weights = None
        if state["best_epoch"] >= 0:  # the best weights first: the latest state is loaded over them
            best = self._chosen(checkpoint.load_best(self.run_dir) if self.env.is_main else None)
            if best is not None:
                self._load_tables(best[1], best[0], weights_only=True)
                best_weights = {k: v.detach().cpu().clone() for k, v in self.layout.model.state_dict().items()}
        own_bias = self._load_tables(path, state)
        self.optims.load_state_dict(state)
        if own_bias is not None:
            self.optims.load_dense_rank_state(own_bias)
        self._keep_started_settings(state)
        self.step.load_state_dict(state["scaler"])
        progress.load_state_dict(state)
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
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
            changed.append(f"keeps the Adam betas it started with, {betas}, not ({o.beta1}, {o.beta2})")
            o.beta1, o.beta2 = betas
        started = state.get("config", {}).get("optim", {})
        for key in ("reg_factor", "reg_bias", "gravity"):
            if key in started and started[key] != getattr(o, key):
                changed.append(f"continues with optim.{key} {getattr(o, key)} (it started with {started[key]})")
        if changed and self.env.is_main:
            log.warning("resumed run %s", "; ".join(changed))

    def _check_compatible(self, state: dict[str, Any], path: Path) -> None:
        hint = "use a new --run-dir, or --checkpoint.resume never to start over"
        data = self.layout.data
        if "parts" not in state or "layout" not in state:
            raise ConfigError(f"checkpoint {path} was written by an older mfscale (whole tables in one file); {hint}")
        if state["data_fingerprint"] != data.fingerprint:
            raise ConfigError(f"checkpoint {path} was trained on a different dataset; {hint}")
        shape = {"n_users": data.n_users, "n_items": data.n_items, "dim": self.cfg.model.dim}
        if state["model_shape"] != shape:
            raise ConfigError(f"checkpoint {path} has model shape {state['model_shape']}, this run {shape}; {hint}")
        if state["step_in_epoch"] and (state["world_size"], state["batch_size"], state["layout"]) != (
                self.env.world_size, self.layout.batch_size, self.layout.name):
            raise ConfigError(f"checkpoint {path} stopped mid-epoch with world size {state['world_size']}, batch size "
                              f"{state['batch_size']} and {state['layout']} tables; resume with the same values "
                              "(any world size can resume from an epoch boundary)")

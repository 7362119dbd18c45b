"""Load a finished (or in-progress) training run for the user-facing tools: model, id maps, metadata.

Shared by ``mfscale.recommend``, ``mfscale.analyze`` and ``mfscale.export`` so every tool picks the same
checkpoint (``best.pt`` when present, else the newest valid step checkpoint) and reports a missing run,
a run without a model, or a missing dataset the same way: one :class:`~mfscale.errors.DataError` line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch

from . import checkpoint
from .config import OptimConfig
from .errors import DataError
from .model import BiasedMF
from .shards import Dataset


@dataclass
class Run:
    """A run's model on CPU plus the dataset it was trained on (rows of ``users``/``movies`` = table rows)."""

    run_dir: Path
    checkpoint_path: Path
    step: int
    model: BiasedMF
    data: Dataset
    users: pl.DataFrame  # sorted by user_idx: user_idx, user_id, n_train, n_ratings
    movies: pl.DataFrame  # sorted by item_idx: item_idx, movie_id, n_train, n_ratings, title, genres, year

    max_norm: float = 0.0  # the run's --model.max_norm (0: none); the model's vectors are already capped
    # the run's per-rating L2 weights (--optim.reg_factor, --optim.reg_bias): the fold-in solves the same objective
    reg_factor: float = 0.0
    reg_bias: float = 0.0
    checkpoint_state: dict = field(default_factory=dict, repr=False)  # the checkpoint's metadata (its parts' paths)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def rating_range(self) -> tuple[float, float]:
        return self.data.rating_range

    def item_factors(self) -> np.ndarray:
        return self.model.factors()[2].detach().numpy()

    def user_index(self, user_id: int) -> int:
        """Table row of an original (MovieLens) user id; DataError when the dataset has no such user."""
        ids = self.users["user_id"].to_numpy()
        pos = int(np.searchsorted(ids, user_id))  # ids are encoded in sorted order by mfscale.prepare
        if pos >= len(ids) or ids[pos] != user_id:
            raise DataError(f"unknown user id {user_id}: not in {self.data.root} "
                            f"({len(ids):,} users, ids {ids[0]}..{ids[-1]})")
        return pos

    def day_biases(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The run's user-day biases (``--model.day_bias``): sorted ``daybias.day_key`` keys (global user index
        << 20 | day) and their biases, or None for a run without them. Read from the checkpoint's parts on call."""
        return checkpoint.day_biases(self.checkpoint_path, self.checkpoint_state, self._cache.get("parts"))

    def at_latest_time(self) -> Run:
        """This run as ``recommend`` predicts without a time, in place: with ``--model.time_bins`` each movie's bias
        gains its last bin's (its most recent popularity: a recommendation is made after the training ratings),
        which reorders top-N lists as the bins meant; a user's drift is left out (it moves all of the user's
        predictions alike, and extrapolated past the training span it would grow without bound). Returns itself."""
        model_cfg = (self.checkpoint_state.get("config") or {}).get("model") or {}
        if not int(model_cfg.get("time_bins", 0) or 0):
            return self
        time = self.time_biases()
        if time is not None and time["bins"].shape[1]:
            w = self.model.items.weight
            with torch.no_grad():
                w[:, self.model.dim] += torch.from_numpy(time["bins"][:, -1]).to(w.dtype)
        return self

    def time_biases(self) -> dict | None:
        """The run's time-aware biases by row (``checkpoint.time_biases``), or None for a run without them."""
        return checkpoint.time_biases(self.checkpoint_path, self.checkpoint_state, self._cache.get("parts"))

    def implicit_rows(self) -> np.ndarray | None:
        """The run's implicit rows y (``--model.implicit``), (movies, dim) float64, or None; read once."""
        if "implicit" not in self._cache:
            model_cfg = (self.checkpoint_state.get("config") or {}).get("model") or {}
            self._cache["implicit"] = (checkpoint.implicit_rows(self.checkpoint_path, self.checkpoint_state,
                                                                self._cache.get("parts"))
                                       if model_cfg.get("implicit") else None)
        return self._cache["implicit"]

    def train_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Training ratings grouped by user as CSR: ``indptr`` (n_users + 1) and the items of each user."""
        train = self.data.read_split("train")
        user, item = train["user"].astype(np.int64), train["item"].astype(np.int64)
        order = np.argsort(user, kind="stable")
        indptr = np.zeros(self.model.users.num_embeddings + 1, dtype=np.int64)
        np.cumsum(np.bincount(user, minlength=self.model.users.num_embeddings), out=indptr[1:])
        return indptr, item[order]


def _load_state(run_dir: Path) -> tuple[dict, Path]:
    # best.pt holds the weights early stopping kept; the newest step checkpoint is the fallback for a run
    # that has not validated yet (no val split, or stopped before the first epoch ended).
    found = checkpoint.load_best(run_dir) or checkpoint.load_latest(run_dir)
    if found is None:
        raise DataError(f"no model in run directory {run_dir}: {checkpoint.checkpoint_dir(run_dir)} has no "
                        "loadable checkpoint (train one with python -m mfscale.train first)")
    return found


def load_run(run_dir: Path | str, data: Path | str | None = None) -> Run:
    """Load ``run_dir``'s model and its dataset (``data`` overrides the path stored in the checkpoint)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory not found: {run_dir}")
    state, path = _load_state(run_dir)
    try:
        shape = state["model_shape"]
        data_path = data if data is not None else state["config"]["data"]["path"]
        # read once: the model, then the extra terms the tools ask for (kept without the tables' rows)
        parts = checkpoint.read_parts(path, state) if "parts" in state else None
        model = checkpoint.load_model(path, state, parts)
        extras = None if parts is None else [
            dataclasses.replace(p, tables={}, dense=None,  # and of the implicit rows only y (fold-in's)
                                implicit=None if p.implicit is None else {"items": p.implicit["items"]})
            for p in parts]
    except (KeyError, TypeError) as exc:
        raise DataError(f"checkpoint {path} lacks {exc} (not written by mfscale.train?)") from None
    try:
        dataset = Dataset(data_path)
    except DataError as exc:
        hint = "" if data is not None else " (the path stored in the run's config; pass --data DIR to override)"
        raise DataError(f"{exc}{hint}") from None
    if (dataset.n_users, dataset.n_items) != (shape["n_users"], shape["n_items"]):
        raise DataError(f"dataset {dataset.root} has {dataset.n_users:,} users and {dataset.n_items:,} movies but "
                        f"the model in {path} has {shape['n_users']:,} and {shape['n_items']:,}: not the data it "
                        "was trained on")
    users = pl.read_parquet(dataset.root / "users.parquet").sort("user_idx")
    movies = pl.read_parquet(dataset.root / "movies.parquet").sort("item_idx")
    cfg = state.get("config") or {}
    max_norm = float((cfg.get("model") or {}).get("max_norm", 0.0) or 0.0)
    defaults = OptimConfig()
    optim = cfg.get("optim") or {}
    return Run(run_dir=run_dir, checkpoint_path=path, step=int(state.get("global_step", 0) or 0), model=model,
               data=dataset, users=users, movies=movies, max_norm=max_norm,
               reg_factor=float(optim.get("reg_factor", defaults.reg_factor)),
               reg_bias=float(optim.get("reg_bias", defaults.reg_bias)), checkpoint_state=state,
               _cache={} if extras is None else {"parts": extras})


def movie_label(row: dict) -> str:
    """A movie's display title; datasets prepared without movie metadata have no titles."""
    return row.get("title") or f"movie {row['movie_id']}"

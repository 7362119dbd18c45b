"""Crash-safe training checkpoints: atomic writes, pruning, and resume from the newest valid file.

Layout inside a run directory::

    checkpoints/step-0000001200.pt     one per save (metadata), the newest ``keep_last`` are kept
    checkpoints/step-0000001200.part-0-of-2.pt   its table parts, one per rank that holds rows of its own
    checkpoints/best.pt                the best one so far (``is_best``), never pruned
    checkpoints/best-0000001200.part-0-of-2.pt   the best one's parts
    checkpoints/.tmp-*                 in-flight writes; leftovers from a killed run go on the next save

Ranks write their parts in parallel (``write_part``); after a barrier rank 0 writes the metadata, which lists
the parts. A checkpoint is valid only when its metadata loads and every part it lists exists (parts are
written atomically, so existing means complete): a crash during a save leaves the previous one valid.

Every file is written to a temporary name in the same directory, flushed and fsync'ed, then moved into
place with ``os.replace`` (atomic on POSIX), so a reader never sees a half-written file under a final
name. The payload wraps the caller's ``state`` in a small record (``{"mfscale_checkpoint": 1, "step":
..., "state": ...}``); a file that fails to load or lacks the record (truncated by a full disk,
garbage, a foreign file) is reported and skipped, and :func:`load_latest` falls back to the previous one.

**Nothing is unpickled.** Every file is read with ``torch.load(weights_only=True)``: tensors, numbers,
strings, lists, tuples and dicts only, so a crafted file cannot run code; a file that holds anything else is
refused (:class:`UnsafeCheckpoint`). Checkpoints written before December 2026 hold NumPy's RNG state as an array
and are refused the same way; ``python -m mfscale.checkpoint convert RUN_DIR`` rewrites them, for files the
user trusts. Each part's sha256 is in its metadata (``parts_sha256``), so a damaged part is found before it is
used.

Whether a run resumes is decided only by what is on disk here, never by the launcher's restart count
(``TORCHELASTIC_RESTART_COUNT``): a first attempt may find checkpoints of an earlier job and a restart
may find none. These functions are called by rank 0 only; the caller broadcasts or barriers.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import math
import os
import pickle
import re
import shutil
import sys
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, DataError, cli_entry, disk_full, is_disk_full
from .model import BiasedMF, capped
from .shards import file_digest

CKPT_DIR = "checkpoints"
BEST_NAME = "best.pt"
TMP_PREFIX = ".tmp-"
FORMAT_KEY = "mfscale_checkpoint"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)\.pt$")
_PART_RE = re.compile(r"^(step|best)-(\d+)\.part-\d+-of-\d+\.pt$")


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint file could not be loaded and was skipped."""


class UnsafeCheckpoint(DataError):
    """A file holds Python objects other than tensors and plain data: loading it could run code."""


def _safe_load(source: Path | bytes, name: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; a file that needs more is refused (UnsafeCheckpoint)."""
    try:
        return torch.load(io.BytesIO(source) if isinstance(source, bytes) else source, map_location="cpu",
                          weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # garbage or a truncated file, not a disallowed object
            raise ValueError("not a torch file, or a damaged one") from None
        raise UnsafeCheckpoint(
            f"{name} holds Python objects besides tensors and plain data, and mfscale does not unpickle them (that "
            f"could run code); if mfscale wrote it before 2026-12 and you trust it: python -m mfscale.checkpoint "
            f"convert {_run_dir_of(name)}") from None


def _run_dir_of(path: Path) -> Path:
    return Path(path).parent.parent if Path(path).parent.name == CKPT_DIR else Path(path).parent


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CKPT_DIR


def step_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:010d}.pt"


def best_path(run_dir: Path) -> Path:
    return checkpoint_dir(run_dir) / BEST_NAME


def part_name(step: int, k: int, n: int, prefix: str = "step") -> str:
    return f"{prefix}-{step:010d}.part-{k}-of-{n}.pt"


TABLES = ("users", "items")  # the two tables, by the model's attribute names (also the keys on disk)


@dataclass
class TableRows:
    """One table's rows in a checkpoint part: their global row ids, the rows, their optimizer state by name (one
    row per table row: Adam's ``exp_avg`` and ``exp_avg_sq``, or RowRMSprop's ``row_sq``; empty when the part
    holds weights only) and the table's optimizer step count. Rows a rank holds are written by it alone, so the
    parts of one checkpoint hold every row of every table exactly once."""

    ids: torch.Tensor
    weight: torch.Tensor
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"ids": self.ids, "weight": self.weight, **self.state, "step": int(self.step)}

    @classmethod
    def from_dict(cls, d: Any) -> TableRows:
        if not isinstance(d, dict) or not isinstance(d.get("ids"), torch.Tensor) \
                or not isinstance(d.get("weight"), torch.Tensor) or len(d["ids"]) != len(d["weight"]):
            raise ValueError("a table of the part lacks matching ids and weight rows")
        # Older parts name Adam's two moments, None when weights only; any other tensor is state too.
        state = {k: v for k, v in d.items() if k not in ("ids", "weight", "step") and v is not None}
        if any(not isinstance(v, torch.Tensor) or len(v) != len(d["ids"]) for v in state.values()):
            raise ValueError("a table of the part has optimizer state that does not match its rows")
        return cls(d["ids"], d["weight"], state, int(d.get("step", 0)))


@dataclass
class Part:
    """One rank's piece of a checkpoint: its rows of each table (``tables``, keyed by TABLES) and, where the
    ranks keep their own copies of the global bias between sub-epoch ends (blocks), this rank's global bias
    and its Adam state (``dense``: ``value``, ``step``, ``exp_avg``, ``exp_avg_sq``); None elsewhere. ``days``:
    the user-day biases of this rank's users (``--model.day_bias``; ids are ``daybias.day_key`` keys), or None.
    ``time``: the time-aware biases (``--model.time_bins`` / ``user_drift``; ``timebias.TimeBias.to_rows``): ``items``
    and ``users`` tables with the same ids as ``tables``' and ``span`` = [first day, last day, bins]; or None.
    ``implicit``: SVD++'s implicit rows (``--model.implicit``; ``implicit.Implicit.to_rows``): ``items`` ([y, 1 / D])
    and ``users`` ([z, z']) tables with the same ids as ``tables``'; or None."""

    tables: dict[str, TableRows]
    dense: dict[str, torch.Tensor] | None = None
    days: TableRows | None = None
    time: dict[str, Any] | None = None
    implicit: dict[str, TableRows] | None = None


def write_part(run_dir: Path, step: int, k: int, n: int, part: Part) -> str:
    """Write part ``k`` of ``n`` of the checkpoint for ``step`` atomically (any rank, before the metadata);
    returns the file's sha256, for the metadata."""
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {name: part.tables[name].to_dict() for name in TABLES}
    if part.dense is not None:
        payload["dense"] = part.dense
    if part.days is not None:
        payload["days"] = part.days.to_dict()
    if part.time is not None:
        payload["time"] = {name: part.time[name].to_dict() for name in TABLES} | {"span": part.time["span"]}
    if part.implicit is not None:
        payload["implicit"] = {name: part.implicit[name].to_dict() for name in TABLES}
    return _atomic_torch_save({FORMAT_KEY: FORMAT_VERSION, "step": step, "part": payload},
                              directory / part_name(step, k, n))


def verify_part(path: Path, sha256: str | None) -> bytes:
    """The part file's bytes, checked against its recorded sha256 (None: a checkpoint from before checksums)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot load checkpoint part {path}: {_reason(exc)}") from exc
    if sha256 is not None and (got := hashlib.sha256(data).hexdigest()) != sha256:
        raise DataError(f"checkpoint part {path} is damaged (sha256 {got[:16]}..., its checkpoint says "
                        f"{sha256[:16]}...)")
    return data


def read_part(path: Path, sha256: str | None = None) -> Part:
    """The one reader of checkpoint parts, checked against ``sha256`` where given; DataError naming the file
    when it cannot be loaded (UnsafeCheckpoint when it holds more than tensors and plain data)."""
    data = verify_part(path, sha256)
    try:
        payload = _safe_load(data, path)
        if not isinstance(payload, dict) or payload.get(FORMAT_KEY) != FORMAT_VERSION or "part" not in payload:
            raise ValueError("not an mfscale checkpoint part")
        body = payload["part"]
        days = TableRows.from_dict(body["days"]) if "days" in body else None
        implicit = body.get("implicit")
        return Part({name: TableRows.from_dict(body.get(name)) for name in TABLES}, body.get("dense"), days,
                    _time_tables(body["time"]) if "time" in body else None,
                    None if implicit is None else {name: TableRows.from_dict(implicit.get(name)) for name in TABLES})
    except UnsafeCheckpoint:
        raise
    except Exception as exc:
        raise DataError(f"cannot load checkpoint part {path}: {_reason(exc)}") from exc


def _time_tables(d: Any) -> dict[str, Any]:
    """A part's time-aware biases (``Part.time``), checked for shape."""
    span = d.get("span") if isinstance(d, dict) else None
    if not isinstance(span, torch.Tensor) or span.shape != (3,):
        raise ValueError("its time-aware biases lack their span")
    return {name: TableRows.from_dict(d.get(name)) for name in TABLES} | {"span": span}


def part_sha256(state: dict, k: int) -> str | None:
    """The recorded sha256 of the checkpoint's k-th part (None for a checkpoint from before checksums)."""
    digests = state.get("parts_sha256")
    return digests[k] if digests else None


def part_paths(path: Path, state: dict, which: list[int] | None = None) -> list[tuple[Path, str | None]]:
    """The part files (with their recorded sha256) of the checkpoint whose metadata ``state`` was loaded from
    ``path`` (``which``: some)."""
    names = state.get("parts", [])
    return [(Path(path).parent / names[k], part_sha256(state, k))
            for k in (range(len(names)) if which is None else which)]


def check_complete(filled: dict[str, np.ndarray], where: object) -> None:
    """The one completeness check: every row of each table (``filled[name]``, a mask) came from some part."""
    for name, f in filled.items():
        if not f.all():
            raise DataError(f"checkpoint {where} is incomplete: {int((~f).sum()):,} rows of the {name} table are "
                            "in none of its parts")


def read_parts(path: Path, state: dict) -> list[Part]:
    """Every part of the checkpoint whose metadata ``state`` was loaded from ``path``, each checked and read once
    (the readers below take them, so a tool that wants the model and its extra terms reads the files once)."""
    return [read_part(p, d) for p, d in part_paths(path, state)]


def _parts(path: Path, state: dict, parts: list[Part] | None) -> list[Part]:
    return read_parts(path, state) if parts is None else parts


def assemble(path: Path, state: dict, optimizer: bool = False, parts: list[Part] | None = None
             ) -> dict[str, torch.Tensor]:
    """Whole tables of a checkpoint, by global row id, from all its parts: ``users.weight``, ``items.weight``,
    ``global_bias`` and, with ``optimizer``, its state (``users.exp_avg``, ``users.exp_avg_sq``, ... or
    ``users.row_sq``, ...). DataError when a
    row is in no part. Needs the whole tables in this process. A checkpoint from before parts existed gives
    its weights (no optimizer state)."""
    if "parts" not in state and "model" in state:  # written before table parts existed: whole tables inside
        return {k: v for k, v in state["model"].items()}
    shape = state["model_shape"]
    rows = {"users": shape["n_users"], "items": shape["n_items"]}
    out: dict[str, torch.Tensor] = {}
    filled = {name: np.zeros(n, dtype=bool) for name, n in rows.items()}
    for part in _parts(path, state, parts):
        for name, n in rows.items():
            t = part.tables[name]
            filled[name][t.ids.numpy()] = True
            for key, value in {"weight": t.weight, **(t.state if optimizer else {})}.items():
                full = out.setdefault(f"{name}.{key}", torch.full((n, value.shape[1]), math.nan, dtype=value.dtype))
                full[t.ids] = value
    check_complete(filled, path)
    out["global_bias"] = state["global_bias"]
    return out


def day_biases(path: Path, state: dict, parts: list[Part] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """A checkpoint's user-day biases from all its parts: (sorted ``daybias.day_key`` keys, biases), or None for a
    run without them. The tools' models leave them out (a user's day bias moves all of that day's predictions alike,
    so it never reorders a top-N list, and a prediction without a time has none); ``export`` writes them out."""
    found = [part.days for part in _parts(path, state, parts) if part.days is not None]
    if not found:
        return None
    keys = np.concatenate([t.ids.numpy() for t in found])
    values = np.concatenate([t.weight[:, 0].numpy() for t in found])
    order = np.argsort(keys, kind="stable")
    return keys[order], values[order]


def time_biases(path: Path, state: dict, parts: list[Part] | None = None) -> dict[str, Any] | None:
    """A checkpoint's time-aware biases (``--model.time_bins`` / ``user_drift``; mfscale/timebias.py) by global id,
    from all its parts: ``bins`` (movies, B), ``alpha`` and ``mean_day`` (users,), the bins' ``first`` and ``last``
    day and whether the run had the drift (``drift``); None for a run without them."""
    parts = [part.time for part in _parts(path, state, parts) if part.time is not None]
    if not parts:
        return None
    shape = state["model_shape"]
    first, last, k = (int(x) for x in parts[0]["span"])
    out = {"bins": np.zeros((shape["n_items"], k), np.float64), "alpha": np.zeros(shape["n_users"], np.float64),
           "mean_day": np.zeros(shape["n_users"], np.float64), "first": first, "last": last,
           "drift": bool(((state.get("config") or {}).get("model") or {}).get("user_drift", False))}
    for t in parts:
        items, users = t["items"], t["users"]
        out["bins"][items.ids.numpy()] = items.weight.numpy()
        out["alpha"][users.ids.numpy()] = users.weight[:, 0].numpy()
        out["mean_day"][users.ids.numpy()] = users.state["mean_day"][:, 0].numpy()
    return out


def implicit_rows(path: Path, state: dict, parts: list[Part] | None = None) -> np.ndarray | None:
    """A checkpoint's implicit rows y (``--model.implicit``; mfscale/implicit.py), (movies, dim) by global movie id
    from all its parts, or None for a run without them (a new user's fold-in is pulled toward their sum)."""
    parts = [part.implicit for part in _parts(path, state, parts) if part.implicit is not None]
    if not parts:
        return None
    dim = int(state["model_shape"]["dim"])
    out = np.zeros((state["model_shape"]["n_items"], dim), np.float64)
    for t in parts:
        out[t["items"].ids.numpy()] = t["items"].weight[:, :dim].double().numpy()
    return out


def load_model(path: Path, state: dict, parts: list[Part] | None = None) -> BiasedMF:
    """The whole model of a checkpoint, on CPU, from its parts (each rank's rows, any layout).

    The whole tables are built in this process's memory (without Adam state: (users + movies) x (dim + 1)
    floats, 75 MB for ML-32M at dim 64); a model too large for one machine's memory cannot be loaded here.

    The model options saved with the run's config (issue 24) apply: without biases (``model.biases`` false) the
    bias columns and the global bias are 0, whatever the file holds; with ``model.max_norm`` every factor vector
    is renormalized as ``nn.Embedding(max_norm=...)``'s lookup would before use, so the tools (recommend, analyze,
    export) see the vectors the run's predictions use.
    """
    shape = state["model_shape"]
    opts = (state.get("config") or {}).get("model") or {}  # checkpoints from before issue 24: biases, no bound
    model = BiasedMF(shape["n_users"], shape["n_items"], shape["dim"], init_std=0.0,
                     biases=bool(opts.get("biases", True)))
    model.load_state_dict({k: v.to(torch.get_default_dtype()) for k, v in assemble(path, state, parts=parts).items()})
    with torch.no_grad():
        if not model.biases:
            model.global_bias.zero_()
            for table in model.sparse_parameters():
                table[:, -1] = 0.0
        max_norm = float(opts.get("max_norm", 0.0) or 0.0)
        if max_norm:
            for table in model.sparse_parameters():
                table.copy_(capped(table, max_norm))
    return model.eval().requires_grad_(False)


def save_whole_model(run_dir: Path, state: dict, users: torch.Tensor, items: torch.Tensor,
                     global_bias: torch.Tensor, *, step: int, is_best: bool = False) -> Path:
    """A checkpoint of whole tables (no optimizer state) in one part: a model made outside training."""
    part = Part({name: TableRows(torch.arange(len(w)), w) for name, w in (("users", users), ("items", items))})
    digest = write_part(run_dir, step, 0, 1, part)
    return save_checkpoint(run_dir, {**state, "global_bias": global_bias}, step=step, is_best=is_best, n_parts=1,
                           parts_sha256=[digest])


def _step_of(path: Path) -> int | None:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def _fsync_dir(directory: Path) -> None:
    """Make renames/unlinks in ``directory`` durable; best effort (not all platforms allow it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_path(directory: Path, final_name: str) -> Path:
    return directory / f"{TMP_PREFIX}{final_name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _remove_stale_tmp(directory: Path) -> None:
    for p in directory.glob(f"{TMP_PREFIX}*"):
        if p.is_file() or p.is_symlink():
            _unlink_quietly(p)


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes what passes through it (torch.save writes a zip sequentially)."""

    def __init__(self, f: Any):
        super().__init__()
        self.f, self.h = f, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.h.update(b)
        return self.f.write(b)


def _nbytes(obj: Any) -> int:
    """The tensor bytes in ``obj`` (what a checkpoint file needs, give or take its small metadata)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _atomic_torch_save(obj: Any, final: Path) -> str:
    """Write ``obj`` atomically; returns the file's sha256, hashed as it is written (no second read). A full
    disk is one line (errors.disk_full) with the bytes needed and free; the temp file goes, the old files stay."""
    tmp = _tmp_path(final.parent, final.name)
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(obj, writer)
            digest = writer.h.hexdigest()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as exc:
        full = isinstance(exc, Exception) and is_disk_full(exc, final.parent)  # asked before the file goes
        _unlink_quietly(tmp)
        if full:
            raise disk_full(final.parent, _nbytes(obj) + 4096, f"writing {final.name}", exc=exc, about=True
                            ) from None
        raise
    _fsync_dir(final.parent)
    return digest


def _atomic_copy(src: Path, final: Path) -> None:
    """Publish a copy of an already complete file ``src`` under ``final`` atomically."""
    tmp = _tmp_path(final.parent, final.name)
    try:
        try:
            os.link(src, tmp)  # same bytes, no second serialization; files are never modified in place
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(final.parent)


def save_checkpoint(run_dir: Path, state: dict, *, step: int, keep_last: int = 3, is_best: bool = False,
                    n_parts: int = 0, parts_sha256: list[str] | None = None) -> Path:
    """Write ``state`` as ``checkpoints/step-{step:010d}.pt`` atomically and return its path.

    ``n_parts``: how many parts (``write_part``) of this step were written before; their names go into the
    metadata, and a missing one is an error.

    Also publishes it as ``best.pt`` when ``is_best``. Then prunes: step checkpoints older than the
    newest ``keep_last`` are deleted, and so are any with a step *greater* than ``step`` -- those belong
    to a timeline abandoned by resuming from an earlier checkpoint, and leaving them would make the next
    resume jump to them. Pruning happens only after the new file is in place, so a crash at any point
    leaves at least the previous valid checkpoint. ``best.pt`` is never pruned.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ConfigError(f"keep_last must be an integer >= 1, got {keep_last!r}")
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")

    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(directory)  # callers write parts before this, all of them finished (a barrier)

    n = int(n_parts)
    if n:
        state = {**{k: v for k, v in state.items() if k != "parts_sha256"},
                 "parts": [part_name(step, k, n) for k in range(n)]}
        if parts_sha256 is not None:  # best parts are hard links of these: the same digests
            state["parts_sha256"] = list(parts_sha256)
    missing = [p for p in state.get("parts", []) if not (directory / p).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint parts not written: {', '.join(missing)}")
    final = step_path(run_dir, step)
    _atomic_torch_save({FORMAT_KEY: FORMAT_VERSION, "step": step, "state": state}, final)
    if is_best:
        best_parts = [part_name(step, k, n, prefix="best") for k in range(n)]
        for src, dst in zip(state.get("parts", []), best_parts, strict=True):
            _atomic_copy(directory / src, directory / dst)
        best_state = {**state, "parts": best_parts} if n else state
        _atomic_torch_save({FORMAT_KEY: FORMAT_VERSION, "step": step, "state": best_state}, best_path(run_dir))

    existing = list_checkpoints(run_dir)
    older = [p for p in existing if _step_of(p) < step]  # type: ignore[operator]
    doomed = [p for p in existing if _step_of(p) > step]  # type: ignore[operator]
    doomed += older[: max(0, len(older) - (keep_last - 1))]
    for p in doomed:
        _unlink_quietly(p)
    _prune_parts(directory, best_step=step if is_best else None)
    _fsync_dir(directory)
    return final


def _prune_parts(directory: Path, best_step: int | None) -> None:
    """Remove parts whose metadata is gone (pruned, or a save that crashed before its metadata), and best
    parts other than the current best's."""
    if best_step is None and (directory / BEST_NAME).is_file():
        try:
            best_step = _safe_load(directory / BEST_NAME, directory / BEST_NAME)["step"]
        except Exception:
            best_step = None  # an unreadable best.pt keeps its parts; load_best reports it
    for p in directory.iterdir():
        m = _PART_RE.match(p.name)
        if not m:
            continue
        kind, step = m.group(1), int(m.group(2))
        stale = (not (directory / f"step-{step:010d}.pt").is_file()) if kind == "step" else (
            best_step is not None and step != best_step)
        if stale:
            _unlink_quietly(p)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Step-numbered checkpoint files, oldest first (valid or not: validity is checked on load)."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = [(s, p) for p in directory.iterdir() if (s := _step_of(p)) is not None and p.is_file()]
    return [p for _, p in sorted(found)]


def _load(path: Path, map_location: str | torch.device, expect_step: int | None) -> dict:
    payload = _safe_load(path, path)
    if not isinstance(payload, dict) or payload.get(FORMAT_KEY) != FORMAT_VERSION:
        raise ValueError("not an mfscale checkpoint (integrity record missing)")
    state = payload.get("state")
    if not isinstance(state, dict):
        raise ValueError("integrity record has no state dict")
    if expect_step is not None and payload.get("step") != expect_step:
        raise ValueError(f"recorded step {payload.get('step')!r} does not match the file name")
    missing = [p for p in state.get("parts", []) if not (Path(path).parent / p).is_file()]
    if missing:
        raise ValueError(f"parts missing: {', '.join(missing)}")
    return state


def _reason(exc: BaseException) -> str:
    reason = " ".join(f"{type(exc).__name__}: {exc}".split())
    return reason if len(reason) <= 300 else reason[:297] + "..."


def _warn_corrupt(path: Path, exc: BaseException) -> None:
    warnings.warn(f"skipping corrupt checkpoint {path}: {_reason(exc)}", CorruptCheckpointWarning, stacklevel=3)


def load_latest(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[dict, Path] | None:
    """The newest step checkpoint that loads, as ``(state, path)``; None when there is none.

    A corrupt or partial file is skipped with a :class:`CorruptCheckpointWarning` naming it, and the
    previous one is tried.
    """
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return _load(path, map_location, _step_of(path)), path
        except UnsafeCheckpoint:
            raise  # refused, not skipped: an older mfscale's checkpoint (convert it) or a crafted one
        except Exception as exc:  # truncated zip, EOF, missing record ...
            _warn_corrupt(path, exc)
    return None


def load_all(run_dir: Path) -> list[tuple[dict, Path]]:
    """Every step checkpoint whose metadata loads, newest first, as ``(state, path)`` (for a vote among ranks on
    the parts); a corrupt metadata file is skipped with a warning, an unsafe one refused (UnsafeCheckpoint)."""
    out = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            out.append((_load(path, "cpu", _step_of(path)), path))
        except UnsafeCheckpoint:
            raise
        except Exception as exc:
            _warn_corrupt(path, exc)
    return out


def load_checkpoint_file(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """The state in one specific checkpoint file (e.g. the one rank 0 chose, loaded on the other ranks).

    Raises DataError naming the file when it is missing, corrupt or not an mfscale checkpoint.
    """
    path = Path(path)
    try:
        return _load(path, map_location, _step_of(path))
    except UnsafeCheckpoint:
        raise
    except Exception as exc:
        raise DataError(f"cannot load checkpoint {path}: {_reason(exc)}") from exc


def load_best(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[dict, Path] | None:
    """``best.pt`` as ``(state, path)``; None when missing or corrupt (the latter with a warning)."""
    path = best_path(run_dir)
    if not path.is_file():
        return None
    try:
        return _load(path, map_location, None), path
    except UnsafeCheckpoint:
        raise
    except Exception as exc:
        _warn_corrupt(path, exc)
        return None


# ---- converting checkpoints of older mfscale versions (trusted files only) -------------------------------
def _plain(obj: Any) -> Any:
    """``obj`` with NumPy arrays and scalars as tensors and Python numbers (what weights_only loads)."""
    import numpy as np

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def convert(run_dir: Path) -> list[Path]:
    """Rewrite the checkpoints of ``run_dir`` written by an older mfscale so that they load without unpickling:
    NumPy values become tensors and numbers, and each part's sha256 goes into its metadata. Loads them with full
    unpickling: only for files the user trusts. Returns the files rewritten."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        raise DataError(f"no checkpoints to convert: {directory} does not exist")
    done = []
    for path in sorted(directory.glob("*.pt")):
        if _PART_RE.match(path.name):
            continue
        try:
            _safe_load(path, path)
            continue  # loads as it is
        except UnsafeCheckpoint:
            pass
        payload = _plain(torch.load(path, map_location="cpu", weights_only=False))  # trusted by the user
        state = payload.get("state", {}) if isinstance(payload, dict) else {}
        if state.get("parts"):
            state["parts_sha256"] = [file_digest(directory / name) for name in state["parts"]]
        _atomic_torch_save(payload, path)
        _safe_load(path, path)  # now loads without unpickling
        done.append(path)
    return done


@cli_entry("mfscale.checkpoint")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mfscale.checkpoint", description="Checkpoint maintenance.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="rewrite an older mfscale's checkpoints so that they load without "
                                       "unpickling (run it only on checkpoints you trust)")
    c.add_argument("run_dir", type=Path, help="the run directory (its checkpoints/ are rewritten in place)")
    args = p.parse_args(argv)
    done = convert(args.run_dir)
    print(f"converted {len(done)} checkpoint file(s) in {checkpoint_dir(args.run_dir)}" +
          "".join(f"\n  {d.name}" for d in done))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Streaming ratings from the Parquet shards to DDP ranks and DataLoader workers.

The rule, per epoch ``e`` (``N`` rows in the split, ``W`` = world size, ``B`` = batch size):

1. **Virtual sequence.** The split's stripes (``Dataset.stripes``: in a training split bucketed by user, a
   stripe's row groups, one per bucket, in a fixed seeded order; otherwise a row group) are put in a permuted
   order (``np.random.default_rng([seed, e]).permutation``) and concatenated, and the result is rotated left
   by an offset drawn from the same generator in ``[0, N)``, so batch boundaries move between epochs.
   Rows inside a stripe are in a seeded random order (``mfscale.prepare``, ``shards.stripe_order``), so any
   contiguous run of the sequence is a uniform random sample. With ``shuffle=False`` (validation/test) the order is the
   file order and there is no rotation.
2. **Steps.** Every rank takes ``steps = ceil(N / (W*B))`` steps (the same number everywhere, so DDP
   collectives never hang). Global step ``s`` covers ``g_s = min(W*B, N - s*W*B)`` rows, dealt as evenly
   as possible: rank ``r`` gets ``g_s // W + (1 if r < g_s % W else 0)``. All steps but the last give
   every rank exactly ``B`` rows. Every row is used exactly once per epoch across ranks; nothing is
   dropped. Each batch carries ``global_rows = g_s`` so the trainer can divide its summed loss by it and
   ``W`` ranks compute the same gradient as one process on the union of their batches. A batch may be
   empty (only when ``N`` is tiny relative to ``W``); it is still yielded so all ranks step together.
3. **Rank ranges.** Rank ``r`` owns one contiguous range of the virtual sequence, right after the ranges
   of ranks ``0 .. r-1``, as long as the sum of its batch sizes.
4. **Lanes.** Inside the rank's range, batch ``j`` lives in lane ``j % lanes`` at position
   ``j // lanes``; lanes are stored one after another. This layout depends only on
   (seed, epoch, world_size, batch_size, lanes), never on the number of DataLoader workers, so results
   are identical for any ``num_workers``; yet a worker that takes every K-th batch reads a few contiguous
   streams, so consecutive reads of a lane reuse the row group decoded last.
5. **Order and workers.** Batches are yielded in training order ``j = start_step .. steps-1``; with K
   DataLoader workers, worker ``w`` produces every K-th of them starting at the w-th, and the DataLoader
   (which cycles over its workers) hands them back in training order. ``set_epoch(e, start_step)``
   resumes mid-epoch: it yields exactly batches ``start_step..`` of the uninterrupted epoch.

Everything is deterministic in (seed, epoch, world_size, batch_size, lanes, shuffle) and the data.
Batches are whole numpy slices turned into tensors with ``torch.from_numpy``: no per-sample work and no
collation (use ``make_loader``, which sets ``batch_size=None``).

**Resident mode** (``resident=device``): the whole split is read once into tensors on that device (12 bytes
per rating) and each batch is cut from them by the same rule, so the batches are identical to the streamed
ones; nothing is decoded or copied to the device during training. Every rank holds the whole split, since
a rank's range of the virtual sequence moves every epoch. ``resident_fits`` says when that is reasonable.

**Strata** (``strata=(user_block, movie_block)``, resident mode only): the rows are regrouped once, at load,
by stratum (a user block x a movie block), and the strata take the row groups' place in rule 1: permuted and
rotated every epoch. Batches then touch a 1/k share of each table (``RatingStream._regroup``). Rules 2-5 are
unchanged: exactly once per epoch, the same steps on every rank, resumable.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import ConfigError, DataError
from .shards import TRAIN_COLUMNS, Dataset, Stripe, days_of, read_stripe

COLUMNS = TRAIN_COLUMNS
RESIDENT_CPU_MAX_BYTES = 1 << 30  # beyond this, streaming from the page cache costs little in comparison
_DTYPES = {"user": np.int32, "item": np.int32, "rating": np.float32, "timestamp": np.int32, "day_row": np.int32,
           "time_bin": np.int16, "time_dev": np.float32}


class _Epoch:
    """Everything about one epoch's layout for one rank (cheap: O(groups + steps) numbers)."""

    def __init__(self, stream: RatingStream, epoch: int):
        n, w, b = stream.total_rows, stream.world_size, stream.batch_size
        n_groups = len(stream.units)
        if stream.shuffle:
            rng = np.random.default_rng([stream.seed, epoch])
            self.order = rng.permutation(n_groups)
            self.rotation = int(rng.integers(0, n))
        else:
            self.order = np.arange(n_groups)
            self.rotation = 0
        rows = stream.units[self.order]
        # starts[k] = where the k-th group of the permuted order begins in the unrotated concatenation.
        self.starts = np.concatenate([[0], np.cumsum(rows)])

        steps = stream.steps_per_epoch
        last = n - (steps - 1) * w * b  # rows in the final global step (1 .. W*B)

        def rank_rows(r: int) -> int:  # this rank's rows over the whole epoch
            return (steps - 1) * b + last // w + (1 if r < last % w else 0)

        self.global_rows = np.full(steps, w * b, dtype=np.int64)
        self.global_rows[-1] = last
        self.sizes = np.full(steps, b, dtype=np.int64)
        self.sizes[-1] = last // w + (1 if stream.rank < last % w else 0)
        self.rank_start = sum(rank_rows(r) for r in range(stream.rank))
        # Lane-major layout: offsets are the running sum of sizes in (j % lanes, j // lanes) order.
        j = np.arange(steps)
        lane_major = np.lexsort((j // stream.lanes, j % stream.lanes))
        offsets_sorted = np.concatenate([[0], np.cumsum(self.sizes[lane_major])[:-1]])
        self.offsets = np.empty(steps, dtype=np.int64)
        self.offsets[lane_major] = offsets_sorted
        self.n = n

    def pieces(self, start: int, size: int) -> list[tuple[int, int, int]]:
        """(position in the permuted group order, first row, stop row) covering virtual rows [start, +size)."""
        out: list[tuple[int, int, int]] = []
        u = (start + self.rotation) % self.n if self.n else 0
        spans = [(u, u + size)] if u + size <= self.n else [(u, self.n), (0, u + size - self.n)]
        for lo, hi in spans:
            k = int(np.searchsorted(self.starts, lo, side="right")) - 1
            while lo < hi:
                g_lo, g_hi = int(self.starts[k]), int(self.starts[k + 1])
                stop = min(hi, g_hi)
                out.append((k, lo - g_lo, stop - g_lo))
                lo = stop
                k += 1
        return out


class _GroupCache:
    """Decoded row groups: the last two read, plus the last one each lane touched.

    A lane's next batch starts where its previous one ended, so the group a lane read last is the only
    one it can reuse; keeping it per lane avoids re-decoding when one process reads several lanes in turn.
    """

    def __init__(self, groups: list[Stripe], columns: tuple[str, ...] = COLUMNS):
        self.groups, self.columns = groups, columns
        self.recent: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self.lane_last: dict[int, tuple[int, dict[str, np.ndarray]]] = {}

    def get(self, gid: int) -> dict[str, np.ndarray]:
        if gid in self.recent:
            self.recent.move_to_end(gid)
            return self.recent[gid]
        for cached_gid, arrays in self.lane_last.values():
            if cached_gid == gid:
                return arrays
        arrays = read_stripe(self.groups[gid], self.columns)
        self.recent[gid] = arrays
        if len(self.recent) > 2:
            self.recent.popitem(last=False)
        return arrays

    def keep_for_lane(self, lane: int, gid: int) -> None:
        self.lane_last[lane] = (gid, self.get(gid))


class RatingStream(IterableDataset):
    """Batches of (user, item, rating) for one DDP rank; see the module docstring for the dealing rule."""

    def __init__(
        self,
        data: Dataset | str | Path,
        split: str = "train",
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        lanes: int = 8,
        shuffle: bool = True,
        resident: torch.device | str | None = None,
        strata: tuple[np.ndarray, np.ndarray] | None = None,
        day_rows: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
        time_features: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]] | None = None,
    ):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ConfigError(f"world size must be a positive integer, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank!r}")
        if not isinstance(lanes, int) or lanes < 1:
            raise ConfigError(f"lanes must be a positive integer, got {lanes!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        self.data = data if isinstance(data, Dataset) else Dataset(data)
        self.split = split
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.lanes, self.shuffle = seed, lanes, shuffle
        # --model.day_bias: each batch also carries its ratings' user-day bias rows (``day_rows(user, timestamp)``),
        # found once for a resident split, per batch for a streamed one
        self.day_rows = day_rows
        # --model.time_bins / user_drift: each batch also carries its ratings' time bins and drift terms
        # (``time_features(user, day)``: timebias.TimeBias.rating_features)
        self.time_features = time_features
        self.read_columns = COLUMNS + (("timestamp",) if day_rows or time_features else ())
        self.groups = self.data.stripes(split)
        # The units the virtual sequence permutes: stripes (row groups of a split prepared without user
        # buckets), or strata of a resident split (below).
        self.units = np.array([g.rows for g in self.groups], dtype=np.int64)
        self.total_rows = int(self.units.sum())
        if self.total_rows == 0:
            raise DataError(f"{self.data.root}: split {split!r} has no rows")
        self.epoch, self.start_step = 0, 0
        self._layout: _Epoch | None = None
        self._layout_epoch = -1
        self.resident: dict[str, torch.Tensor] | None = None
        if strata is not None and resident is None:
            raise ConfigError("strata need a resident split (the rows are regrouped in memory)")
        if resident is not None:
            self._load_resident(torch.device(resident), strata)

    def _load_resident(self, device: torch.device, strata: tuple[np.ndarray, np.ndarray] | None) -> None:
        # The whole split is read: it is checked, sha256 included, as it is read (Dataset.reading), so a damaged
        # shard is one line here instead of wrong ids or ratings in training. Once per Dataset; off with
        # --data.verify off.
        parts: dict[str, list[np.ndarray]] = {c: [] for c in self.read_columns}
        with self.data.reading((self.split,)):
            for g in self.groups:
                arrays = read_stripe(g, self.read_columns)
                for c in self.read_columns:
                    parts[c].append(arrays[c].astype(_DTYPES[c], copy=False))
        cols = self._with_day_rows({c: np.concatenate(parts[c]) for c in self.read_columns})
        if strata is not None:
            cols = self._regroup(cols, *strata)
        self.resident = {c: torch.from_numpy(v).to(device) for c, v in cols.items()}
        self._group_start = np.concatenate([[0], np.cumsum(self.units)]).astype(np.int64)

    def _with_day_rows(self, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``cols`` with the timestamps replaced by the ratings' user-day bias rows (--model.day_bias) and their time
        features (--model.time_bins / user_drift)."""
        if "timestamp" not in cols:
            return cols
        timestamp = cols.pop("timestamp")
        if self.day_rows is not None:
            cols["day_row"] = self.day_rows(cols["user"], timestamp).astype(np.int32)
        if self.time_features is not None:
            cols.update(self.time_features(cols["user"], days_of(timestamp)))
        return cols

    def _regroup(self, cols: dict[str, np.ndarray], user_block: np.ndarray,
                 item_block: np.ndarray) -> dict[str, np.ndarray]:
        """Sort the rows by stratum (user block x movie block) and make the strata the sequence's units.

        A batch is a contiguous run of the sequence, so it then holds the ratings of one stratum (two where
        it straddles a boundary): the user and movie rows it touches are a 1/k share of each table, and the
        rows of consecutive batches stay in the CPU's caches (LIBMF's FPSGD trains one block at a time for
        the same reason; benchmarks/RESULTS.md). Inside a stratum the rows keep their file order, which
        prepare shuffled; the strata are permuted and the sequence rotated every epoch as row groups were.
        """
        k_items = int(item_block.max()) + 1 if len(item_block) else 1
        key = user_block[cols["user"]].astype(np.int64) * k_items + item_block[cols["item"]]
        order = np.argsort(key, kind="stable")
        units = np.bincount(key, minlength=(int(user_block.max()) + 1 if len(user_block) else 1) * k_items)
        self.units = units[units > 0].astype(np.int64)
        return {c: v[order] for c, v in cols.items()}

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch, identical on every rank."""
        return -(-self.total_rows // (self.world_size * self.batch_size))

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Choose the epoch to iterate next; ``start_step`` = batches of it already consumed (resume)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative integer, got {epoch!r}")
        if not isinstance(start_step, int) or not 0 <= start_step <= self.steps_per_epoch:
            raise ConfigError(f"start step must be in [0, {self.steps_per_epoch}], got {start_step!r}")
        self.epoch, self.start_step = epoch, start_step
        self._epoch_layout(epoch)  # computed here so forked workers inherit it

    def _epoch_layout(self, epoch: int) -> _Epoch:
        if self._layout is None or self._layout_epoch != epoch:
            self._layout, self._layout_epoch = _Epoch(self, epoch), epoch
        return self._layout

    def batch_plan(self, epoch: int) -> list[tuple[int, int, int]]:
        """Per batch j in training order: (offset within this rank's range, size, global_rows)."""
        lay = self._epoch_layout(epoch)
        return [(int(o), int(s), int(g)) for o, s, g in zip(lay.offsets, lay.sizes, lay.global_rows, strict=True)]

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch
        lay = self._epoch_layout(epoch)
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if self.resident is not None:
            if n_workers > 1:
                raise ConfigError("a resident stream is read in the training process: use 0 DataLoader workers")
            yield from self._iter_resident(lay, epoch)
            return
        cache = _GroupCache([self.groups[i] for i in lay.order], self.read_columns)
        for j in range(self.start_step + worker, self.steps_per_epoch, n_workers):
            size = int(lay.sizes[j])
            pieces = lay.pieces(lay.rank_start + int(lay.offsets[j]), size)
            parts = {c: [] for c in self.read_columns}
            for gid, lo, hi in pieces:
                arrays = cache.get(gid)
                for c in self.read_columns:
                    parts[c].append(arrays[c][lo:hi])
            if pieces:
                cache.keep_for_lane(j % self.lanes, pieces[-1][0])
            # concatenate always copies: the tensors own writable memory, not views of a cached group.
            cols = self._with_day_rows({c: (np.concatenate(parts[c]) if parts[c] else np.empty(0, dtype=_DTYPES[c]))
                                        for c in self.read_columns})
            batch: dict = {c: torch.from_numpy(v.astype(_DTYPES[c], copy=False)) for c, v in cols.items()}
            batch.update(global_rows=int(lay.global_rows[j]), epoch=epoch, step=j)
            yield batch

    def _iter_resident(self, lay: _Epoch, epoch: int) -> Iterator[dict]:
        assert self.resident is not None
        for j in range(self.start_step, self.steps_per_epoch):
            spans = [(int(self._group_start[lay.order[k]]) + lo, int(self._group_start[lay.order[k]]) + hi)
                     for k, lo, hi in lay.pieces(lay.rank_start + int(lay.offsets[j]), int(lay.sizes[j]))]
            batch: dict = {}
            for c, col in self.resident.items():
                batch[c] = col[spans[0][0]:spans[0][1]] if len(spans) == 1 else (
                    torch.cat([col[a:b] for a, b in spans]) if spans else col[:0])
            batch.update(global_rows=int(lay.global_rows[j]), epoch=epoch, step=j)
            yield batch

    def __len__(self) -> int:
        """Batches the next iteration yields (all workers together)."""
        return self.steps_per_epoch - self.start_step


def resident_fits(n_rows: int, device: torch.device, local_world_size: int = 1) -> bool:
    """Whether keeping a split resident (12 bytes per rating, on every local rank) is modest for ``device``:
    at most a quarter of the GPU's free memory, or on CPU 1 GiB per rank and an eighth of RAM per machine."""
    need = 12 * n_rows
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need <= free // 4
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    return need <= RESIDENT_CPU_MAX_BYTES and need * local_world_size <= ram // 8


def make_loader(stream: RatingStream, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ready-made batches; output is identical for any ``num_workers``."""
    if num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
    # A private generator: otherwise every iteration draws a base seed from the global torch RNG,
    # which would make the trainer's randomness depend on how often data is iterated.
    generator = torch.Generator()
    generator.manual_seed(stream.seed)
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if num_workers else None,
        multiprocessing_context="fork" if num_workers and sys.platform.startswith("linux") else None,
        generator=generator,
    )

"""How the embedding tables are laid out across ranks, exchanged and updated: one interface, two layouts.

The training loop, evaluation and checkpointing talk to a :class:`TableLayout`; they never ask which one.

- :class:`Replicated`: every rank holds both whole tables and their Adam state. Each step the ranks all-gather
  the gradient rows their batches touched (``sync.all_sum_rows``) and every rank applies the union. Traffic
  and optimizer work per rank grow with the global batch, so adding ranks adds no speed and no memory.
- :class:`Blocks` (stratified blocks, DSGD: Gemulla et al., KDD 2011; the idea behind NOMAD, cuMF_SGD's
  multi-GPU mode and LIBMF's FPSGD): users are dealt into W blocks and rank r owns user block r (rows and Adam
  state) for good. Movies are dealt into W blocks that rotate: in sub-epoch s rank r holds movie block
  (r + s) mod W and trains only on the stratum (user block r, that movie block). No two ranks touch the same
  row within a sub-epoch, so a step needs no row exchange at all, and one step on W ranks is exactly one step
  of one process on the union of their batches. Between sub-epochs each rank passes its movie block, with its
  Adam moments, to the previous rank; after W sub-epochs (one more rotation) every block is home again, so
  epoch boundaries (evaluation, checkpoints, a change of world size) always see the canonical placement.

Rows are dealt to blocks by rating count (most-rated first, in a snake order 0..W-1, W-1..0, ...), which
balances both the rows and the ratings per block; inside a block rows keep ascending global id order, so
with W = 1 local ids are global ids.

Initial rows come from :func:`init_rows`, keyed by (seed, table, chunk of rows), so every layout and every
world size starts from the same tables without any rank materializing a whole table.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from .distributed import DistEnv
from .errors import ConfigError, DataError
from .model import BiasedMF
from .optim import LazyAdam
from .shards import Dataset, read_row_group
from .stream import RatingStream, make_loader, resident_fits
from .sync import all_sum_rows, sync_sparse_grads, sync_sparse_rows

log = logging.getLogger("mfscale")

TABLES = ("users", "items")
INIT_CHUNK_ROWS = 1 << 16
# A masked sweep over a whole table costs the same whatever the share of rows a step touches; the
# gather/scatter form costs per touched row. On the 2-core CPU (ml-10m synthetic, d=64) the sweep lost with
# 17% of the user rows touched and won clearly with 34% (steps 7.6 vs 10.0 ms); measured in
# benchmarks/RESULTS.md. Only where a rank's update is local (no rows exchanged).
DENSE_SWEEP_MIN_FRACTION = 0.3


def init_rows(ids: np.ndarray, dim: int, std: float, seed: int, table: int, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
    """Initial rows ``[factors ~ N(0, std), bias 0]`` of the given global row ids of one table.

    Drawn chunk by chunk (``INIT_CHUNK_ROWS`` rows per chunk, a generator per (seed, table, chunk)), so a rank
    that owns scattered rows gets exactly the values a single process would, while holding one chunk at a time.
    """
    dtype = dtype or torch.get_default_dtype()
    out = torch.zeros((len(ids), dim + 1), dtype=dtype)
    if len(ids) == 0:
        return out
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    chunks = sorted_ids // INIT_CHUNK_ROWS
    bounds = np.flatnonzero(np.diff(chunks)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(ids)], strict=True):
        c = int(chunks[lo])
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, table, c]).generate_state(1)[0]))
        block = torch.randn((INIT_CHUNK_ROWS, dim), generator=g, dtype=dtype).mul_(std)
        out[torch.from_numpy(order[lo:hi]), :dim] = block[torch.from_numpy(sorted_ids[lo:hi] - c * INIT_CHUNK_ROWS)]
    return out


def train_counts(data: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Training ratings per user row and per movie row (from users.parquet / movies.parquet)."""
    out = []
    # pyarrow, not polars: polars' thread pool deadlocks in a rank forked from a process that used it
    for file, key in (("users.parquet", "user_idx"), ("movies.parquet", "item_idx")):
        table = pq.read_table(data.root / file, columns=[key, "n_train"])
        counts = np.zeros(len(table), dtype=np.int64)
        counts[table.column(key).to_numpy()] = table.column("n_train").to_numpy()
        out.append(counts)
    return out[0], out[1]


def deal_rows(counts: np.ndarray, world: int) -> np.ndarray:
    """Block (0..world-1) of every row: rows sorted by count, most first, dealt in snake order."""
    order = np.argsort(-np.asarray(counts, dtype=np.int64), kind="stable")
    k = np.arange(len(order))
    pos, lap = k % world, k // world
    block = np.empty(len(order), dtype=np.int64)
    block[order] = np.where(lap % 2 == 0, pos, world - 1 - pos)
    return block


def stratum_balance(strata: np.ndarray) -> dict[str, float]:
    """Of a W x W matrix of stratum sizes (ratings of user block r x movie block b): the largest stratum over
    the mean (1.0 = perfect), and the ratings the equal step count of each sub-epoch pays for (W x its
    largest stratum) over the ratings trained."""
    w = strata.shape[0]
    per_sub = [max(strata[q, (q + s) % w] for q in range(w)) for s in range(w)]
    return {"max_over_mean": float(strata.max() / max(strata.mean(), 1e-12)),
            "padded_over_actual": float(w * sum(per_sub) / max(strata.sum(), 1))}


def _local_index(block: np.ndarray, world: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per row its index inside its block (ascending global id), and per block its global row ids."""
    members = [np.flatnonzero(block == b) for b in range(world)]
    local = np.empty(len(block), dtype=np.int64)
    for m in members:
        local[m] = np.arange(len(m))
    return local, members


@dataclass
class EvalShare:
    """The ratings of one split that this rank evaluates, with user ids local to ``TableLayout.eval_tables``."""

    user: np.ndarray
    item: np.ndarray  # global movie ids
    rating: np.ndarray


class TableLayout:
    """Where the rows of the user and movie tables live, how gradients reach them, and how they are saved.

    Subclasses build ``model`` (this rank's rows, in local ids), ``opt`` (the sparse optimizer over its
    tables) and a batch source; batches carry local ids. ``bytes_sent`` counts what this rank sent to others
    for the tables (gradient rows or blocks), for the benchmarks.
    """

    name = "?"
    model: BiasedMF
    opt: torch.optim.Optimizer
    steps_per_epoch: int
    # Per table, from how many touched rows a fused step sweeps the whole local table; None = never.
    dense_min: tuple[int, int] | None = None
    # Whether this rank's batch gradient of every row it touches is the whole gradient (no exchange between
    # ranks), so gradients and the update can be fused in one pass (step.KernelStep).
    rows_complete: bool = False

    def __init__(self, env: DistEnv, data: Dataset):
        self.env, self.data = env, data
        self.bytes_sent = 0
        self.n_train_rows = train_counts(data)  # training ratings per user row and per movie row

    # -- construction helpers ----------------------------------------------------------------------
    def _build(self, user_ids: np.ndarray, item_rows: int, item_ids: np.ndarray, dim: int, init_std: float,
               seed: int, mean: float, optimizer: str, lr: float, betas: tuple[float, float],
               compile: bool) -> None:
        """Model with ``len(user_ids)`` user rows and ``item_rows`` movie rows (the first ``item_ids`` filled)."""
        self.model = BiasedMF(len(user_ids), item_rows, dim, mean=mean, init_std=0.0).to(self.env.device)
        users_n, items_n = self.n_train_rows
        with torch.no_grad():
            for table, ids, n_train, k in ((self.model.users, user_ids, users_n, 0),
                                           (self.model.items, item_ids, items_n, 1)):
                rows = init_rows(ids, dim, init_std, seed, k)
                # Rows without training ratings never get a gradient: zero factors make their prediction
                # exactly the mean plus the other side's bias (cold start), not a random dot product.
                rows[torch.from_numpy(n_train[ids] == 0)] = 0.0
                table.weight[: len(ids)] = rows.to(self.env.device)
        if optimizer == "lazy_adam":
            self.opt = LazyAdam(self.model.sparse_parameters(), lr=lr, betas=betas, compile=compile)
        else:
            self.opt = torch.optim.SparseAdam(self.model.sparse_parameters(), lr=lr, betas=betas)

    # -- training ----------------------------------------------------------------------------------
    def batches(self, epoch: int, start_step: int) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def global_ids(self, batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """The global (user, movie) ids of a batch just yielded by ``batches`` (it carries local ids)."""
        raise NotImplementedError

    def apply_row_grads(self, tables: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]],
                        col_weights: torch.Tensor) -> None:
        """One optimizer step from this rank's ``(ids, rows, counts)`` per table (``sum / global_rows`` form)."""
        raise NotImplementedError

    def apply_sparse_grads(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """One optimizer step from the tables' sparse ``.grad`` (the autograd step); clears them."""
        raise NotImplementedError

    # -- evaluation --------------------------------------------------------------------------------
    def user_owner(self, user: np.ndarray) -> np.ndarray:
        """The rank that evaluates each (global) user's ratings."""
        raise NotImplementedError

    def user_local(self, user: np.ndarray) -> np.ndarray:
        """Row of each owned (global) user in ``eval_tables()[0]``."""
        raise NotImplementedError

    def eval_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(user rows of the users this rank evaluates, the whole movie table, global bias)."""
        raise NotImplementedError

    def eval_share(self, split: str) -> EvalShare:
        """This rank's ratings of ``split`` (read once per call; splits are read whole, then filtered)."""
        arrays = self.data.read_split(split)
        user = arrays["user"].astype(np.int64)
        mine = self.user_owner(user) == self.env.rank
        return EvalShare(self.user_local(user[mine]), arrays["item"][mine].astype(np.int64),
                         arrays["rating"][mine].astype(np.float32))

    # -- checkpoints -------------------------------------------------------------------------------
    def part(self) -> dict[str, Any] | None:
        """This rank's piece of a checkpoint: per table global row ids, rows and Adam moments; None = nothing
        to write (a replica of rank 0)."""
        raise NotImplementedError

    @property
    def n_parts(self) -> int:
        raise NotImplementedError

    def position(self) -> dict[str, Any]:
        """Layout state a checkpoint needs besides the parts (e.g. which movie block each rank holds)."""
        return {}

    def _held_ids(self, position: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Global ids of the user and movie rows this rank holds at ``position``."""
        raise NotImplementedError

    def held_rows(self) -> dict[str, Any]:
        """This rank's rows now: per table the global row ids, the rows and their Adam moments (on CPU).

        On a CPU these are views of the live tables, valid until the next step (a checkpoint serializes them
        at once). Copying them first made the ~200 steps after every checkpoint up to 1.9x slower (ml-10m,
        2-core CPU, benchmarks/RESULTS.md).
        """
        users, items = self._held_ids(self.position())
        out: dict[str, Any] = {}
        for name, ids, p in zip(TABLES, (users, items), self.model.sparse_parameters(), strict=True):
            state = self.opt.state.get(p, {})
            n = len(ids)
            out[name] = {
                "ids": torch.from_numpy(ids),
                "weight": p.detach()[:n].cpu(),
                "exp_avg": state["exp_avg"][:n].cpu() if "exp_avg" in state else None,
                "exp_avg_sq": state["exp_avg_sq"][:n].cpu() if "exp_avg_sq" in state else None,
                "step": int(state.get("step", 0)),
            }
        return out

    def load_parts(self, parts: Iterator[dict[str, Any]], position: dict[str, Any], *,
                   weights_only: bool = False) -> None:
        """Fill this rank's rows (and Adam moments) from checkpoint parts of any layout and world size.

        Each part is read once and only the rows this rank holds are kept, so no rank assembles whole tables.
        """
        self._set_position(position)
        held = self._held_ids(self.position())
        # global id -> local row by a sorted search (tables can be large: no dict of ids)
        sorted_held = []
        for ids in held:
            order = np.argsort(ids, kind="stable")
            sorted_held.append((ids[order], order))
        filled = [np.zeros(len(ids), dtype=bool) for ids in held]
        steps: set[int] = set()
        for part in parts:
            for k, (name, p) in enumerate(zip(TABLES, self.model.sparse_parameters(), strict=True)):
                t = part[name]
                gids = t["ids"].numpy()
                s_ids, order = sorted_held[k]
                pos = np.searchsorted(s_ids, gids)
                pos = np.minimum(pos, max(len(s_ids) - 1, 0))
                hit = (s_ids[pos] == gids) if len(s_ids) else np.zeros(len(gids), dtype=bool)
                if not hit.any():
                    continue
                local = torch.from_numpy(order[pos[hit]])
                src = torch.from_numpy(np.flatnonzero(hit))
                dev = p.device
                with torch.no_grad():
                    p[local.to(dev)] = t["weight"][src].to(dev, p.dtype)
                filled[k][order[pos[hit]]] = True
                if weights_only:
                    continue
                if t["exp_avg"] is None:
                    continue
                state = self._opt_state(p)
                state["exp_avg"][local.to(dev)] = t["exp_avg"][src].to(dev, p.dtype)
                state["exp_avg_sq"][local.to(dev)] = t["exp_avg_sq"][src].to(dev, p.dtype)
                steps.add(int(t["step"]))
        for name, f in zip(TABLES, filled, strict=True):
            if not f.all():
                raise DataError(f"checkpoint is incomplete: {int((~f).sum()):,} rows of the {name} table are in "
                                "none of its parts")
        if not weights_only and steps:
            for p in self.model.sparse_parameters():
                self._opt_state(p)["step"] = max(steps)

    def _opt_state(self, p: torch.Tensor) -> dict:
        if isinstance(self.opt, LazyAdam):
            return self.opt._state(p)
        state = self.opt.state[p]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        return state

    def _set_position(self, position: dict[str, Any]) -> None:
        pass


class Replicated(TableLayout):
    """Both whole tables on every rank; gradient rows all-gathered every step (the layout through 2026-11)."""

    name = "replicated"

    def __init__(self, env: DistEnv, data: Dataset, *, dim: int, init_std: float, seed: int, mean: float,
                 optimizer: str, lr: float, betas: tuple[float, float], compile: bool, batch_size: int,
                 resident: str, workers: int):
        super().__init__(env, data)
        self._build(np.arange(data.n_users), data.n_items, np.arange(data.n_items), dim, init_std, seed, mean,
                    optimizer, lr, betas, compile)
        self.workers = workers
        self.resident = self._use_resident(resident, workers)
        self.stream = RatingStream(data, "train", batch_size=batch_size, rank=env.rank, world_size=env.world_size,
                                   seed=seed, resident=env.device if resident else None)
        self.steps_per_epoch = self.stream.steps_per_epoch
        self.rows_complete = not env.distributed
        if not env.distributed:
            self.dense_min = tuple(math.ceil(DENSE_SWEEP_MIN_FRACTION * n) for n in (data.n_users, data.n_items))

    def _use_resident(self, mode: str, workers: int) -> bool:
        """Keep the whole training split on the device (batches cut there, identical to streamed ones)?"""
        if mode == "on":
            if workers:
                raise ConfigError("--data.resident on reads batches in the training process; use --workers 0")
            return True
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        n = self.data.split_rows("train")
        return mode == "auto" and not workers and resident_fits(n, self.env.device, local_world)

    def batches(self, epoch: int, start_step: int) -> Iterator[dict[str, Any]]:
        self.stream.set_epoch(epoch, start_step)
        if self.resident:
            return iter(self.stream)
        return iter(make_loader(self.stream, self.workers, pin_memory=self.env.device.type == "cuda"))

    def global_ids(self, batch):
        return batch["user"].cpu().numpy().astype(np.int64), batch["item"].cpu().numpy().astype(np.int64)

    def apply_row_grads(self, tables, col_weights) -> None:
        if self.env.distributed:
            dim = tables[0][1].shape[1]
            local = [(ids, torch.cat([rows, counts[:, None]], 1)) for ids, rows, counts in tables]
            self.bytes_sent += sum(ids.numel() * (8 + (dim + 1) * rows.element_size()) for ids, rows in local) \
                * (self.env.world_size - 1)
            synced = all_sum_rows(local, [self.data.n_users, self.data.n_items])
            tables = [(ids, v[:, :-1], v[:, -1]) for ids, v in synced]
        self.opt.step(rows=[(ids, rows, counts, col_weights) for ids, rows, counts in tables])

    def apply_sparse_grads(self, scaler=None) -> None:
        params = self.model.sparse_parameters()
        synced = None
        if self.env.distributed:
            sent = sum(p.grad._nnz() * (8 + p.shape[1] * p.element_size()) for p in params if p.grad is not None)
            self.bytes_sent += sent * (self.env.world_size - 1)
            if isinstance(self.opt, LazyAdam) and scaler is None:
                synced = sync_sparse_rows(params)  # unique rows: no second dedupe
            else:
                sync_sparse_grads(params)
        if scaler is not None:
            scaler.step(self.opt)
        elif synced is not None:
            self.opt.step(rows=synced)
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def user_owner(self, user):
        return user % self.env.world_size

    def user_local(self, user):
        return user

    def eval_tables(self):
        return self.model.users.weight.detach(), self.model.items.weight.detach(), self.model.global_bias.detach()

    @property
    def n_parts(self) -> int:
        return 1

    def part(self):
        return self.held_rows() if self.env.is_main else None

    def _held_ids(self, position):
        return np.arange(self.data.n_users), np.arange(self.data.n_items)


class Blocks(TableLayout):
    """Stratified blocks: user block r stays on rank r, movie blocks rotate once per sub-epoch (see module)."""

    name = "blocks"
    rows_complete = True  # user rows are owned, and a movie block is held by one rank at a time

    def __init__(self, env: DistEnv, data: Dataset, *, dim: int, init_std: float, seed: int, mean: float,
                 optimizer: str, lr: float, betas: tuple[float, float], compile: bool, batch_size: int,
                 resident: str):
        super().__init__(env, data)
        w, r = env.world_size, env.rank
        if w > min(data.n_users, data.n_items):
            raise ConfigError(f"--train.tables blocks: {w} ranks but the data has only {data.n_users:,} users and "
                              f"{data.n_items:,} movies (each rank needs a block of both); use fewer ranks or "
                              "--train.tables replicated")
        self.seed, self.batch_size = seed, batch_size
        self.user_block = deal_rows(self.n_train_rows[0], w)
        self.item_block = deal_rows(self.n_train_rows[1], w)
        self.user_local_idx, self.user_members = _local_index(self.user_block, w)
        self.item_local_idx, self.item_members = _local_index(self.item_block, w)
        self.item_rows = max(len(m) for m in self.item_members)  # every rank's buffer fits any movie block
        self._build(self.user_members[r], self.item_rows, self.item_members[r], dim, init_std, seed, mean,
                    optimizer, lr, betas, compile)
        self.held = 0  # sub-epoch whose movie block this rank holds: block (rank + held) mod W
        self.dense_min = tuple(math.ceil(DENSE_SWEEP_MIN_FRACTION * n) for n in (len(self.user_members[r]),
                                                                                   self.item_rows))
        self._load_strata(resident)

    # -- data --------------------------------------------------------------------------------------
    def _load_strata(self, resident: str) -> None:
        """This rank's training ratings (its user block), grouped by movie block; 12 bytes per rating."""
        w, r = self.env.world_size, self.env.rank
        parts: dict[str, list[np.ndarray]] = {"user": [], "item": [], "rating": []}
        for g in self.data.row_groups("train"):
            a = read_row_group(g)
            mine = self.user_block[a["user"]] == r
            parts["user"].append(self.user_local_idx[a["user"][mine]].astype(np.int32))
            parts["item"].append(a["item"][mine].astype(np.int64))
            parts["rating"].append(a["rating"][mine].astype(np.float32))
        item = np.concatenate(parts["item"]) if parts["item"] else np.empty(0, np.int64)
        block = self.item_block[item]
        order = np.argsort(block, kind="stable")
        counts = np.bincount(block, minlength=w)
        self.stratum_start = np.r_[0, np.cumsum(counts)]
        cols = {"user": np.concatenate(parts["user"])[order],
                "item": self.item_local_idx[item[order]].astype(np.int32),
                "rating": np.concatenate(parts["rating"])[order]}
        # The whole count matrix on every rank: each rank's steps per sub-epoch depend on all strata.
        mine = torch.tensor(counts, dtype=torch.long, device=self.env.device)
        if self.env.distributed:
            rows = [torch.empty_like(mine) for _ in range(w)]
            dist.all_gather(rows, mine)
            mine = torch.stack(rows)
        self.strata = mine.reshape(w, w).cpu().numpy()  # strata[rank, movie block] = ratings
        n_local = len(cols["user"])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        on_device = resident == "on" or (resident == "auto" and resident_fits(n_local, self.env.device, local_world))
        self.resident = on_device
        self.data_device = self.env.device if on_device else torch.device("cpu")
        self.cols = {k: torch.from_numpy(v).to(self.data_device) for k, v in cols.items()}
        # steps of each sub-epoch: the largest stratum of that sub-epoch in batches of batch_size
        self.sub_steps = [int(-(-max(self.strata[q, (q + s) % w] for q in range(w)) // self.batch_size))
                          for s in range(w)]
        self.steps_per_epoch = sum(self.sub_steps)
        self.sub_start = np.r_[0, np.cumsum(self.sub_steps)]

    def _sizes(self, n: int, steps: int) -> np.ndarray:
        return np.array([n // steps + (1 if j < n % steps else 0) for j in range(steps)], dtype=np.int64)

    def batches(self, epoch: int, start_step: int) -> Iterator[dict[str, Any]]:
        w, r = self.env.world_size, self.env.rank
        s0 = int(np.searchsorted(self.sub_start, start_step, side="right")) - 1
        for s in range(s0, w):
            steps = self.sub_steps[s]
            first = start_step - int(self.sub_start[s]) if s == s0 else 0
            if first >= steps:
                continue
            self._rotate_to(s)
            b = (r + s) % w
            lo, n = int(self.stratum_start[b]), int(self.strata[r, b])
            perm = torch.from_numpy(np.random.default_rng([self.seed, epoch, r, b]).permutation(n) + lo)
            perm = perm.to(self.data_device)
            sizes = self._sizes(n, steps)
            offsets = np.r_[0, np.cumsum(sizes)]
            global_rows = sum(self._sizes(int(self.strata[q, (q + s) % w]), steps) for q in range(w))
            for j in range(first, steps):
                idx = perm[offsets[j]:offsets[j + 1]]
                batch = {k: v[idx] for k, v in self.cols.items()}
                batch.update(global_rows=int(global_rows[j]), epoch=epoch, step=int(self.sub_start[s]) + j)
                yield batch
        self._rotate_to(w)  # every movie block home again: the canonical placement between epochs

    # -- exchange ----------------------------------------------------------------------------------
    def _rotate_to(self, s: int) -> None:
        """Pass movie blocks (rows + Adam moments) to the previous rank until this rank holds sub-epoch s's
        (s = W: the block it started the epoch with)."""
        while self.held != s % self.env.world_size:
            self._rotate_once()

    def _rotate_once(self) -> None:
        w, r = self.env.world_size, self.env.rank
        self.held = (self.held + 1) % w
        if w == 1:
            return
        p = self.model.items.weight
        state = self._opt_state(p)
        send = torch.stack([p.detach(), state["exp_avg"], state["exp_avg_sq"]])
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, (r - 1) % w), dist.P2POp(dist.irecv, recv, (r + 1) % w)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        self.bytes_sent += send.numel() * send.element_size()
        with torch.no_grad():
            p.copy_(recv[0])
        state["exp_avg"].copy_(recv[1])
        state["exp_avg_sq"].copy_(recv[2])

    def global_ids(self, batch):
        w, r = self.env.world_size, self.env.rank
        return (self.user_members[r][batch["user"].cpu().numpy()],
                self.item_members[(r + self.held) % w][batch["item"].cpu().numpy()])

    def apply_row_grads(self, tables, col_weights) -> None:
        self.opt.step(rows=[(ids, rows, counts, col_weights) for ids, rows, counts in tables])

    def apply_sparse_grads(self, scaler=None) -> None:
        if scaler is not None:
            scaler.step(self.opt)
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    # -- evaluation --------------------------------------------------------------------------------
    def user_owner(self, user):
        return self.user_block[user]

    def user_local(self, user):
        return self.user_local_idx[user]

    def eval_tables(self):
        """Users stay local; the movie table is all-gathered (weights only, no Adam state): every rank then
        holds one whole movie table for the duration of the evaluation."""
        w = self.env.world_size
        p = self.model.items.weight.detach()
        full = p.new_empty((self.data.n_items, p.shape[1]))
        blocks = [p]
        if self.env.distributed:
            blocks = [torch.empty_like(p) for _ in range(w)]
            dist.all_gather(blocks, p.contiguous())
        for q, rows in enumerate(blocks):
            b = (q + self.held) % w
            m = torch.from_numpy(self.item_members[b]).to(p.device)
            full[m] = rows[: len(m)]
        return self.model.users.weight.detach(), full, self.model.global_bias.detach()

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def n_parts(self) -> int:
        return self.env.world_size

    def part(self):
        return self.held_rows()

    def position(self):
        return {"held": self.held}

    def _set_position(self, position):
        self.held = int(position.get("held", 0)) % self.env.world_size

    def _held_ids(self, position):
        w, r = self.env.world_size, self.env.rank
        return self.user_members[r], self.item_members[(r + int(position.get("held", 0))) % w]


def choose(requested: str, world_size: int) -> str:
    """``auto``: blocks on more than one rank (no per-step row exchange; measured in benchmarks/RESULTS.md),
    replicated on one (the two are the same there, and replicated keeps the streamed input path)."""
    if requested != "auto":
        return requested
    return "blocks" if world_size > 1 else "replicated"

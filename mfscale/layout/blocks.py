"""Stratified blocks (DSGD: Gemulla et al., KDD 2011; the idea behind NOMAD, cuMF_SGD's multi-GPU mode and
LIBMF's FPSGD).

Users are dealt into W blocks and rank r owns user block r (rows and Adam state) for good. Movies are dealt
into W blocks that rotate: in sub-epoch s rank r holds movie block ``movie_block(r, s, W)`` = (r + s) mod W and
trains only on the stratum (user block r, that movie block). No two ranks touch the same row within a
sub-epoch, so a step needs no row exchange at all, and one step on W ranks is exactly one step of one process
on the union of their batches. Between sub-epochs each rank passes its movie block, with its Adam moments, to
the previous rank; after W sub-epochs (one more rotation) every block is home again, so epoch boundaries
(evaluation, checkpoints, a change of world size) always see the canonical placement.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..config import JobConfig
from ..distributed import DistEnv
from ..errors import ConfigError
from ..optim import adam_state
from ..shards import Dataset, read_row_groups
from .base import DENSE_SWEEP_MIN_FRACTION, TableLayout, fits_on_device
from .rows import deal_rows, deal_users, local_index, movie_block

# A stratum is shuffled per epoch in pieces of this many ratings (the ratings of a piece stay together; prepare
# wrote them in a seeded random order): the pieces are permuted and the stratum laid out in that order in one
# sequential pass, and the steps take contiguous slices of it. A permutation of every rating (a random gather of
# each column, per step) cost 0.7 s of a 1.5 s epoch on one process (ml-10m, 2-core CPU; issue 20), half the
# speed of the replicated layout's stream, which cuts batches from whole row groups the same way.
PIECE_ROWS = 4096

log = logging.getLogger("mfscale")


def _note_unbucketed(data: Dataset, world: int) -> None:
    key = str(data.root.resolve())
    if key not in _NOTED:
        _NOTED.add(key)
        have = data.buckets
        why = ("was prepared before user buckets" if have is None else
               f"has {have['n']} user buckets, fewer than the {world} ranks")
        log.info("%s %s: every blocks rank decodes the whole training split; re-run python -m mfscale.prepare%s "
                 "to read about 1/W of it per rank", data.root, why,
                 "" if have is None else f" with --user-buckets {world} or more")


_NOTED: set[str] = set()


class Blocks(TableLayout):
    """Stratified blocks: user block r stays on rank r, movie blocks rotate once per sub-epoch (see module)."""

    name = "blocks"
    rows_complete = True  # user rows are owned, and a movie block is held by one rank at a time

    def __init__(self, cfg: JobConfig, env: DistEnv, data: Dataset, batch_size: int):
        super().__init__(cfg, env, data, batch_size)
        w, r = env.world_size, env.rank
        if w > min(data.n_users, data.n_items):
            raise ConfigError(f"--train.tables blocks: {w} ranks but the data has only {data.n_users:,} users and "
                              f"{data.n_items:,} movies (each rank needs a block of both); use fewer ranks or "
                              "--train.tables replicated")
        self.seed = cfg.train.seed
        self.user_block, self.bucket_rank = deal_users(data, self.n_train_rows[0], w)
        self.item_block = deal_rows(self.n_train_rows[1], w)
        self.user_local_idx, self.user_members = local_index(self.user_block, w)
        self.item_local_idx, self.item_members = local_index(self.item_block, w)
        self.item_rows = max(len(m) for m in self.item_members)  # every rank's buffer fits any movie block
        self._build(self.user_members[r], self.item_rows, self.item_members[r])
        self.held = 0  # sub-epoch whose movie block this rank holds: movie_block(rank, held, W)
        self.dense_min = tuple(math.ceil(DENSE_SWEEP_MIN_FRACTION * n) for n in (len(self.user_members[r]),
                                                                                   self.item_rows))
        self._load_strata(cfg.data.resident)

    # -- data --------------------------------------------------------------------------------------
    def _load_strata(self, resident: str) -> None:
        """This rank's training ratings (its user block), grouped by movie block; 12 bytes per rating."""
        w, r = self.env.world_size, self.env.rank
        parts: dict[str, list[np.ndarray]] = {"user": [], "item": [], "rating": []}
        groups = self.data.row_groups("train")
        if self.bucket_rank is not None:  # only this rank's user buckets: about 1/W of the split
            groups = [g for g in groups if self.bucket_rank[g.bucket] == r]
        elif w > 1:
            _note_unbucketed(self.data, w)
        by_file: dict = {}
        for g in groups:
            by_file.setdefault(g.path, []).append(g.index)
        with self.data.reading(("train",)):  # the whole split is hashed (shared by a host's ranks, --data.verify)
            for path, indices in by_file.items():
                a = read_row_groups(path, indices, ("user", "item", "rating"))
                self.decoded_bytes += sum(v.nbytes for v in a.values())
                mine = self.user_block[a["user"]] == r
                parts["user"].append(self.user_local_idx[a["user"][mine]].astype(np.int32))
                parts["item"].append(a["item"][mine].astype(np.int64))
                parts["rating"].append(a["rating"][mine].astype(np.float32))
        # One seeded shuffle at load: the row groups hold a bucket each, so in file order a run of ratings (a
        # PIECE_ROWS piece of a stratum) would hold a few buckets' users only.
        n = sum(len(x) for x in parts["user"])
        perm = np.random.default_rng([self.seed, 0xB10C5, r]).permutation(n)
        dtypes = {"user": np.int32, "item": np.int64, "rating": np.float32}
        parts = {k: [np.concatenate(v)[perm] if v else np.empty(0, dtypes[k])] for k, v in parts.items()}
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
            self.env.count("all_gather")
            dist.all_gather(rows, mine)
            mine = torch.stack(rows)
        self.strata = mine.reshape(w, w).cpu().numpy()  # strata[rank, movie block] = ratings
        self.resident = fits_on_device(len(cols["user"]), resident, self.env)
        self.data_device = self.env.device if self.resident else torch.device("cpu")
        self.cols = {k: torch.from_numpy(v).to(self.data_device) for k, v in cols.items()}
        # steps of each sub-epoch: the largest stratum of that sub-epoch in batches of batch_size
        self.sub_steps = [int(-(-max(self.strata[q, movie_block(q, s, w)] for q in range(w)) // self.batch_size))
                          for s in range(w)]
        self.steps_per_epoch = sum(self.sub_steps)
        self.sub_start = np.r_[0, np.cumsum(self.sub_steps)]
        self._sub_ends = set(self.sub_start[1:].tolist())

    def sync_point(self, step_in_epoch: int) -> bool:
        """The end of each sub-epoch, where the ranks pass their movie blocks on anyway (W per epoch)."""
        return not self.env.distributed or step_in_epoch in self._sub_ends

    def _sizes(self, n: int, steps: int) -> np.ndarray:
        return np.array([n // steps + (1 if j < n % steps else 0) for j in range(steps)], dtype=np.int64)

    def _stratum(self, epoch: int, block: int) -> dict[str, torch.Tensor]:
        """This rank's ratings of movie block ``block`` in epoch ``epoch``'s order (pieces of PIECE_ROWS
        permuted by a generator keyed by (seed, epoch, rank, block)), laid out in one pass."""
        lo, n = int(self.stratum_start[block]), int(self.strata[self.env.rank, block])
        order = np.random.default_rng([self.seed, epoch, self.env.rank, block]).permutation(-(-n // PIECE_ROWS))
        starts = lo + order * PIECE_ROWS
        ends = np.minimum(starts + PIECE_ROWS, lo + n)
        if n == 0:
            return {k: v[lo:lo] for k, v in self.cols.items()}
        return {k: torch.cat([v[a:e] for a, e in zip(starts.tolist(), ends.tolist(), strict=True)])
                for k, v in self.cols.items()}

    def batches(self, epoch: int, start_step: int) -> Iterator[dict[str, Any]]:
        w, r = self.env.world_size, self.env.rank
        s0 = int(np.searchsorted(self.sub_start, start_step, side="right")) - 1
        for s in range(s0, w):
            steps = self.sub_steps[s]
            first = start_step - int(self.sub_start[s]) if s == s0 else 0
            if first >= steps:
                continue
            self._rotate_to(s)
            b = movie_block(r, s, w)
            cols = self._stratum(epoch, b)
            sizes = self._sizes(int(self.strata[r, b]), steps)
            offsets = np.r_[0, np.cumsum(sizes)]
            global_rows = sum(self._sizes(int(self.strata[q, movie_block(q, s, w)]), steps) for q in range(w))
            for j in range(first, steps):
                lo, hi = int(offsets[j]), int(offsets[j + 1])
                batch = {k: v[lo:hi] for k, v in cols.items()}
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
        state = adam_state(self.opt, p)
        send = torch.stack([p.detach(), state["exp_avg"], state["exp_avg_sq"]])
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, (r - 1) % w), dist.P2POp(dist.irecv, recv, (r + 1) % w)]
        self.env.count("send_recv")
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
                self.item_members[movie_block(r, self.held, w)][batch["item"].cpu().numpy()])

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
            self.env.count("all_gather")
            dist.all_gather(blocks, p.contiguous())
        for q, rows in enumerate(blocks):
            m = torch.from_numpy(self.item_members[movie_block(q, self.held, w)]).to(p.device)
            full[m] = rows[: len(m)]
        return self.model.users.weight.detach(), full, self.model.global_bias.detach()

    # -- checkpoint parts --------------------------------------------------------------------------
    @property
    def n_parts(self) -> int:
        return self.env.world_size

    def writes_part(self) -> bool:
        return True

    def position(self):
        return {"held": self.held}

    def set_position(self, position):
        self.held = int(position.get("held", 0)) % self.env.world_size

    def held_ids(self, position):
        w, r = self.env.world_size, self.env.rank
        return self.user_members[r], self.item_members[movie_block(r, int(position.get("held", 0)), w)]

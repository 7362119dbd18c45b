"""Stratified blocks (DSGD: Gemulla et al., KDD 2011; the idea behind NOMAD, cuMF_SGD's multi-GPU mode and
LIBMF's FPSGD).

Users are dealt into W blocks and rank r owns user block r (rows and Adam state) for good. Movies are dealt
into W blocks that rotate: in sub-epoch s rank r holds movie block ``movie_block(r, s, W)`` = (r + s) mod W and
trains only on the stratum (user block r, that movie block). No two ranks touch the same row within a
sub-epoch, so a step needs no row exchange at all, and one step on W ranks is exactly one step of one process
on the union of their batches. After W sub-epochs (one more rotation) every block is home again, so epoch
boundaries (evaluation, checkpoints, a change of world size) always see the canonical placement.

The rotation runs behind the training, NOMAD-style: each movie block is split into P pieces
(``--train.block_pieces``; ``rows.deal_pieces``) and a sub-epoch into P phases, phase (s, q) training only the
stratum's ratings of piece q. Piece q lives in a fixed slot of the local movie table (rows [q PR, (q + 1) PR),
PR the largest piece). As soon as phase (s, q) is done, slot q (rows and optimizer state) is copied into a send
buffer and sent to rank r - 1, and the next block's piece q is received from rank r + 1 into a staging buffer;
it is installed into slot q only when phase (s + 1, q) starts, so the transfer overlaps the P - 1 phases in
between, and gloo never writes into the live table while the optimizer may sweep it. P = 1 is the blocking
rotation of a whole block at each sub-epoch's end.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import Part
from ..config import JobConfig
from ..distributed import DistEnv
from ..errors import ConfigError
from ..optim import row_state, state_keys
from ..shards import TRAIN_COLUMNS, Dataset, days_of, read_row_groups
from .base import DENSE_SWEEP_MIN_FRACTION, TableLayout, fits_on_device
from .rows import deal_pieces, deal_users, local_index, movie_block

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

    def __init__(self, cfg: JobConfig, env: DistEnv, data: Dataset, batch_size: int,
                 lr_scales: tuple[float, float] | None = None):
        super().__init__(cfg, env, data, batch_size, lr_scales)
        w, r = env.world_size, env.rank
        if w > min(data.n_users, data.n_items):
            raise ConfigError(f"--train.tables blocks: {w} ranks but the data has only {data.n_users:,} users and "
                              f"{data.n_items:,} movies (each rank needs a block of both); use fewer ranks or "
                              "--train.tables replicated")
        self.seed = cfg.train.seed
        self.pieces = cfg.train.block_pieces if w > 1 else 1  # one rank: no rotation to hide
        self.user_block, self.bucket_rank = deal_users(data, self.n_train_rows[0], w)
        self.item_block, self.item_piece = deal_pieces(self.n_train_rows[1], w, self.pieces)
        self.user_local_idx, self.user_members = local_index(self.user_block, w)
        # piece_members[b][q]: global ids of piece q of movie block b, ascending; a movie's local row is its
        # piece's slot offset plus its index in the piece
        index_in_piece, members = local_index(self.item_block * self.pieces + self.item_piece, w * self.pieces)
        self.piece_members = [members[b * self.pieces:(b + 1) * self.pieces] for b in range(w)]
        self.piece_rows = max(len(m) for m in members)  # a slot fits piece q of any block
        self.item_local_idx = self.item_piece * self.piece_rows + index_in_piece
        self.item_rows = self.pieces * self.piece_rows
        ids, rows = self._custody(r, 0, 0)
        self._build(self.user_members[r], self.item_rows, ids)
        if not np.array_equal(rows, np.arange(len(ids))):  # _build filled rows 0..n-1: move them to their slots
            with torch.no_grad():
                table = self.model.items.weight
                filled = table[: len(ids)].clone()
                table.zero_()
                table[torch.from_numpy(rows).to(table.device)] = filled
        # The phase (sub-epoch ``held``, piece ``phase``) started last; (0, 0) with every slot home between epochs.
        self.held, self.phase = 0, 0
        self._loaded_pieces: int | None = None  # block_pieces of a checkpoint taken up at an epoch boundary
        # Per slot, the exchange posted at the end of its last phase and not yet installed: (works, send
        # buffer, staging buffer); the send buffer is referenced until its send is waited for.
        self._pending: list[tuple[list[Any], torch.Tensor, torch.Tensor] | None] = [None] * self.pieces
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        self.dense_min = tuple(math.ceil(DENSE_SWEEP_MIN_FRACTION * n) for n in (len(self.user_members[r]),
                                                                                   self.item_rows))
        self._load_strata(cfg.data.resident)

    # -- data --------------------------------------------------------------------------------------
    def _load_strata(self, resident: str) -> None:
        """This rank's training ratings (its user block), grouped by movie block; 12 bytes per rating."""
        w, r = self.env.world_size, self.env.rank
        day_bias, time_bias = self.cfg.uses_day_bias(), self.cfg.uses_time_bias()
        timed = day_bias or time_bias
        columns = TRAIN_COLUMNS + (("timestamp",) if timed else ())
        parts: dict[str, list[np.ndarray]] = {c: [] for c in ("user", "item", "rating")}
        if timed:
            parts.update(global_user=[], timestamp=[])
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
                a = read_row_groups(path, indices, columns)
                self.decoded_bytes += sum(v.nbytes for v in a.values())
                mine = self.user_block[a["user"]] == r
                parts["user"].append(self.user_local_idx[a["user"][mine]].astype(np.int32))
                parts["item"].append(a["item"][mine].astype(np.int64))
                parts["rating"].append(a["rating"][mine].astype(np.float32))
                if timed:
                    parts["global_user"].append(a["user"][mine].astype(np.int64))
                    parts["timestamp"].append(a["timestamp"][mine].astype(np.int64))
        # One seeded shuffle at load: the row groups hold a bucket each, so in file order a run of ratings (a
        # PIECE_ROWS piece of a stratum) would hold a few buckets' users only.
        n = sum(len(x) for x in parts["user"])
        perm = np.random.default_rng([self.seed, 0xB10C5, r]).permutation(n)
        dtypes = {"user": np.int32, "item": np.int64, "rating": np.float32, "global_user": np.int64,
                  "timestamp": np.int64}
        parts = {k: [np.concatenate(v)[perm] if v else np.empty(0, dtypes[k])] for k, v in parts.items()}
        # --model.day_bias: the biases of this rank's users' days (all their ratings are here), and each rating's row
        user, timestamp = parts.pop("global_user", [None])[0], parts.pop("timestamp", [None])[0]
        days = self._build_day_bias(user, timestamp) if day_bias else None
        day_row = None if days is None else days.rows(user, timestamp)
        # --model.time_bins / user_drift: the biases (t_u of this rank's users: all their ratings are here; the
        # movies held now: the epoch's start, sub-epoch 0) and each rating's bin and drift term
        time = None
        if time_bias:
            day = days_of(timestamp)
            user_rows = np.concatenate(parts["user"]) if parts["user"] else np.empty(0, np.int32)
            tb = self._build_time_bias(user_rows, np.concatenate(parts["item"]) if parts["item"] else
                                       np.empty(0, np.int64), day, self._custody(self.env.rank, 0, 0))
            time = tb.rating_features(user_rows, day)
        item = np.concatenate(parts["item"]) if parts["item"] else np.empty(0, np.int64)
        n_groups = w * self.pieces
        group = self.item_block[item] * self.pieces + self.item_piece[item]  # by movie block, then piece
        order = np.argsort(group, kind="stable")
        counts = np.bincount(group, minlength=n_groups)
        self.stratum_start = np.r_[0, np.cumsum(counts)]  # of each (block, piece) group in self.cols
        cols = {"user": np.concatenate(parts["user"])[order],
                "item": self.item_local_idx[item[order]].astype(np.int32),
                "rating": np.concatenate(parts["rating"])[order]}
        if day_row is not None:
            cols["day_row"] = day_row[order].astype(np.int32)
        if time is not None:
            cols.update({k: v[order] for k, v in time.items()})
        # --model.implicit: the rows (D_j summed over the ranks; the movies held now) and each (block, piece) group's
        # ratings, which the phase holding that piece visits
        if self._build_implicit(cols["user"].astype(np.int64), item[order], self._custody(self.env.rank, 0, 0)):
            for g in range(n_groups):
                a, e = int(self.stratum_start[g]), int(self.stratum_start[g + 1])
                self.implicit.add_group(g, cols["user"][a:e], cols["item"][a:e], (g % self.pieces) * self.piece_rows,
                                        self.piece_rows)
        # The whole count matrix on every rank: each rank's steps per phase depend on all strata.
        mine = torch.tensor(counts, dtype=torch.long, device=self.env.device)
        if self.env.distributed:
            rows = [torch.empty_like(mine) for _ in range(w)]
            self.env.count("all_gather")
            dist.all_gather(rows, mine)
            mine = torch.stack(rows)
        # piece_strata[rank, movie block, piece] = ratings; strata[rank, movie block] = their sum
        self.piece_strata = mine.reshape(w, w, self.pieces).cpu().numpy()
        self.strata = self.piece_strata.sum(axis=2)
        self.resident = fits_on_device(len(cols["user"]), resident, self.env)
        self.data_device = self.env.device if self.resident else torch.device("cpu")
        self.cols = {k: torch.from_numpy(v).to(self.data_device) for k, v in cols.items()}
        # steps of phase k = (sub-epoch k // P, piece k % P): the largest stratum-piece of that phase in batches
        self.phase_steps = [int(-(-max(self._piece_count(x, k) for x in range(w)) // self.batch_size))
                            for k in range(n_groups)]
        self.steps_per_epoch = sum(self.phase_steps)
        self.phase_start = np.r_[0, np.cumsum(self.phase_steps)]
        self._sub_ends = set(self.phase_start[self.pieces::self.pieces].tolist())

    def _piece_count(self, rank: int, k: int) -> int:
        """Ratings rank ``rank`` trains in phase ``k``."""
        s, q = divmod(k, self.pieces)
        return int(self.piece_strata[rank, movie_block(rank, s, self.env.world_size), q])

    def sync_point(self, step_in_epoch: int) -> bool:
        """The end of each sub-epoch (W per epoch), not of each phase: the pieces' exchanges are point to point."""
        return not self.env.distributed or step_in_epoch in self._sub_ends

    def _sizes(self, n: int, steps: int) -> np.ndarray:
        return np.array([n // steps + (1 if j < n % steps else 0) for j in range(steps)], dtype=np.int64)

    def _stratum(self, epoch: int, block: int, piece: int) -> dict[str, torch.Tensor]:
        """This rank's ratings of piece ``piece`` of movie block ``block`` in epoch ``epoch``'s order (pieces of
        PIECE_ROWS permuted by a generator keyed by (seed, epoch, rank, block, piece); without pieces the key of
        the whole-block rotation, so P = 1 trains exactly as before), laid out in one pass."""
        g = block * self.pieces + piece
        lo, n = int(self.stratum_start[g]), int(self.piece_strata[self.env.rank, block, piece])
        key = [self.seed, epoch, self.env.rank, block] + ([piece] if self.pieces > 1 else [])
        order = np.random.default_rng(key).permutation(-(-n // PIECE_ROWS))
        starts = lo + order * PIECE_ROWS
        ends = np.minimum(starts + PIECE_ROWS, lo + n)
        if n == 0:
            return {k: v[lo:lo] for k, v in self.cols.items()}
        return {k: torch.cat([v[a:e] for a, e in zip(starts.tolist(), ends.tolist(), strict=True)])
                for k, v in self.cols.items()}

    def batches(self, epoch: int, start_step: int) -> Iterator[dict[str, Any]]:
        w, r, n_pieces = self.env.world_size, self.env.rank, self.pieces
        if start_step and self._loaded_pieces not in (None, n_pieces):
            raise ConfigError(f"the checkpoint stopped mid-epoch with --train.block_pieces {self._loaded_pieces} "
                              f"(this run: {n_pieces}); resume with --train.block_pieces {self._loaded_pieces} "
                              "(any value resumes from an epoch boundary)")
        started = self.held * n_pieces + self.phase  # the phase started last: 0 between epochs, or a checkpoint's
        if start_step < self.phase_start[started]:
            raise RuntimeError(f"blocks: asked for step {start_step} of an epoch whose phase {started} has started")
        # From the phase started last to the end: phases before start_step yield nothing but still pass their
        # pieces on (a checkpoint taken after a phase's last step resumes before that phase's exchange).
        for k in range(started, w * n_pieces):
            s, q = divmod(k, n_pieces)
            self._start_phase(s, q)
            if self.implicit is not None and not (k == started and start_step > 0):  # not twice in a resumed phase
                self.implicit.visit(movie_block(r, s, w) * n_pieces + q, self.model.users.weight.detach())
            steps = self.phase_steps[k]
            first = max(0, start_step - int(self.phase_start[k]))
            if first < steps:
                b = movie_block(r, s, w)
                cols = self._stratum(epoch, b, q)
                offsets = np.r_[0, np.cumsum(self._sizes(int(self.piece_strata[r, b, q]), steps))]
                global_rows = sum(self._sizes(self._piece_count(x, k), steps) for x in range(w))
                for j in range(first, steps):
                    lo, hi = int(offsets[j]), int(offsets[j + 1])
                    batch = {key: v[lo:hi] for key, v in cols.items()}
                    batch.update(global_rows=int(global_rows[j]), epoch=epoch, step=int(self.phase_start[k]) + j)
                    yield batch
            self._end_phase(s, q)  # after the phase's last step: the loop has applied it
        self._install_all()  # every piece of the last sub-epoch's exchange: every block home again
        self.held, self.phase = 0, 0
        if self.implicit is not None:
            self.implicit.end_epoch()

    # -- exchange ----------------------------------------------------------------------------------
    def _start_phase(self, s: int, q: int) -> None:
        """Phase (s, q) begins: slot q takes the piece received for it (waiting for it if still on its way)."""
        self.held, self.phase = s, q
        self._install(q)

    def _slot_tensors(self) -> list[torch.Tensor]:
        """What travels with a movie row: the row and its optimizer state (Adam's two moments, or RowRMSprop's
        row state), its time bins' biases and state (--model.time_bins) and its implicit row (--model.implicit), each
        with one row per table row."""
        p = self.model.items.weight
        state = row_state(self.opt, p)
        time = [self.time_bias.bins] if self.time_bias is not None and self.time_bias.n_bins else []
        implicit = [self.implicit.items] if self.implicit is not None else []
        return [p.detach()] + [state[k] for k in state_keys(self.opt)] + time + implicit

    def _buffer(self, kind: str, q: int) -> torch.Tensor:
        """Slot q's send or staging buffer (flat, room for a whole slot's rows and state), kept for the job."""
        buf = self._buffers.get((kind, q))
        if buf is None:
            width = sum(t.shape[1] for t in self._slot_tensors())
            buf = self._buffers[(kind, q)] = self.model.items.weight.new_empty(self.piece_rows * width)
        return buf

    def _end_phase(self, s: int, q: int) -> None:
        """Phase (s, q) is trained: send slot q (piece q of this sub-epoch's block) to rank r - 1 and post the
        receive of rank r + 1's (piece q of the next sub-epoch's block); neither is waited for here."""
        w, r = self.env.world_size, self.env.rank
        if w == 1:
            return
        self._install(q)  # nothing left normally (installed when the phase started); the buffers are free
        tensors = self._slot_tensors()
        width = sum(t.shape[1] for t in tensors)
        n_out = len(self.piece_members[movie_block(r, s, w)][q])
        n_in = len(self.piece_members[movie_block(r, s + 1, w)][q])
        lo = q * self.piece_rows
        # Copies, not views: the slot stays live (the optimizer may sweep the whole table) while gloo reads.
        # A row and its state side by side: one (rows, width) block.
        send = self._buffer("send", q)[: n_out * width].view(n_out, width)
        torch.cat([t[lo:lo + n_out] for t in tensors], dim=1, out=send)
        recv = self._buffer("stage", q)[: n_in * width].view(n_in, width)
        ops = [dist.P2POp(dist.isend, send, (r - 1) % w, tag=q), dist.P2POp(dist.irecv, recv, (r + 1) % w, tag=q)]
        self.env.count("send_recv")
        self._pending[q] = (dist.batch_isend_irecv(ops), send, recv)
        self.bytes_sent += send.numel() * send.element_size()

    def _install(self, q: int) -> None:
        """Wait for slot q's posted exchange (gloo's wait gives up after --train.timeout_s, the process group's
        timeout, with an error naming the peer: a rank that never sends fails the job instead of hanging it)
        and copy the received piece with its optimizer state into the slot."""
        pending = self._pending[q]
        if pending is None:
            return
        works, _send, recv = pending
        for work in works:
            work.wait()
        lo, n, col = q * self.piece_rows, recv.shape[0], 0
        with torch.no_grad():
            for dst in self._slot_tensors():
                dst[lo:lo + n].copy_(recv[:, col:col + dst.shape[1]])
                col += dst.shape[1]
        self._pending[q] = None

    def _install_all(self) -> None:
        for q in range(self.pieces):
            self._install(q)

    def _custody(self, rank: int, s: int, p: int) -> tuple[np.ndarray, np.ndarray]:
        """Global ids and local rows of the movies rank ``rank`` holds in phase (s, p): slot q >= p holds piece q
        of sub-epoch s's block, slot q < p (already passed on) piece q of sub-epoch s + 1's, once received."""
        w, ids, rows = self.env.world_size, [], []
        for q in range(self.pieces):
            m = self.piece_members[movie_block(rank, s + (1 if q < p else 0), w)][q]
            ids.append(m)
            rows.append(q * self.piece_rows + np.arange(len(m)))
        return np.concatenate(ids), np.concatenate(rows)

    def global_ids(self, batch):
        w, r, q = self.env.world_size, self.env.rank, self.phase
        # a batch of phase (held, q) holds movies of slot q only
        item = batch["item"].cpu().numpy().astype(np.int64) - q * self.piece_rows
        return (self.user_members[r][batch["user"].cpu().numpy()],
                self.piece_members[movie_block(r, self.held, w)][q][item])

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
        self._install_all()  # every rank's custody complete (all ranks are at the same step)
        return self.model.users.weight.detach(), self._gather_items(self.model.items.weight.detach()), \
            self.model.global_bias.detach()

    def eval_time(self):
        """alpha_u and t_u (local, as the user rows) and every movie's bin biases, all-gathered."""
        self._install_all()
        t = self.time_bias
        return t.users[:, 0], t.mean_day, self._gather_items(t.bin_view(t.bins)[:, :, 0].contiguous())

    def _gather_items(self, p: torch.Tensor) -> torch.Tensor:
        """A tensor of one row per local movie row, as one whole table by global movie id (all_gather)."""
        w = self.env.world_size
        full = p.new_empty((self.data.n_items, p.shape[1]))
        tables = [p]
        if self.env.distributed:
            tables = [torch.empty_like(p) for _ in range(w)]
            self.env.count("all_gather")
            dist.all_gather(tables, p.contiguous())
        for x, rows in enumerate(tables):
            ids, local = self._custody(x, self.held, self.phase)
            full[torch.from_numpy(ids).to(p.device)] = rows[torch.from_numpy(local).to(p.device)]
        return full

    # -- checkpoint parts --------------------------------------------------------------------------
    @property
    def n_parts(self) -> int:
        return self.env.world_size

    def writes_part(self) -> bool:
        return True

    def position(self):
        return {"held": self.held, "phase": self.phase, "pieces": self.pieces}

    def set_position(self, position):
        """A checkpoint's phase. Older checkpoints say {"held": s}: the whole-block rotation, P = 1. A block holds
        the same movies for any P (rows.deal_pieces), so an epoch boundary's parts load under any P; a mid-epoch
        custody only under the P that wrote it (its pieces and step schedule are that P's)."""
        pieces = int(position.get("pieces", 1))
        held, phase = int(position.get("held", 0)) % self.env.world_size, int(position.get("phase", 0))
        if pieces != self.pieces and (held or phase):
            raise ConfigError(f"the checkpoint stopped mid-epoch with --train.block_pieces {pieces} (this run: "
                              f"{self.pieces}); resume with --train.block_pieces {pieces} (any value resumes from "
                              "an epoch boundary)")
        if any(x is not None for x in self._pending):
            raise RuntimeError("blocks: a checkpoint's position taken up with pieces still in flight")
        self._loaded_pieces = pieces  # sub-epoch 0, phase 0 is also an epoch boundary: batches() decides
        self.held, self.phase = held, phase

    def held_ids(self, position):
        ids, _ = self._custody(self.env.rank, int(position.get("held", 0)), int(position.get("phase", 0)))
        return self.user_members[self.env.rank], ids

    def local_rows(self, position):
        _, rows = self._custody(self.env.rank, int(position.get("held", 0)), int(position.get("phase", 0)))
        # rows 0..n-1 (one piece, or pieces that fill their slots): say so, and checkpoints take views, not copies
        return None, None if np.array_equal(rows, np.arange(len(rows))) else rows

    def held_rows(self) -> Part:
        """Pieces still on their way that belong to this rank's custody are waited for and installed first (every
        rank checkpoints at the same step, after the sends of every phase before it)."""
        self._install_all()
        return super().held_rows()

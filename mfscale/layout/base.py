"""The interface every table layout implements (:class:`TableLayout`), and what all layouts share."""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .. import optim
from ..checkpoint import TABLES, Part, TableRows, check_complete
from ..config import JobConfig
from ..daybias import DayBias, day_key
from ..distributed import DistEnv
from ..errors import DataError
from ..implicit import Implicit
from ..model import BiasedMF, renorm_rows_
from ..shards import Dataset, days_of, find_sorted
from ..stream import resident_fits
from ..timebias import Combine, TimeBias, user_mean_days
from .rows import init_rows, train_counts

log = logging.getLogger("mfscale")

# A masked sweep over a whole table costs the same whatever the share of rows a step touches; the
# gather/scatter form costs per touched row. On the 2-core CPU (ml-10m synthetic, d=64) the sweep lost with
# 17% of the user rows touched and won clearly with 34% (steps 7.6 vs 10.0 ms); measured in
# benchmarks/RESULTS.md. Only where a rank's update is local (no rows exchanged).
DENSE_SWEEP_MIN_FRACTION = 0.3
DAY_BIAS_KEY = "day_bias.value"  # in ``TableLayout.weights``


@dataclass
class EvalShare:
    """The ratings of one split that this rank evaluates, with user ids local to ``TableLayout.eval_tables``."""

    user: np.ndarray
    item: np.ndarray  # global movie ids
    rating: np.ndarray
    day_row: np.ndarray | None = None  # each rating's row of ``TableLayout.day_bias`` (--model.day_bias)
    time: dict[str, np.ndarray] | None = None  # each rating's TimeBias.rating_features (--model.time_bins, user_drift)


def train_mean(data: Dataset) -> float:
    """The training split's mean rating (the global bias's start; older manifests: the mean of all ratings)."""
    rating = data.manifest["rating"]
    return float(rating.get("train_mean", rating["mean"]))


def fits_on_device(n_rows: int, mode: str, env: DistEnv) -> bool:
    """``--data.resident``: hold ``n_rows`` training ratings on the training device? (``auto``: if they fit)."""
    return mode == "on" or (mode == "auto" and resident_fits(n_rows, env.device, env.local_world_size))


def _take(t: torch.Tensor, n: int, idx: torch.Tensor | None) -> torch.Tensor:
    """Rows 0..n-1 of ``t`` (a view on a CPU), or the rows ``idx`` (a copy), on the CPU."""
    return (t[:n] if idx is None else t[idx]).cpu()


class TableLayout(abc.ABC):
    """Where the rows of the user and movie tables live, how their gradients reach them, and how they are saved.

    Four roles, each a group of methods below: the training batches of this rank (with local row ids), the
    update of the tables from a step's gradients (with any exchange between ranks), the share of a split this
    rank evaluates, and this rank's part of a checkpoint. A layout builds ``model`` (this rank's rows, in local
    ids) and ``opt`` (the tables' optimizer, ``optim.build_tables``). ``bytes_sent`` counts what this rank sent
    to others for the tables (gradient rows or blocks), ``decoded_bytes`` what it decoded of the training split
    at start-up; both for metrics.json and the benchmarks.
    """

    name = "?"
    model: BiasedMF
    opt: torch.optim.Optimizer
    steps_per_epoch: int
    resident: bool  # whether this rank's training ratings are held on the training device
    # Per table, from how many touched rows a fused step sweeps the whole local table; None = never.
    dense_min: tuple[int, int] | None = None
    # Whether this rank's batch gradient of every row it touches is the whole gradient (no exchange between
    # ranks), so gradients and the update can be fused in one pass (the C++ step).
    rows_complete: bool = False
    # --model.day_bias: the user-day biases of the users this rank holds (their rows are the user's rank's, as the
    # user rows are); every training batch then carries each rating's bias row as ``day_row``
    day_bias: DayBias | None = None
    # --model.time_bins / user_drift: the time-aware biases, row for row beside this rank's user and movie rows
    # (mfscale/timebias.py); every training batch then carries each rating's ``time_bin`` and ``time_dev``
    time_bias: TimeBias | None = None
    # --model.implicit: SVD++'s implicit rows (mfscale/implicit.py), y beside the movie rows, z beside the user rows;
    # the layout visits them at each phase's start and ends their epoch
    implicit: Implicit | None = None

    def __init__(self, cfg: JobConfig, env: DistEnv, data: Dataset, batch_size: int,
                 lr_scales: tuple[float, float] | None = None):
        self.cfg, self.env, self.data, self.batch_size = cfg, env, data, batch_size
        self.lr_scales = lr_scales  # per table, the factor on --optim.lr (optim.batch_lr_scales); None: 1
        self.bytes_sent = 0
        self.decoded_bytes = 0  # of the training split, by this rank at start-up
        self.n_train_rows = train_counts(data)  # training ratings per user row and per movie row
        self._eval_shares: dict[str, EvalShare] = {}  # eval_share's, per split

    def _build(self, user_ids: np.ndarray, item_rows: int, item_ids: np.ndarray) -> None:
        """Model with ``len(user_ids)`` user rows and ``item_rows`` movie rows (the first ``item_ids`` filled),
        and the tables' optimizer."""
        m = self.cfg.model
        self.model = BiasedMF(len(user_ids), item_rows, m.dim, mean=train_mean(self.data), init_std=0.0,
                              biases=m.biases).to(self.env.device)
        users_n, items_n = self.n_train_rows
        with torch.no_grad():
            for table, ids, n_train, k in ((self.model.users, user_ids, users_n, 0),
                                           (self.model.items, item_ids, items_n, 1)):
                rows = init_rows(ids, m.dim, m.init_std, self.cfg.train.seed, k)
                # Rows without training ratings never get a gradient: zero factors make their prediction
                # exactly the mean plus the other side's bias (cold start), not a random dot product.
                rows[torch.from_numpy(n_train[ids] == 0)] = 0.0
                table.weight[: len(ids)] = rows.to(self.env.device)
        self.opt = optim.build_tables(self.cfg.optim, self.model.sparse_parameters(), self.lr_scales)

    def _build_day_bias(self, user: np.ndarray, timestamp: np.ndarray) -> DayBias | None:
        """With --model.day_bias: the biases of every (user, day) of these training ratings (global user ids, all
        of the held users' ratings); None without."""
        if self.cfg.uses_day_bias():
            self.day_bias = DayBias(day_key(user, timestamp), self.env.device, self.model.users.weight.dtype)
        return self.day_bias

    def _build_time_bias(self, user_rows: np.ndarray, item: np.ndarray, day: np.ndarray,
                         held_items: tuple[np.ndarray, np.ndarray] | None) -> TimeBias | None:
        """With --model.time_bins / user_drift: the time-aware biases, from this rank's training ratings (local user
        rows, global movie ids and days; every rating of the held users). The bins span the training split's first
        to last day, agreed over the ranks, and their counts are the whole split's (summed over the ranks where
        each holds its users' ratings only: ``held_items``, the (global ids, local rows) of the movies this rank
        holds; None: every rank has every rating, and rows are global ids)."""
        if not self.cfg.uses_time_bias():
            return None
        span = torch.tensor([-int(day.min()) if len(day) else -(1 << 40), int(day.max()) if len(day) else -(1 << 40)],
                            dtype=torch.int64)
        if self.env.distributed:  # each rank sees its users' ratings: the span is the max of both over the ranks
            self.env.count("all_reduce")
            dist.all_reduce(span, op=dist.ReduceOp.MAX)
        first, last = -int(span[0]), int(span[1])
        if last < first:  # no training ratings anywhere (prepare refuses that): one bin of any day
            first = last = 0
        n_users = self.model.users.weight.shape[0]
        m = self.cfg.model
        t = self.time_bias = TimeBias(n_users, self.model.items.weight.shape[0], m.time_bins, m.user_drift, first,
                                      last, user_mean_days(user_rows, day, n_users),
                                      np.bincount(user_rows, minlength=n_users), self.env.device,
                                      self.model.users.weight.dtype)
        if t.n_bins:
            counts = t.bin_counts(item, day, self.data.n_items)
            if held_items is None:
                t.set_bin_counts(np.arange(self.data.n_items), counts)
            else:
                counts = self._sum_over_ranks(counts.astype(np.int64))
                t.set_bin_counts(held_items[1], counts[held_items[0]])
        return t

    def _sum_over_ranks(self, values: np.ndarray) -> np.ndarray:
        """``values`` summed elementwise over the ranks (one all_reduce; as is on one process)."""
        if not self.env.distributed:
            return values
        total = torch.from_numpy(values)
        self.env.count("all_reduce")
        dist.all_reduce(total)
        return total.numpy()

    def _build_implicit(self, user_rows: np.ndarray, item: np.ndarray, held_items: tuple[np.ndarray, np.ndarray] | None
                        ) -> Implicit | None:
        """With --model.implicit: the implicit rows, from this rank's training ratings (local user rows, global movie
        ids; every rating of the held users). Each movie's D_j sums over the whole split: over the ranks where each
        holds its users' ratings only (``held_items``: the (global ids, local rows) of the movies held now; None: every
        rank has every rating, and rows are global ids)."""
        if not self.cfg.model.implicit:
            return None
        m = self.model
        imp = self.implicit = Implicit(self.cfg.model.dim, user_rows, m.users.weight.shape[0], m.items.weight.shape[0],
                                       self.cfg.optim.reg_factor, self.cfg.optim.reg_implicit, self.env.device,
                                       m.users.weight.dtype)
        d_sums = np.bincount(item, weights=imp.d_terms(user_rows), minlength=self.data.n_items)
        if held_items is None:
            imp.set_inverse_d(np.arange(self.data.n_items), d_sums)
        else:
            imp.set_inverse_d(held_items[1], self._sum_over_ranks(d_sums)[held_items[0]])
        return imp

    def time_combine(self) -> Combine | None:
        """How a step's time-bias gradients combine over the ranks: None where each rank's rows are its own (one
        process, blocks); replicas override this."""
        return None

    def weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the trained values (the model's, the day and time biases): early stopping's best weights."""
        out = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        if self.day_bias is not None:
            out[DAY_BIAS_KEY] = self.day_bias.value.detach().cpu().clone()
        if self.time_bias is not None:
            out.update(self.time_bias.values())
        return out

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take up values ``weights`` gave."""
        dev = self.env.device
        self.model.load_state_dict({k: v.to(dev) for k, v in weights.items()
                                    if k != DAY_BIAS_KEY and not k.startswith("time.")})
        if self.day_bias is not None and DAY_BIAS_KEY in weights:
            self.day_bias.value.copy_(weights[DAY_BIAS_KEY].to(dev))
        if self.time_bias is not None:
            self.time_bias.load_values(weights)

    # -- training batches --------------------------------------------------------------------------
    @abc.abstractmethod
    def batches(self, epoch: int, start_step: int) -> Iterator[dict[str, Any]]:
        """This rank's batches of ``epoch`` from ``start_step`` on (local ids; ``global_rows``: the step's
        ratings over all ranks)."""

    @abc.abstractmethod
    def global_ids(self, batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """The global (user, movie) ids of a batch just yielded by ``batches`` (it carries local ids)."""

    # -- the update --------------------------------------------------------------------------------
    # Whether the ranks meet every step anyway (an exchange of gradient rows), so a per-step collective of the
    # global bias costs no extra wait; where not (blocks), the step keeps a copy per rank between sync points.
    meets_every_step: bool = False

    @abc.abstractmethod
    def sync_point(self, step_in_epoch: int) -> bool:
        """Whether the ranks meet after this step of the epoch (its last step always): there the loop votes on
        stopping and sums the training loss, and the step reconciles what the ranks kept apart. On one
        process every step (nothing to wait for)."""

    @abc.abstractmethod
    def apply_row_grads(self, tables: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]],
                        col_weights: torch.Tensor) -> None:
        """One optimizer step from this rank's ``(ids, rows, counts)`` per table (``sum / global_rows`` form)."""

    def day_grads(self, ids: torch.Tensor, grad: torch.Tensor, counts: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The user-day biases' gradient ``(unique rows, summed gradient, ratings)`` this rank applies, from its
        batch's: its own where its rows are its own (one process, blocks); replicas override this."""
        return ids, grad, counts

    def renorm_touched(self, user: torch.Tensor, item: torch.Tensor, max_norm: float) -> None:
        """``--model.max_norm``: renormalize, in place, the factor vectors of the rows of this step's batch (local
        ids) before the step reads them, as ``nn.Embedding(max_norm=...)``'s lookup does. Where this rank's rows
        are its own (one process, blocks) its batch's rows are all there is to do; replicas override this."""
        renorm_rows_(self.model.users.weight.detach(), user, max_norm)
        renorm_rows_(self.model.items.weight.detach(), item, max_norm)

    @abc.abstractmethod
    def apply_sparse_grads(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """One optimizer step from the tables' sparse ``.grad`` (the autograd step); clears them."""

    # -- evaluation --------------------------------------------------------------------------------
    @abc.abstractmethod
    def user_owner(self, user: np.ndarray) -> np.ndarray:
        """The rank that evaluates each (global) user's ratings."""

    @abc.abstractmethod
    def user_local(self, user: np.ndarray) -> np.ndarray:
        """Row of each owned (global) user in ``eval_tables()[0]``."""

    @abc.abstractmethod
    def eval_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(user rows of the users this rank evaluates, the whole movie table, global bias)."""

    def eval_time(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """--model.time_bins / user_drift: (alpha_u and t_u by user row, as ``eval_tables``'s users; the bin biases of
        every movie by global id, (movies, B)). Where this rank holds every movie row in global order (replicas, one
        process) its own; blocks override this (a collective)."""
        t = self.time_bias
        return t.users[:, 0], t.mean_day, t.bin_view(t.bins)[:, :, 0].contiguous()

    def eval_share(self, split: str) -> EvalShare:
        """This rank's ratings of ``split`` (splits are read whole, then filtered). The held-out splits' are kept
        after the first call (validation is evaluated every epoch, and its day rows are a search over the day
        keys); the training split's, read for the ranking metrics at the end, is not (the whole split)."""
        share = self._eval_shares.get(split)
        if share is None:
            share = self._read_eval_share(split)
            if split != "train":
                self._eval_shares[split] = share
        return share

    def _read_eval_share(self, split: str) -> EvalShare:
        arrays = self.data.read_split(split)
        user = arrays["user"].astype(np.int64)
        mine = self.user_owner(user) == self.env.rank
        day_row = None if self.day_bias is None else self.day_bias.rows(user[mine], arrays["timestamp"][mine])
        local = self.user_local(user[mine])
        time = None if self.time_bias is None else self.time_bias.rating_features(local,
                                                                                  days_of(arrays["timestamp"][mine]))
        return EvalShare(local, arrays["item"][mine].astype(np.int64), arrays["rating"][mine].astype(np.float32),
                         day_row, time)

    # -- checkpoint parts --------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def n_parts(self) -> int:
        """How many parts a checkpoint of this layout has (ranks with rows of their own)."""

    @abc.abstractmethod
    def writes_part(self) -> bool:
        """Whether this rank writes a part (False: a replica of rank 0's rows)."""

    @abc.abstractmethod
    def held_ids(self, position: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Global ids of the user and movie rows this rank holds at ``position``."""

    def position(self) -> dict[str, Any]:
        """Layout state a checkpoint needs besides the parts (e.g. which movie block each rank holds)."""
        return {}

    def set_position(self, position: dict[str, Any]) -> None:
        """Take up a checkpoint's ``position`` before its rows are loaded (nothing to do without one)."""
        return None

    def local_rows(self, position: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Per table, the local row of each id ``held_ids(position)`` lists; None: rows 0..n-1 in that order
        (a layout whose held rows have gaps between them says where they are)."""
        return None, None

    def held_rows(self) -> Part:
        """This rank's rows now: per table the global row ids, the rows and their optimizer state (on CPU).

        On a CPU these are views of the live tables (where the held rows are rows 0..n-1), valid until the next
        step (a checkpoint serializes them at once). Copying them first made the ~200 steps after every
        checkpoint up to 1.9x slower (ml-10m, 2-core CPU, benchmarks/RESULTS.md).
        """
        position = self.position()
        out: dict[str, TableRows] = {}
        held, local = self.held_ids(position), self.local_rows(position)
        for name, ids, rows, p in zip(TABLES, held, local, self.model.sparse_parameters(), strict=True):
            state = self.opt.state.get(p, {})
            n = len(ids)
            idx = None if rows is None else torch.from_numpy(rows).to(p.device)
            out[name] = TableRows(
                ids=torch.from_numpy(ids), weight=_take(p.detach(), n, idx),
                state={k: _take(state[k], n, idx) for k in optim.state_keys(self.opt) if k in state},
                step=int(state.get("step", 0)))
        time, implicit = None, None
        # the time-aware biases and the implicit rows sit row for row with the tables: the same ids and local rows
        idx = [None if r is None else torch.from_numpy(r).to(self.env.device) for r in local]
        if self.time_bias is not None:
            tb = self.time_bias
            time = tb.to_rows(held[0], held[1], _take(tb.users, len(held[0]), idx[0]),
                              _take(tb.bins, len(held[1]), idx[1]), _take(tb.mean_day, len(held[0]), idx[0]))
        if self.implicit is not None:
            implicit = self.implicit.to_rows(held[0], held[1], *self.implicit.held(idx[0], len(held[0]), idx[1],
                                                                                  len(held[1])))
        return Part(out, days=None if self.day_bias is None else self.day_bias.to_rows(), time=time,
                    implicit=implicit)

    def load_parts(self, parts: Iterable[Part], position: dict[str, Any], *, weights_only: bool = False,
                   where: object = "") -> None:
        """Fill this rank's rows (and optimizer state) from checkpoint parts of any layout and world size.

        Each part is read once and only the rows this rank holds are kept, so no rank assembles whole tables.
        """
        self.set_position(position)
        held = self.held_ids(self.position())
        rows_of = self.local_rows(self.position())
        # global id -> local row by a sorted search (tables can be large: no dict of ids)
        sorted_held = []
        for ids in held:
            order = np.argsort(ids, kind="stable")
            sorted_held.append((ids[order], order))
        filled = {name: np.zeros(len(ids), dtype=bool) for name, ids in zip(TABLES, held, strict=True)}
        steps: set[int] = set()
        parts = list(parts)
        if self.day_bias is not None:
            if any(part.days is None for part in parts):
                raise DataError(f"checkpoint {where} holds no user-day biases (trained without --model.day_bias)")
            self.day_bias.load([part.days for part in parts], where, weights_only=weights_only)
        for part in parts:
            if self.time_bias is not None:
                self.time_bias.check_part(part.time, {n: part.tables[n].ids.numpy() for n in TABLES}, where)
            if self.implicit is not None:
                self.implicit.check_part(part.implicit, {n: part.tables[n].ids.numpy() for n in TABLES}, where)
            for k, (name, p) in enumerate(zip(TABLES, self.model.sparse_parameters(), strict=True)):
                t = part.tables[name]
                gids = t.ids.numpy()
                s_ids, order = sorted_held[k]
                pos, hit = find_sorted(s_ids, gids)
                if not hit.any():
                    continue
                at = order[pos[hit]]  # index into held[k]
                local = torch.from_numpy(at if rows_of[k] is None else rows_of[k][at])
                src = torch.from_numpy(np.flatnonzero(hit))
                dev = p.device
                with torch.no_grad():
                    p[local.to(dev)] = t.weight[src].to(dev, p.dtype)
                if self.time_bias is not None:
                    self.time_bias.load_rows(name, part.time[name], src, local, weights_only)
                if self.implicit is not None:
                    self.implicit.load_rows(name, part.implicit[name], src, local)
                filled[name][at] = True
                keys = optim.state_keys(self.opt)
                if weights_only or not t.state:
                    continue
                if set(t.state) != set(keys):  # resume refuses another optimizer before reading any part
                    raise DataError(f"checkpoint {where} holds optimizer state {sorted(t.state)}, this run's "
                                    f"optimizer keeps {sorted(keys)}")
                state = optim.row_state(self.opt, p)
                for key in keys:
                    state[key][local.to(dev)] = t.state[key][src].to(dev, p.dtype)
                steps.add(t.step)
        check_complete(filled, where)
        if not weights_only and steps:
            for p in self.model.sparse_parameters():
                optim.row_state(self.opt, p)["step"] = max(steps)

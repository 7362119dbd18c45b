"""The user-day bias (``--model.day_bias``): one bias b_{u,t} per user and day with training ratings.

The prediction becomes ``mean + b_u + b_i + b_{u,day(t)} + <p_u, q_i>``, timeSVD's per-day user bias (Koren,
"Collaborative Filtering with Temporal Dynamics", KDD 2009: on Netflix the largest of its time effects). A
MovieLens user rates in sessions, and how generous they are moves from one session to the next. On real
ml-latest-small (random 10% test) it took 0.01 off the test RMSE, seeds 0-2 (benchmarks/RESULTS.md, session 11).
A (user, day) with no training rating predicts with b = 0, as does a prediction made without a time (recommend,
fold-in): a user's day bias moves all of their predictions of that day alike, so it never reorders a top-N list.
``export`` ships them for predictions with a time.

A day is ``timestamp // 86400`` (UTC). The biases are a table keyed by ``key = user * 2^20 + day`` (``day_key``),
held by the rank that owns the user (blocks: its user block; replicated: every rank), so they never rotate.
Each training rating carries its bias row (``rows``), found once when a resident split is loaded (per batch when
streamed).

The step trains them with the tables: the table step fits ``rating - b`` and its errors e (the whole model's) give
each touched bias ``g = sum 2 e / G + count / n * 2 * reg_day * b / G`` (G the global batch's ratings, n the key's
training ratings: its L2 ``reg_day b^2`` once per epoch, spread over them), stepped as RowRMSprop steps a bias
column: ``s += (g^2 - s)(1 - beta2)``, ``b -= lr sqrt(1 - beta2^t) g / (sqrt(s) + eps)`` at the tables' learning
rate and schedule, t this table's steps. On a CPU the C++ table step does all of it in its own pass
(``cpu_step.fused_step``'s ``days``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .checkpoint import TableRows
from .errors import DataError
from .optim import sum_rows
from .shards import DAY_SECONDS, find_sorted

DAY_BITS = 20  # days since 1970 fit in 2^20 (until the year 4840)


def day_key(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """The table key of each (global user id, unix timestamp)."""
    day = np.asarray(timestamp, dtype=np.int64) // DAY_SECONDS
    return (np.asarray(user, dtype=np.int64) << DAY_BITS) + day


class DayBias:
    """This rank's user-day biases: ``keys`` (sorted, unique) and per key a bias and its RMSprop state.

    Row ``len(keys)`` is the "no such day" row: it stays 0 and no update touches it, so a lookup that misses
    (a test rating on a day without training ratings) predicts without a day bias.
    """

    def __init__(self, keys: np.ndarray, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        dtype = dtype or torch.get_default_dtype()
        self.keys, counts = np.unique(np.asarray(keys, dtype=np.int64), return_counts=True)
        n = len(self.keys) + 1
        # One row per key, [bias, RMSprop state, 1 / training ratings, gradient scratch]: a rating's step reads one
        # cache line, not one per array (the keys outnumber the users 25x on ml-10m: they live in memory, not cache).
        # The third column spreads a key's damping reg_day b^2 over its ratings.
        self.table = torch.zeros(n, 4, dtype=dtype, device=device)
        self.table[:, 3] = math.nan  # the C++ step's "not touched in this step" (csrc: day_step_impl)
        self.table[:-1, 2] = torch.from_numpy(1.0 / np.maximum(counts, 1)).to(device, dtype)
        self.value, self.sq, self.inv_count = self.table[:, 0], self.table[:, 1], self.table[:, 2]
        self.steps = 0

    @property
    def missing(self) -> int:
        return len(self.keys)

    def rows(self, user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
        """Row of each (global user, timestamp): its key's, or ``missing``."""
        pos, hit = find_sorted(self.keys, day_key(user, timestamp))
        return np.where(hit, pos, len(self.keys))

    def offset(self, rows: torch.Tensor) -> torch.Tensor:
        """The biases of ``rows`` (a gather)."""
        return self.value[rows]

    def _step_size(self, lr: float, beta2: float) -> float:
        self.steps += 1
        return lr * math.sqrt(1 - beta2 ** self.steps)

    @torch.no_grad()
    def update(self, ids: torch.Tensor, grad: torch.Tensor, counts: torch.Tensor, *, lr: float, beta2: float,
               eps: float, l2: float) -> None:
        """One step of the unique rows ``ids`` with summed gradient ``grad`` (``sum / G`` form, no L2) and their
        ratings ``counts``; ``l2`` = 2 reg_day / G: a key's damping reg_day b^2, a share 1 / n per rating of its n."""
        size = self._step_size(lr, beta2)
        keep = ids != self.missing  # the empty row never moves
        ids, grad, counts = ids[keep], grad[keep], counts[keep]
        b = self.value[ids]
        g = grad + counts * self.inv_count[ids] * l2 * b
        s = self.sq[ids]
        s = s + (g * g - s) * (1 - beta2)
        self.sq[ids] = s
        self.value[ids] = b - size * g / (s.sqrt() + eps)

    def op_args(self, rows: torch.Tensor, *, lr: float, beta2: float, l2: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                         float, float]:
        """This step's arguments for the C++ table step, which takes the biases' step in the same op
        (``cpu_step.fused_step``'s ``days``); counts the step."""
        return self.table, rows, self._step_size(lr, beta2), l2

    def targets(self, rows: torch.Tensor, rating: torch.Tensor) -> torch.Tensor:
        """``rating - b`` for each rating's row: what the tables' step fits."""
        return rating.to(self.table.dtype) - self.offset(rows)

    # -- checkpoints -------------------------------------------------------------------------------
    def to_rows(self) -> TableRows:
        """This rank's biases as a checkpoint table (ids = keys)."""
        n = len(self.keys)
        return TableRows(torch.from_numpy(self.keys.copy()), self.value[:n, None].cpu().clone(),
                         {"sq": self.sq[:n, None].cpu().clone()}, self.steps)

    def load(self, tables: list[TableRows], where: object = "", *, weights_only: bool = False) -> None:
        """Fill this rank's biases from the checkpoint parts' day tables (any layout and world size); every key of
        this rank must be in one of them."""
        filled = np.zeros(len(self.keys), dtype=bool)
        steps = 0
        for t in tables:
            keys = t.ids.numpy()
            pos, hit = find_sorted(self.keys, keys)
            at = torch.from_numpy(pos[hit]).to(self.value.device)
            src = torch.from_numpy(np.flatnonzero(hit))
            self.value[at] = t.weight[src, 0].to(self.value)
            if not weights_only and "sq" in t.state:
                self.sq[at] = t.state["sq"][src, 0].to(self.sq)
            filled[pos[hit]] = True
            steps = max(steps, int(t.step))
        if not filled.all():
            raise DataError(f"checkpoint {where} is incomplete: {int((~filled).sum()):,} user-day biases are in none "
                            "of its parts")
        if not weights_only:
            self.steps = steps


def group(rows: torch.Tensor, coef: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unique rows, summed ``coef`` per row, ratings per row) of a batch whose ratings have bias rows ``rows``."""
    ids, v = sum_rows(rows, torch.stack([coef, torch.ones_like(coef)], 1), n_rows)
    return ids, v[:, 0], v[:, 1]

"""Time-aware biases (``--model.time_bins``, ``--model.user_drift``): timeSVD's item and user drift.

Koren, "Collaborative Filtering with Temporal Dynamics" (KDD 2009), models a movie's popularity and a user's
generosity as moving with time. The prediction gains

    b_{i, bin(t)}          (--model.time_bins B: an item bias per time bin)
    alpha_u dev_u(t)       (--model.user_drift: a user's linear drift)

with day(t) = t // 86400 (UTC), bin(t) = clip((day - first) B // (last - first + 1), 0, B - 1) over the training
split's first and last day (a rating before or after them falls in the first or last bin), and
dev_u(t) = sign(day - t_u) |day - t_u|^0.4, t_u the mean day of u's training ratings (Koren's form; 0 for a user
without training ratings, whose alpha never moves).

Where the rows live: the bin biases are a (movie rows, 4B) table beside the movie table, row for row (each bin
[value, state, 1 / n, scratch]), so they go wherever a movie row goes (blocks: they rotate with their movie block in
the same message; checkpoints: by global movie id, at any world size, the counts too); alpha_u and t_u sit beside
the user table, on the rank that owns the user. Each rating's bin and dev_u(t) are found once where its split is
loaded (``rating_features``); on a CPU where a rank's rows are its own, two C++ ops (``cpu_step.time_target``,
``time_step``) read them with the batch.

Training: the tables' step fits ``rating - b_bin - alpha dev`` (and the user-day bias, ``mfscale.daybias``) and
returns its errors e, which are the whole model's; each touched bin bias then takes the gradient
``g = sum 2 e / G + count / n 2 reg_time b / G`` and each alpha ``g = sum 2 e dev / G + count / n 2 reg_drift
alpha / G`` (G the global batch's ratings, n the bin's or the user's training ratings: an L2 of ``reg x^2`` once per
epoch, spread over them, as the user-day biases' ``reg_day``; a per-rating L2 would not damp a bin of few ratings
at all, and on the synthetic presets, which have no time signal, it cost 0.005), stepped as RowRMSprop steps a
bias column: ``s += (g^2 - s)(1 - beta2)``, ``x -= lr sqrt(1 - beta2^t) g / (sqrt(s) + eps)`` at the tables'
learning rate and schedule, t this term's steps. Each bin's n travels with it (it is the whole split's count, which
a blocks rank alone does not see). On real ml-latest-small both together gain 0.0011 beside the user-day biases,
about one seed spread, and cost 0.0008-0.0009 on the synthetic presets and 0.73x the ratings/s on ml-10m
(benchmarks/RESULTS.md, session 14): both are off by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from . import cpu_step
from .checkpoint import TableRows
from .errors import DataError
from .optim import sum_rows

DRIFT_POWER = 0.4  # Koren's beta in dev_u(t)

# Combines a step's grouped gradients over the ranks that hold copies of the same rows (replicas); identity where
# each rank's rows are its own. Takes and returns [(ids, (n, 2) [summed gradient, ratings])] for [bins, users].
Combine = Callable[[list[tuple[torch.Tensor, torch.Tensor]], list[int]], list[tuple[torch.Tensor, torch.Tensor]]]


def user_mean_days(user_rows: np.ndarray, day: np.ndarray, n_rows: int) -> np.ndarray:
    """t_u per row: the mean day of each row's ratings (0 for a row without any), float64."""
    count = np.bincount(user_rows, minlength=n_rows)
    total = np.bincount(user_rows, weights=day.astype(np.float64), minlength=n_rows)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


class TimeBias:
    """This rank's time-aware biases as rows [value, RMSprop state, 1 / training ratings, scratch] (the C++
    ``time_step``'s and the user-day biases' layout; the scratch is NaN at rest): ``bins`` (movie rows, 4B), B such
    rows per movie, row for row with the movie table (``bin_rows``: the same memory as (movie rows x B, 4)), and
    ``users`` (user rows, 4), alpha_u's, row for row with the user table, with ``mean_day`` (t_u) beside them.
    ``first``/``last``: the training split's first and last day (the bins' span). The bins' counts are set by
    ``set_bin_counts``."""

    def __init__(self, user_rows: int, item_rows: int, n_bins: int, drift: bool, first: int, last: int,
                 mean_day: np.ndarray, user_count: np.ndarray, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None):
        dtype = dtype or torch.get_default_dtype()
        self.n_bins, self.drift, self.first, self.last = int(n_bins), bool(drift), int(first), int(last)
        self.bins = torch.zeros(item_rows, 4 * self.n_bins, dtype=dtype, device=device)
        self.bin_rows = self.bins.view(-1, 4)
        self.bin_rows[:, 2] = 1.0
        self.bin_rows[:, 3] = math.nan
        self.users = torch.zeros(user_rows, 4, dtype=dtype, device=device)
        self.users[: len(user_count), 2] = torch.from_numpy(1.0 / np.maximum(np.asarray(user_count, np.float64), 1)
                                                            ).to(device, dtype)
        self.users[:, 3] = math.nan
        self.mean_day = torch.zeros(user_rows, dtype=dtype, device=device)
        self.mean_day[: len(mean_day)] = torch.from_numpy(np.asarray(mean_day, dtype=np.float64)).to(device, dtype)
        self.steps = 0

    def bin_view(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of ``bins`` (or a copy of some) as (rows, B, 4)."""
        return t.view(t.shape[0], self.n_bins, 4)

    def bin_counts(self, item: np.ndarray, day: np.ndarray, n_items: int) -> np.ndarray:
        """Training ratings per (global movie, bin) of ratings ``item`` (global ids) on ``day``: (n_items, B)."""
        k = self.bin_of(torch.from_numpy(np.asarray(day, np.int64))).numpy()
        return np.bincount(np.asarray(item, np.int64) * self.n_bins + k, minlength=n_items * self.n_bins
                           ).reshape(n_items, self.n_bins)

    def set_bin_counts(self, rows: np.ndarray, counts: np.ndarray) -> None:
        """The whole split's ratings per bin (``counts``: one row per local row ``rows``), as 1 / n."""
        inv = torch.from_numpy(1.0 / np.maximum(np.asarray(counts, np.float64), 1)).to(self.bins)
        self.bin_view(self.bins)[torch.from_numpy(np.asarray(rows, np.int64)).to(self.bins.device), :, 2] = inv

    # -- features and predictions -------------------------------------------------------------------
    def bin_of(self, day: torch.Tensor) -> torch.Tensor:
        """Each day's bin (int64)."""
        span = self.last - self.first + 1
        return ((day.long() - self.first) * self.n_bins).div(span, rounding_mode="floor").clamp_(0, self.n_bins - 1)

    def rating_features(self, user_rows: np.ndarray, day: np.ndarray) -> dict[str, np.ndarray]:
        """Each rating's bin (int16; 0 without bins) and dev_u(t) (float32; 0 without the drift), from its local user
        row and day: fixed for a rating, so found once where its split is loaded (per batch when streamed), as the
        user-day biases' rows are; batches carry them as ``time_bin`` and ``time_dev``."""
        day = np.asarray(day, np.int64)
        out = {"time_bin": np.zeros(len(day), np.int16), "time_dev": np.zeros(len(day), np.float32)}
        if self.n_bins:
            span = self.last - self.first + 1
            out["time_bin"] = np.clip((day - self.first) * self.n_bins // span, 0, self.n_bins - 1).astype(np.int16)
        if self.drift:
            x = day - self.mean_day.cpu().numpy().astype(np.float64)[np.asarray(user_rows, np.int64)]
            out["time_dev"] = (np.sign(x) * np.abs(x) ** DRIFT_POWER).astype(np.float32)
        return out

    def uses_op(self, combine: Combine | None) -> bool:
        """Whether the C++ ops step these biases: on a CPU where each rank's rows are its own (no ``combine``)."""
        return combine is None and self.users.device.type == "cpu" and cpu_step.loads()

    def target(self, user: torch.Tensor, item: torch.Tensor, time_bin: torch.Tensor, time_dev: torch.Tensor,
               rating: torch.Tensor, op: bool) -> torch.Tensor:
        """``rating - b_{i,bin} - alpha_u dev`` per rating of a batch (local rows, int64; its ``rating_features``), in
        the tables' dtype: what the tables' step fits."""
        rating = rating.to(self.users.dtype)
        if op:
            return cpu_step.time_target(self.bins, self.users, user, item, time_bin, time_dev, rating.contiguous(),
                                        self.n_bins, self.drift)
        bin_row, dev = self._rows(item, time_bin, time_dev)
        out = rating.clone()
        if bin_row is not None:
            out -= self.bins.view(-1).index_select(0, bin_row * 4)
        if dev is not None:
            out -= self.users.view(-1).index_select(0, user * 4) * dev
        return out

    def _rows(self, item: torch.Tensor, time_bin: torch.Tensor, time_dev: torch.Tensor
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(row of ``bin_rows``, dev in the tables' dtype) per rating; None for a term that is off."""
        b = item * self.n_bins + time_bin.long() if self.n_bins else None
        d = time_dev.to(self.users.dtype) if self.drift else None
        return b, d

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, user: torch.Tensor, item: torch.Tensor, time_bin: torch.Tensor, time_dev: torch.Tensor,
               err: torch.Tensor, *, global_rows: int, lr: float, beta2: float, eps: float, reg: float,
               reg_drift: float, combine: Combine | None = None, op: bool = False) -> None:
        """One step from the batch's errors ``err`` (prediction - rating, before the step; local rows, int64): see the
        module. ``op``: in the C++ ``time_step`` (``uses_op``), else torch ops, the ranks' sums combined by
        ``combine`` (replicas)."""
        self.steps += 1
        size = lr * math.sqrt(1 - beta2 ** self.steps)
        l2 = (2.0 * reg / global_rows, 2.0 * reg_drift / global_rows)
        err = err.to(self.users.dtype)
        if op:
            cpu_step.time_step(self.bins, self.users, user, item, time_bin, time_dev, err.contiguous(), self.n_bins,
                               self.drift, 2.0 / global_rows, size, l2, beta2, eps)
            return
        coef = err * (2.0 / global_rows)
        bin_row, dev = self._rows(item, time_bin, time_dev)
        terms = [(t, rows, c, w) for t, rows, c, w in (
            (self.bin_rows, bin_row, coef, l2[0]),
            (self.users, None if dev is None else user, None if dev is None else coef * dev, l2[1]))
            if rows is not None]
        local = [sum_rows(rows, torch.stack([c, torch.ones_like(c)], 1), len(table)) for table, rows, c, _ in terms]
        if combine is not None:
            local = combine(local, [len(table) for table, *_ in terms])
        for (table, _, _, w), (ids, v) in zip(terms, local, strict=True):
            x = table[ids, 0]
            g = v[:, 0] + v[:, 1] * table[ids, 2] * w * x
            s = table[ids, 1]
            s = s + (g * g - s) * (1 - beta2)
            table[ids, 1] = s
            table[ids, 0] = x - size * g / (s.sqrt() + eps)

    # -- checkpoints -------------------------------------------------------------------------------
    def to_rows(self, user_ids: np.ndarray, item_ids: np.ndarray, users: torch.Tensor, bins: torch.Tensor,
                mean_day: torch.Tensor) -> dict[str, object]:
        """This rank's rows as checkpoint tables: ``users``/``bins``/``mean_day``, the rows of this object's tensors
        beside the held table rows of global ids ``user_ids``/``item_ids`` (on the CPU)."""
        b = self.bin_view(bins)
        return {"items": TableRows(torch.from_numpy(item_ids), b[:, :, 0].clone(),
                                   {"sq": b[:, :, 1].clone(), "inv_count": b[:, :, 2].clone()}, self.steps),
                "users": TableRows(torch.from_numpy(user_ids), users[:, :1].clone(),
                                   {"sq": users[:, 1:2].clone(), "mean_day": mean_day[:, None].clone()}, self.steps),
                "span": torch.tensor([self.first, self.last, self.n_bins], dtype=torch.int64)}

    def check_part(self, time: dict[str, object] | None, ids: dict[str, np.ndarray], where: object) -> None:
        """A checkpoint part's time tables exist, hold this run's bins and the part's table ids."""
        if time is None:
            raise DataError(f"checkpoint {where} holds no time-aware biases (trained without --model.time_bins or "
                            "--model.user_drift)")
        k = int(time["span"][2])
        if k != self.n_bins:
            raise DataError(f"checkpoint {where} holds {k} time bins per movie, this run {self.n_bins} "
                            f"(--model.time_bins)")
        for name in ("items", "users"):
            if not np.array_equal(time[name].ids.numpy(), ids[name]):
                raise DataError(f"checkpoint {where}: its time-aware biases do not match its {name} rows")

    def load_rows(self, name: str, rows: TableRows, src: torch.Tensor, local: torch.Tensor,
                  weights_only: bool) -> None:
        """Rows ``src`` of a part's ``name`` time table into this rank's local rows ``local``."""
        dev = self.users.device
        local = local.to(dev)
        if name == "items":
            b = self.bin_view(self.bins)
            b[local, :, 0] = rows.weight[src].to(dev, self.bins.dtype)
            # a bin's count is the data's, wherever the checkpoint's custody put its movie
            if "inv_count" in rows.state:  # (weights-only parts, at epoch boundaries: the counts built are right)
                b[local, :, 2] = rows.state["inv_count"][src].to(dev, self.bins.dtype)
            if not weights_only and "sq" in rows.state:
                b[local, :, 1] = rows.state["sq"][src].to(dev, self.bins.dtype)
        else:
            self.users[local, 0] = rows.weight[src, 0].to(dev, self.users.dtype)
            if not weights_only and "sq" in rows.state:
                self.users[local, 1] = rows.state["sq"][src, 0].to(dev, self.users.dtype)
        if not weights_only:
            self.steps = max(self.steps, int(rows.step))

    # -- early stopping's best values --------------------------------------------------------------
    def values(self) -> dict[str, torch.Tensor]:
        return {"time.bins": self.bin_view(self.bins)[:, :, 0].detach().cpu().clone(),
                "time.alpha": self.users[:, 0].detach().cpu().clone()}

    def load_values(self, values: dict[str, torch.Tensor]) -> None:
        if "time.bins" in values:
            self.bin_view(self.bins)[:, :, 0] = values["time.bins"].to(self.bins)
            self.users[:, 0] = values["time.alpha"].to(self.users)

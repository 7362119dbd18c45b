"""Time-aware biases (``--model.time_bins``, ``--model.user_drift``): timeSVD's item and user drift.

Koren, "Collaborative Filtering with Temporal Dynamics" (KDD 2009), models a movie's popularity and a user's
generosity as moving with time. The prediction gains

    b_{i, bin(t)}          (--model.time_bins B: an item bias per time bin)
    alpha_u dev_u(t)       (--model.user_drift: a user's linear drift)

with day(t) = t // 86400 (UTC), bin(t) = clip((day - first) B // (last - first + 1), 0, B - 1) over the training
split's first and last day (a rating before or after them falls in the first or last bin), and
dev_u(t) = sign(day - t_u) |day - t_u|^0.4, t_u the mean day of u's training ratings (Koren's form; 0 for a user
without training ratings, whose alpha never moves).

Where the rows live: the bin biases are a (movie rows, B) table beside the movie table, row for row, so they go
wherever a movie row goes (blocks: they rotate with their movie block in the same message; checkpoints: by
global movie id, at any world size); alpha_u and t_u sit beside the user table, on the rank that owns the user.

Training: the tables' step fits ``rating - b_bin - alpha dev`` (and the user-day bias, ``mfscale.daybias``) and
returns its errors e, which are the whole model's; each touched bin bias then takes the gradient
``g = sum 2 e / G + count / n 2 reg_time b / G`` and each alpha ``g = sum 2 e dev / G + count / n 2 reg_drift
alpha / G`` (G the global batch's ratings, n the bin's or the user's training ratings: an L2 of ``reg x^2`` once per
epoch, spread over them, as the user-day biases' ``reg_day``; a per-rating L2 would not damp a bin of few ratings
at all, and on the synthetic presets, which have no time signal, it cost 0.005), stepped as RowRMSprop steps a
bias column: ``s += (g^2 - s)(1 - beta2)``, ``x -= lr sqrt(1 - beta2^t) g / (sqrt(s) + eps)`` at the tables'
learning rate and schedule, t this term's steps. Each bin's n travels with it (it is the whole split's count, which
a blocks rank alone does not see). On real ml-latest-small neither pays beside the user-day biases
(benchmarks/RESULTS.md, session 14): both are off by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

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
    """This rank's time-aware biases: ``bins`` (movie rows, 3B) = [bias per bin | its RMSprop state | 1 / the bin's
    training ratings], row for row with the movie table, and ``users`` (user rows, 4) = [alpha_u, its RMSprop state,
    t_u, 1 / the user's training ratings], row for row with the user table. ``first``/``last``: the training split's
    first and last day (the bins' span). The bins' counts are set by ``set_bin_counts``."""

    def __init__(self, user_rows: int, item_rows: int, n_bins: int, drift: bool, first: int, last: int,
                 mean_day: np.ndarray, user_count: np.ndarray, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None):
        dtype = dtype or torch.get_default_dtype()
        self.n_bins, self.drift, self.first, self.last = int(n_bins), bool(drift), int(first), int(last)
        self.bins = torch.zeros(item_rows, 3 * self.n_bins, dtype=dtype, device=device)
        self.users = torch.zeros(user_rows, 4, dtype=dtype, device=device)
        self.users[: len(mean_day), 2] = torch.from_numpy(np.asarray(mean_day, dtype=np.float64)).to(device, dtype)
        self.users[: len(user_count), 3] = torch.from_numpy(1.0 / np.maximum(np.asarray(user_count, np.float64), 1)
                                                            ).to(device, dtype)
        self.steps = 0

    def bin_counts(self, item: np.ndarray, day: np.ndarray, n_items: int) -> np.ndarray:
        """Training ratings per (global movie, bin) of ratings ``item`` (global ids) on ``day``: (n_items, B)."""
        k = self.bin_of(torch.from_numpy(np.asarray(day, np.int64))).numpy()
        return np.bincount(np.asarray(item, np.int64) * self.n_bins + k, minlength=n_items * self.n_bins
                           ).reshape(n_items, self.n_bins)

    def set_bin_counts(self, rows: np.ndarray, counts: np.ndarray) -> None:
        """The whole split's ratings per bin (``counts``: one row per local row ``rows``), as 1 / n."""
        k = self.n_bins
        inv = torch.from_numpy(1.0 / np.maximum(np.asarray(counts, np.float64), 1)).to(self.bins)
        self.bins[torch.from_numpy(np.asarray(rows, np.int64)).to(self.bins.device), 2 * k:] = inv

    # -- features and predictions -------------------------------------------------------------------
    def bin_of(self, day: torch.Tensor) -> torch.Tensor:
        """Each day's bin (int64)."""
        span = self.last - self.first + 1
        return ((day.long() - self.first) * self.n_bins).div(span, rounding_mode="floor").clamp_(0, self.n_bins - 1)

    def dev_of(self, mean_day: torch.Tensor, day: torch.Tensor) -> torch.Tensor:
        """dev_u(t) from each rating's t_u and day."""
        x = day.to(mean_day.dtype) - mean_day
        return torch.sign(x) * x.abs().pow(DRIFT_POWER)

    def features(self, user: torch.Tensor, day: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(bin, dev) of each rating of a batch (``user``: local user rows), None for a term that is off."""
        b = self.bin_of(day) if self.n_bins else None
        d = self.dev_of(self.users[user.long(), 2], day) if self.drift else None
        return b, d

    def offset(self, user: torch.Tensor, item: torch.Tensor, bin_: torch.Tensor | None,
               dev: torch.Tensor | None) -> torch.Tensor:
        """b_{i,bin} + alpha_u dev for each rating (local rows)."""
        out = torch.zeros(user.shape[0], dtype=self.users.dtype, device=self.users.device)
        if bin_ is not None:
            out += self.bins[item.long(), bin_]
        if dev is not None:
            out += self.users[user.long(), 0] * dev
        return out

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, user: torch.Tensor, item: torch.Tensor, bin_: torch.Tensor | None, dev: torch.Tensor | None,
               err: torch.Tensor, *, global_rows: int, lr: float, beta2: float, eps: float, reg: float,
               reg_drift: float, combine: Combine | None = None) -> None:
        """One step from the batch's errors ``err`` (prediction - rating, before the step): see the module."""
        self.steps += 1
        size = lr * math.sqrt(1 - beta2 ** self.steps)
        coef = err.to(self.users.dtype) * (2.0 / global_rows)
        ones = torch.ones_like(coef)
        k = self.n_bins
        local, n_rows = [], []
        if bin_ is not None:  # flat index of (movie row, bin) into the (rows, B) values
            local.append(sum_rows(item.long() * k + bin_, torch.stack([coef, ones], 1), self.bins.shape[0] * k))
            n_rows.append(self.bins.shape[0] * k)
        if dev is not None:
            local.append(sum_rows(user.long(), torch.stack([coef * dev, ones], 1), self.users.shape[0]))
            n_rows.append(self.users.shape[0])
        if combine is not None:
            local = combine(local, n_rows)
        if bin_ is not None:
            ids, v = local.pop(0)
            row, col = ids // k, ids % k
            b = self.bins[row, col]
            g = v[:, 0] + v[:, 1] * self.bins[row, col + 2 * k] * (2.0 * reg / global_rows) * b
            s = self.bins[row, col + k]
            s = s + (g * g - s) * (1 - beta2)
            self.bins[row, col + k] = s
            self.bins[row, col] = b - size * g / (s.sqrt() + eps)
        if dev is not None:
            ids, v = local.pop(0)
            a = self.users[ids, 0]
            g = v[:, 0] + v[:, 1] * self.users[ids, 3] * (2.0 * reg_drift / global_rows) * a
            s = self.users[ids, 1]
            s = s + (g * g - s) * (1 - beta2)
            self.users[ids, 1] = s
            self.users[ids, 0] = a - size * g / (s.sqrt() + eps)

    # -- checkpoints -------------------------------------------------------------------------------
    def to_rows(self, user_ids: np.ndarray, item_ids: np.ndarray, users: torch.Tensor, bins: torch.Tensor
                ) -> dict[str, object]:
        """This rank's rows as checkpoint tables: ``users``/``bins``, the rows of ``self.users``/``self.bins``
        beside the held table rows of global ids ``user_ids``/``item_ids`` (on the CPU)."""
        k = self.n_bins
        return {"items": TableRows(torch.from_numpy(item_ids), bins[:, :k].clone(),
                                   {"sq": bins[:, k:2 * k].clone(), "inv_count": bins[:, 2 * k:].clone()}, self.steps),
                "users": TableRows(torch.from_numpy(user_ids), users[:, :1].clone(),
                                   {"sq": users[:, 1:2].clone(), "mean_day": users[:, 2:3].clone()}, self.steps),
                "span": torch.tensor([self.first, self.last, k], dtype=torch.int64)}

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
        local, k = local.to(dev), self.n_bins
        if name == "items":
            self.bins[local, :k] = rows.weight[src].to(dev, self.bins.dtype)
            # a bin's count is the data's, wherever the checkpoint's custody put its movie
            if "inv_count" in rows.state:  # (weights-only parts, at epoch boundaries: the counts built are right)
                self.bins[local, 2 * k:] = rows.state["inv_count"][src].to(dev, self.bins.dtype)
            if not weights_only and "sq" in rows.state:
                self.bins[local, k:2 * k] = rows.state["sq"][src].to(dev, self.bins.dtype)
        else:
            self.users[local, 0] = rows.weight[src, 0].to(dev, self.users.dtype)
            if not weights_only and "sq" in rows.state:
                self.users[local, 1] = rows.state["sq"][src, 0].to(dev, self.users.dtype)
        if not weights_only:
            self.steps = max(self.steps, int(rows.step))

    # -- early stopping's best values --------------------------------------------------------------
    def values(self) -> dict[str, torch.Tensor]:
        return {"time.bins": self.bins[:, : self.n_bins].detach().cpu().clone(),
                "time.alpha": self.users[:, 0].detach().cpu().clone()}

    def load_values(self, values: dict[str, torch.Tensor]) -> None:
        if "time.bins" in values:
            self.bins[:, : self.n_bins] = values["time.bins"].to(self.bins)
            self.users[:, 0] = values["time.alpha"].to(self.users)

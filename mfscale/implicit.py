"""Implicit feedback (``--model.implicit``): SVD++ (Koren, KDD 2008) in a form that trains under the blocks layout.

SVD++ predicts with ``p_u + |N(u)|^-1/2 sum_{j in N(u)} y_j``, N(u) the movies u rated in training, and regularizes p_u
and the y rows. Written with the user's whole vector ``p~_u = p_u + z_u``, ``z_u = |N(u)|^-1/2 sum_{j in N(u)} y_j``,
the same objective reads

    sum_ratings e(p~_u, q_i)^2 + reg_factor n_u |p~_u - z_u|^2 + reg_implicit m_j |y_j|^2   (+ the other terms)

(n_u, m_j: the user's and the movie's training ratings; mfscale's L2 is per rating): the y rows enter only through
the users' L2, which pulls each user toward its implicit vector z_u instead of toward 0. So the user table holds
p~_u (every tool that reads factors, ``recommend``, ``analyze``, ``export``, predicts with it unchanged), the
training step pulls user rows toward z_u (the C++ op's ``user_prior``, or the same term in the torch steps), and the
y rows never enter a training step.

What is approximate: z_u is held fixed within an epoch, and the y rows take their steps between phases, not every
step (the exact gradient of y at every step would need every user's z_u anew after each step, and under the blocks
layout a user's N(u) spans every movie block). Per epoch, in each phase in which a rank holds a piece of the movies
(one process: one phase, every movie), before the phase's steps:

1. the piece's y rows take a majorized Newton step on the rank's users' share of the objective above:
   ``y_j -= (-sum_{u in N(j)} reg_factor sqrt(n_u) (p~_u - z_u) + reg_implicit m_j^r y_j) / D_j`` with
   ``D_j = sum_{u in N(j)} reg_factor n_u + reg_implicit m_j`` (the whole split's: ``D_j I`` bounds the Hessian, so a
   step never increases the objective for fixed users), m_j^r the rank's ratings of j;
2. the rank's users add the piece's share of their next implicit vector: ``z'_u += n_u^-1/2 sum_{j in N(u), j in
   piece} y_j``;

and at the epoch's end z = z', z' = 0. Over W ranks the W partial steps of a movie sum to one process's step when the
users did not move in between (they did: their phases interleave with training). Both products are sparse matrix
products over the rank's ratings of the piece (CSR, built once at start-up: ~24 bytes per training rating of the
rank, twice what the ratings themselves take), 0.29 s against an epoch's 1.30 s of steps on the ml-10m preset, one
process (benchmarks/RESULTS.md, session 15).

Where the rows live: y (with 1 / D_j) beside the movie table, row for row, so it rotates with its movie block and
checkpoints carry it by global movie id; z and z' beside the user table, on the user's rank.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable
from typing import Any

import numpy as np
import torch

from .checkpoint import TableRows
from .errors import DataError


def _csr(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape: tuple[int, int],
         device: torch.device) -> torch.Tensor:
    """A CSR matrix of these entries (int64 indices; duplicates summed by the product)."""
    order = np.argsort(rows, kind="stable")
    crow = np.zeros(shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=crow[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": matrix products are all this needs of it
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(cols[order].astype(np.int64)),
                                       torch.from_numpy(values[order]), size=shape,
                                       check_invariants=False).to(device)  # built sorted here


class Implicit:
    """The implicit rows of one rank: ``items`` (movie rows, dim + 1) = [y_j, 1 / D_j], ``z`` and ``z_next`` (user
    rows, dim), and each phase's ratings as two CSR matrices (``add_group``)."""

    def __init__(self, dim: int, user_rows: np.ndarray, n_user_rows: int, n_item_rows: int, reg: float,
                 reg_implicit: float, device: torch.device, dtype: torch.dtype):
        """``user_rows``: the local user row of each of this rank's training ratings (all of its users' ratings)."""
        self.dim, self.reg, self.reg_implicit, self.device, self.dtype = dim, reg, reg_implicit, device, dtype
        self.items = torch.zeros((n_item_rows, dim + 1), device=device, dtype=dtype)
        self.z = torch.zeros((n_user_rows, dim), device=device, dtype=dtype)
        self.z_next = torch.zeros_like(self.z)
        self.n = np.bincount(user_rows, minlength=n_user_rows).astype(np.float64)
        self.groups: dict[Hashable, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = {}

    def d_terms(self, user_rows: np.ndarray) -> np.ndarray:
        """Each rating's term of its movie's D_j: reg n_u + reg_implicit."""
        return self.reg * self.n[user_rows] + self.reg_implicit

    def set_inverse_d(self, rows: np.ndarray, d_sums: np.ndarray) -> None:
        """1 / D_j into movie rows ``rows`` (0 for a movie without training ratings: its y never moves)."""
        inv = np.where(d_sums > 0, 1.0 / np.maximum(d_sums, 1e-300), 0.0)
        self.items[torch.from_numpy(rows).to(self.device), self.dim] = torch.from_numpy(inv).to(self.device, self.dtype)

    def add_group(self, key: Hashable, user_rows: np.ndarray, item_rows: np.ndarray, lo: int, n_rows: int) -> None:
        """The ratings a phase visits: local user rows and movie table rows in [lo, lo + n_rows)."""
        n_users = len(self.n)
        item = item_rows.astype(np.int64) - lo
        user = user_rows.astype(np.int64)
        pull = _csr(item, user, (self.reg * np.sqrt(self.n[user])).astype(np.float32), (n_rows, n_users),
                    self.device).to(self.dtype)
        spread = _csr(user, item, (1.0 / np.sqrt(np.maximum(self.n[user], 1))).astype(np.float32),
                      (n_users, n_rows), self.device).to(self.dtype)
        count = torch.from_numpy(np.bincount(item, minlength=n_rows).astype(np.float64)).to(self.device, self.dtype)
        self.groups[key] = (pull, spread, count, lo)

    @torch.no_grad()
    def visit(self, key: Hashable, users: torch.Tensor) -> None:
        """Steps 1 and 2 of the module docstring for group ``key``, ``users`` the user table (factors first)."""
        if key not in self.groups:
            return
        pull, spread, count, lo = self.groups[key]
        n = count.shape[0]
        y = self.items[lo:lo + n, :self.dim]
        residual = users[:, :self.dim] - self.z
        grad = self.reg_implicit * count[:, None] * y - pull @ residual
        y -= grad * self.items[lo:lo + n, self.dim:]
        self.z_next += spread @ y

    def end_epoch(self) -> None:
        self.z.copy_(self.z_next)
        self.z_next.zero_()

    # -- checkpoints -------------------------------------------------------------------------------
    def to_rows(self, user_ids: np.ndarray, item_ids: np.ndarray, users: torch.Tensor, items: torch.Tensor
                ) -> dict[str, TableRows]:
        """A checkpoint part's implicit rows: ``users`` = [z, z'] and ``items`` = [y, 1 / D] of the held rows."""
        return {"users": TableRows(torch.from_numpy(user_ids), users.cpu()),
                "items": TableRows(torch.from_numpy(item_ids), items.cpu())}

    def held(self, user_idx: torch.Tensor | None, n_users: int, item_idx: torch.Tensor | None, n_items: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The held rows' values (``_take``'s convention: None = rows 0..n-1)."""
        both = torch.cat([self.z, self.z_next], dim=1)
        users = both[:n_users] if user_idx is None else both[user_idx]
        items = self.items[:n_items] if item_idx is None else self.items[item_idx]
        return users, items

    def check_part(self, rows: dict[str, Any] | None, ids: dict[str, np.ndarray], where: object) -> None:
        if rows is None:
            raise DataError(f"checkpoint {where} holds no implicit rows (trained without --model.implicit)")
        for name, width in (("users", 2 * self.dim), ("items", self.dim + 1)):
            t = rows[name]
            if not np.array_equal(t.ids.numpy(), ids[name]) or t.weight.shape[1] != width:
                raise DataError(f"checkpoint {where}: its implicit {name} rows do not match its table rows")

    def load_rows(self, name: str, rows: TableRows, src: torch.Tensor, local: torch.Tensor) -> None:
        """Rows ``src`` of a part's implicit table ``name`` into local rows ``local``."""
        values = rows.weight[src].to(self.device, self.dtype)
        local = local.to(self.device)
        if name == "items":
            self.items[local] = values
        else:
            self.z[local] = values[:, :self.dim]
            self.z_next[local] = values[:, self.dim:]

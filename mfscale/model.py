"""Biased matrix factorization: ``rating ~ mean + b_user + b_item + <p_user, q_item>``, or plain MF without biases.

Each side is one sparse ``nn.Embedding`` of width ``dim + 1``: the factors and, in the last column, the
bias. A user's factors and bias are always touched together, so one table per side halves the sparse
gradients to synchronize and the optimizer's per-table work. Only the global bias is a dense parameter
(it goes through DDP). Biases start at zero and factors near zero, so a user or movie never seen in
training predicts the global mean plus whatever bias is known.

Two options for what notebooks do (issue 24): ``biases=False`` is plain MF, ``<p_u, q_i>`` alone. The tables keep
their shape (checkpoints, layouts and the C++ op see one shape) but the bias columns and the global bias are held
at exactly 0: every step gives them a zero gradient, and Adam leaves a zero with zero moments at zero.
``max_norm`` is ``nn.Embedding(max_norm=X)``'s bound on the factor vectors (the bias column is not part of the
vector): :func:`renorm_rows_` before a step, :func:`capped` where predictions read rows.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

SPARSE_TABLES = ("users.weight", "items.weight")


class TableGrad(NamedTuple):
    """One table's gradient over the rows a batch touches: sorted unique row ids, how many of the batch's
    ratings touch each row, and the summed gradient rows (without the L2 term, which the optimizer adds).

    Dense form (``ids`` None): ``counts`` and ``rows`` cover every row of the table, zero where untouched.
    """

    ids: torch.Tensor | None
    counts: torch.Tensor
    rows: torch.Tensor


_HUGEPAGE_MIN_BYTES = 4 << 20  # below this a table spans too few 2 MiB pages to matter


def _advise_hugepages(t: torch.Tensor) -> None:
    """Ask Linux to back the whole pages inside ``t``'s memory with transparent huge pages (madvise)."""
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end > start:  # best effort: a kernel without THP returns an error, and 4 KiB pages still work
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                                                  mmap.MADV_HUGEPAGE)


def table_empty(shape: tuple[int, ...], dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialized table; on a Linux CPU, large ones are backed by transparent huge pages.

    Rows of the embedding tables and their Adam moments are read and written at random, and with 4 KiB
    pages nearly every row costs a TLB miss: on the 2-core CPU a training step took 10.9 ms with 4 KiB pages
    and 9.4 ms with huge pages (ml-10m, batch 41,984; benchmarks/RESULTS.md). Most distributions only give huge pages
    on request (THP "madvise" mode), so the memory is advised before anything touches it. ``dtype`` None:
    torch's default dtype.
    """
    t = torch.empty(shape, dtype=dtype, device=device)
    if (t.device.type == "cpu" and sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")
            and t.numel() * t.element_size() >= _HUGEPAGE_MIN_BYTES):
        _advise_hugepages(t)
    return t


def table_like(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in ``table_empty`` memory (huge pages for large CPU tables)."""
    return table_empty(tuple(t.shape), t.dtype, t.device).copy_(t)


RENORM_EPS = 1e-7  # nn.Embedding's: scale = max_norm / (norm + 1e-7) (ATen's embedding_renorm_)


def capped(rows: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``rows`` ``[factors, bias]`` with each factor vector renormalized as ``nn.Embedding(max_norm=...)`` would
    before using it (a copy where any row is over; ``rows`` itself otherwise, or when ``max_norm`` is 0)."""
    if not max_norm:
        return rows
    d = rows.shape[1] - 1
    norm = torch.linalg.vector_norm(rows[:, :d], dim=1)
    over = norm > max_norm
    if not bool(over.any()):
        return rows
    scale = torch.where(over, max_norm / (norm + RENORM_EPS), torch.ones_like(norm))
    out = rows.clone()
    out[:, :d] *= scale[:, None]
    return out


@torch.no_grad()
def renorm_rows_(table: torch.Tensor, ids: torch.Tensor, max_norm: float) -> None:
    """``nn.Embedding(max_norm=...)``'s in-place renormalization of the rows ``ids`` touch (duplicates once):
    factor vectors with norm > max_norm are scaled by max_norm / (norm + 1e-7); the bias column is left alone."""
    if not max_norm or ids.numel() == 0:
        return
    rows = torch.unique(ids.long())
    d = table.shape[1] - 1
    f = table[rows, :d]
    norm = torch.linalg.vector_norm(f, dim=1)
    # Every touched row written back, scaled by 1 where under the bound (exact): no data-dependent selection, so
    # no host sync on a GPU besides unique's.
    scale = torch.where(norm > max_norm, max_norm / (norm + RENORM_EPS), torch.ones_like(norm))
    table[rows, :d] = f * scale[:, None]


def predict_rows(users: torch.Tensor, items: torch.Tensor, global_bias: torch.Tensor, user: torch.Tensor,
                 item: torch.Tensor, max_norm: float = 0.0) -> torch.Tensor:
    """mean + b_u + b_i + <p_u, q_i> from table rows ``[factors, bias]`` (no (batch, dim+1) product kept).

    Without biases the bias columns and the global bias are 0, so this is <p_u, q_i> exactly. ``max_norm``:
    the gathered factor vectors capped as ``nn.Embedding(max_norm=...)``'s lookup caps them (evaluation; the
    training steps renormalize the tables in place instead).
    """
    d = users.shape[1] - 1
    u = capped(users[user], max_norm)
    v = capped(items[item], max_norm)
    return global_bias + (u[:, :d] * v[:, :d]).sum(1) + u[:, d] + v[:, d]


def batch_errors(users: torch.Tensor, items: torch.Tensor, global_bias: torch.Tensor, user: torch.Tensor,
                 item: torch.Tensor, rating: torch.Tensor) -> torch.Tensor:
    """prediction - rating for each rating of the batch (one fused kernel under torch.compile)."""
    return predict_rows(users, items, global_bias, user, item) - rating


_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def compiled_batch_errors() -> Callable[..., torch.Tensor]:
    """``batch_errors`` under torch.compile: gathers, dot products and biases in one kernel, no (batch, dim)
    temporaries. Compiled once per process; the batch size is a dynamic shape."""
    if "errors" not in _COMPILED:
        kernel = torch.compile(batch_errors, dynamic=True)

        def errors(users: torch.Tensor, items: torch.Tensor, global_bias: torch.Tensor, user: torch.Tensor,
                   item: torch.Tensor, rating: torch.Tensor) -> torch.Tensor:
            # Plain tensors (detach) and a rating buffer of its own (clone): torch.compile specializes on a
            # Parameter's sizes and on a view's storage offset, which would recompile per table and per batch
            # position instead of reusing the kernel compiled at warm-up.
            return kernel(users.detach(), items.detach(), global_bias.detach(), user, item, rating.clone())

        _COMPILED["errors"] = errors
    return _COMPILED["errors"]


def _side_grad(ids: torch.Tensor, other_ids: torch.Tensor, other: torch.Tensor, coef: torch.Tensor,
               n_rows: int, dense_min: int, scratch: torch.Tensor | None = None, biases: bool = True) -> TableGrad:
    """sum over the batch's ratings of coef * [other factors, 1], grouped by this side's row.

    A stable sort groups the ratings by row (keeping batch order inside a row), and the grouped sums are one
    CSR x dense product with the other side's whole table: no (batch, dim+1) gradient is materialized and
    the rows come out unique, so no scatter-add or coalesce() is needed afterwards. Where the batch touches
    at least ``dense_min`` of the table's ``n_rows`` rows, the CSR matrix gets one (possibly empty) row per
    table row, giving the dense form of ``TableGrad``. ``scratch``, (n_rows, dim+1): memory for the rows.
    Without ``biases`` the bias column's gradient is left as the product gives it: ``other``'s bias column is 0
    (plain MF holds it there), so it is 0 too.
    """
    d = other.shape[1] - 1
    sorted_ids, perm = torch.sort(ids, stable=True)
    uniq = counts = None
    if dense_min > 0:
        uniq, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    if counts is None or uniq.numel() >= dense_min:
        uniq, counts = None, torch.bincount(ids, minlength=n_rows)
    coef_batch_order, coef = coef, coef[perm]
    crow = counts.new_zeros(counts.numel() + 1)
    torch.cumsum(counts, 0, out=crow[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        a = torch.sparse_csr_tensor(crow, other_ids[perm], coef, (counts.numel(), other.shape[0]),
                                    check_invariants=False)
    # The bias column's gradient is the grouped sum of coef.
    if other.device.type == "cpu":
        # beta=0 with out=: MKL writes the product straight into the result (the plain product fills a
        # zeroed buffer and copies it: 2.4 vs 0.65 ms for the 70k-row dense form at batch 42k).
        rows = other.new_empty(counts.numel(), other.shape[1]) if scratch is None else scratch[:counts.numel()]
        torch.addmm(rows, a, other, beta=0, out=rows)
        if biases:
            # bincount adds in batch order, which is the stable sort's order within a row: the same sums as
            # segment_reduce's, ~10x faster.
            bias = torch.bincount(ids, weights=coef_batch_order, minlength=n_rows)
            rows[:, d] = bias if uniq is None else bias[uniq]
    else:
        # cuSPARSE, with a fresh result (cheap with the caching allocator); segment_reduce, since CUDA
        # bincount's atomic adds would make the order (and the rounding) vary from run to run.
        rows = a @ other
        if biases:
            rows[:, d] = torch.segment_reduce(coef, "sum", lengths=counts)
    return TableGrad(uniq, counts, rows)


class BiasedMF(nn.Module):
    """Both tables ``[factors, bias]`` and the global bias; ``biases=False``: plain MF (module docstring)."""

    def __init__(self, n_users: int, n_items: int, dim: int, *, mean: float = 3.5, init_std: float = 0.01,
                 biases: bool = True):
        super().__init__()
        self.dim = dim
        self.biases = biases
        mean = float(mean) if biases else 0.0  # plain MF: ratings are not centred
        self.users = nn.Embedding(n_users, dim + 1, sparse=True, _weight=table_empty((n_users, dim + 1)))
        self.items = nn.Embedding(n_items, dim + 1, sparse=True, _weight=table_empty((n_items, dim + 1)))
        self.global_bias = nn.Parameter(torch.tensor(float(mean)))
        # Column selectors: matmuls with these replace slicing the rows into factors and bias. A slice's
        # backward allocates and zero-fills a full (batch, dim+1) gradient per slice, which profiling
        # showed was the largest single cost of a CPU step; a matmul's backward is one small outer product.
        select = torch.zeros(dim + 1)
        select[dim] = 1.0
        self.register_buffer("bias_col", select, persistent=False)
        self.register_buffer("factor_cols", 1.0 - select, persistent=False)
        with torch.no_grad():
            for table in (self.users, self.items):
                table.weight.normal_(0.0, init_std)
                table.weight[:, dim] = 0.0

    @property
    def shape(self) -> dict[str, int]:
        return {"n_users": self.users.num_embeddings, "n_items": self.items.num_embeddings, "dim": self.dim}

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.users.weight, self.items.weight]

    def dense_parameters(self) -> list[nn.Parameter]:
        return [self.global_bias]

    def forward(self, user: torch.Tensor, item: torch.Tensor, dropout_mask: torch.Tensor | None = None):
        """Predictions and the gathered rows ``(u, v)`` = ([p_u, b_u], [q_i, b_i]) for the regularizers."""
        u = self.users(user)
        v = self.items(item)
        uv = u * v
        if dropout_mask is not None:  # dropout on the factor interactions, scaled by 1/(1-p) in the mask
            uv = uv * dropout_mask
        if not self.biases:
            # The global bias stays in the graph (DDP needs a parameter with a gradient) with a zero gradient, and
            # the bias columns get none: [p, 0] . [q, 0] has a zero derivative in the bias column.
            return self.global_bias * 0.0 + uv @ self.factor_cols, (u, v)
        pred = self.global_bias + uv @ self.factor_cols + (u + v) @ self.bias_col
        return pred, (u, v)

    @torch.no_grad()
    def closed_form_grads(self, user: torch.Tensor, item: torch.Tensor, rating: torch.Tensor, global_rows: int,
                          errors: Callable[..., torch.Tensor] = batch_errors, dense_min: tuple[int, int] | None = None,
                          scratch: dict[str, torch.Tensor] | None = None, return_errors: bool = False,
                          ) -> tuple:
        """Gradients of ``sum of squared errors / global_rows`` without autograd.

        Returns the user and item table gradients (``TableGrad``), the global bias's gradient and the batch's
        summed squared error. With e = prediction - rating, d/dp_u = 2 e q_i / G, d/db_u = 2 e / G, and
        symmetrically for the item; d/dmean = sum 2 e / G (both 0 without biases). ``errors`` computes e
        (``batch_errors``, possibly compiled). The per-rating L2 term is left to the optimizer (``LazyAdam``
        or ``RowRMSprop`` with ``l2``): its gradient is count * 2 * reg * row / G, so only the counts are
        needed. ``dense_min``: per table, from how many touched rows on the gradient comes in dense form
        (worth it when a batch touches a large share of the rows: the optimizer then sweeps the table
        contiguously); 0 = always, None = never.

        ``scratch``: a dict the caller keeps between calls; on CPU the gradient rows are then written into
        table-sized buffers kept there, so the returned rows are only valid until the next call. Allocating
        them afresh each step costs page faults (glibc maps blocks over 32 MiB anew: ML-32M's user table is
        52 MB). ``return_errors``: each rating's e is returned as a fifth value (the user-day biases' gradient).
        """
        users, items = self.users.weight, self.items.weight
        user, item = user.long(), item.long()
        never = (users.shape[0] + 1, items.shape[0] + 1)
        dense_min = never if dense_min is None else dense_min
        if user.numel() == 0 and min(dense_min) > 0:
            empty = TableGrad(user, user.clone(), users.new_zeros((0, users.shape[1])))
            zero = users.new_zeros(())
            out = (empty, TableGrad(item, item.clone(), items.new_zeros((0, items.shape[1]))), zero, zero)
            return out + (users.new_zeros(0),) if return_errors else out
        e = errors(users, items, self.global_bias, user, item, rating.to(users.dtype))
        coef = e * (2.0 / global_rows)
        bufs: list[torch.Tensor | None] = [None, None]
        if scratch is not None and users.device.type == "cpu":
            for k, (name, table) in enumerate((("users", users), ("items", items))):
                buf = scratch.get(name)
                if buf is None or buf.shape != table.shape or buf.dtype != table.dtype or buf.device != table.device:
                    buf = scratch[name] = torch.empty_like(table)
                bufs[k] = buf
        b = self.biases
        out = (_side_grad(user, item, items, coef, users.shape[0], dense_min[0], bufs[0], b),
               _side_grad(item, user, users, coef, items.shape[0], dense_min[1], bufs[1], b),
               coef.sum() if b else coef.new_zeros(()), e.square().sum())
        return out + (e,) if return_errors else out

    @torch.no_grad()
    def predict(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return self.forward(user, item)[0]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """User factors, user biases, item factors, item biases (views of the tables)."""
        d = self.dim
        return self.users.weight[:, :d], self.users.weight[:, d], self.items.weight[:, :d], self.items.weight[:, d]

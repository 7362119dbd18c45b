"""LazyAdam: torch.optim.SparseAdam's update for row-sparse gradients, without its coalesce().

SparseAdam coalesces every sparse gradient (a sort, and on CUDA a device-to-host sync) and then runs about a
dozen sparse kernels (design notes, "Performance facts"). LazyAdam computes the same numbers: one dedupe of the
batch's row ids per table (``sum_rows``: an unsorted unique plus index_add_; skipped when the gradient is
already unique), a gather of the touched rows of the moments, the elementwise update on those rows in the same
operation order as ``torch.optim._functional.sparse_adam``, and a scatter back. Rows absent from a step are
untouched; the step count (bias corrections) is per parameter, as in SparseAdam. The state layout
(``step``, ``exp_avg``, ``exp_avg_sq``) is SparseAdam's, so checkpoints of either load into the other.

Differences from SparseAdam: duplicate rows are summed in another order (index_add_ in batch order instead
of coalesce's), so with duplicates the results agree to rounding, not bit for bit; no ``maximize``.

**One update, four implementations.** For speed the same update exists four times: ``_adam_rows`` (eager torch
ops), ``_adam_rows_fusable`` and ``_adam_dense_fusable`` (written for torch.compile: touched rows, or a masked
sweep of the whole table) and ``csrc/fused_step.cpp`` (the C++ step). They share one contract, SparseAdam's:
for each touched row, with g its summed gradient plus ``row_scale * col_weights * row`` (the per-rating L2),
``m += (g - m)(1 - beta1)``, ``v += (g^2 - v)(1 - beta2)``, ``row -= step_size * m / (sqrt(v) + eps)``, where
``step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t)`` and t counts the table's steps
(``LazyAdam._begin_step``, the only place it is computed). Untouched rows and their moments are left alone.
tests/test_optim.py checks each implementation against ``torch.optim.SparseAdam``.

**RowRMSprop** (``--optim.optimizer row_rmsprop``, the default since issue 22): the same lazy update with two floats
of state per row instead of two moments per element. Adam with beta1 = 0 (no first moment) and its second moment
shared by a row's factor columns (the mean of their squared gradients; FBGEMM's row-wise optimizers keep one such
value per row) and kept apart for the bias column, whose gradients have another scale. For each touched row, with g
as above: ``s_f += (mean(g[:d]^2) - s_f)(1 - beta2)``, ``s_b += (g[d]^2 - s_b)(1 - beta2)``, ``row[:d] -= step_size
* g[:d] / (sqrt(s_f) + eps)``, ``row[d] -= step_size * g[d] / (sqrt(s_b) + eps)``, where ``step_size = lr * sqrt(1 -
beta2^t)``. A row is then 67 floats instead of 195, so the rows a CPU step reads at random stay in cache far more
often (benchmarks/RESULTS.md, session 10). Three implementations: ``_row_rmsprop_rows`` (touched rows, torch ops,
compiled or not), ``_row_rmsprop_dense_fusable`` (a masked sweep, compiled) and the C++ step; tests check each
against a NumPy reference of the definition (tests/test_row_rmsprop.py, test_layout.py).

This module also owns the job's optimizers as a whole (:class:`Optimizers`): the tables' optimizer
(:func:`build_tables`, called by the layout that holds the tables), the global bias's Adam, their learning-rate
schedule and their checkpoint state; :func:`row_state` is the one way to reach a table's per-row optimizer state
and :func:`state_keys` names its tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import OptimConfig
from .model import table_empty, table_like


def sum_rows(idx: Tensor, vals: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """Unique row ids and the summed rows for each: the optimizer's input form of a row gradient."""
    if vals.is_cuda:
        # index_add_ on CUDA adds with atomics in no fixed order; coalesce sums in a fixed order, so
        # every rank computes bit-identical rows and the replicas never drift apart.
        g = torch.sparse_coo_tensor(idx.unsqueeze(0), vals, (n_rows, vals.shape[1])).coalesce()
        return g._indices()[0], g._values()
    # sorted=False is ~100x faster than a sorted unique on CPU (design notes); CPU index_add_ is sequential.
    uniq, inv = torch.unique(idx, sorted=False, return_inverse=True)
    summed = torch.zeros((uniq.numel(), vals.shape[1]), dtype=vals.dtype, device=vals.device)
    summed.index_add_(0, inv, vals)
    return uniq, summed


def _adam_rows(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, rows: Tensor, grad: Tensor,
               l2: tuple[Tensor, Tensor] | None, *, step_size: float, beta1: float, beta2: float, eps: float
               ) -> None:
    """SparseAdam's update of the unique ``rows`` (values ``grad``), in its operation order; ``step_size`` is
    the learning rate with Adam's bias corrections (LazyAdam._begin_step)."""
    if l2 is not None:
        grad = grad + (l2[0][:, None] * l2[1]) * param.index_select(0, rows)
    m = exp_avg.index_select(0, rows)  # old moments of the touched rows
    v = exp_avg_sq.index_select(0, rows)
    # old + (1 - b) * (new - old), added as SparseAdam's dense += sparse does (old + update)
    m.add_(grad.sub(m).mul_(1 - beta1))
    v.add_(grad.pow(2).sub_(v).mul_(1 - beta2))
    exp_avg.index_copy_(0, rows, m)
    exp_avg_sq.index_copy_(0, rows, v)
    upd = v.sqrt_().add_(eps)  # v is no longer needed: reuse its buffer for the denominator, then the update
    torch.div(m, upd, out=upd)
    upd.mul_(-step_size)
    param.index_add_(0, rows, upd)  # rows are unique: exactly param[row] + update, as SparseAdam adds


def _adam_rows_fusable(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, rows: Tensor, grad: Tensor,
                       row_scale: Tensor, col_weights: Tensor, step_size: Tensor, beta1: float, beta2: float,
                       eps: float) -> None:
    """The same update written for torch.compile: one gather and one scatter per table, no temporaries.

    The step size is a tensor so that a new learning rate or step count does not trigger a recompile.
    """
    p = param[rows]
    g = grad + (row_scale[:, None] * col_weights) * p
    m = exp_avg[rows]
    v = exp_avg_sq[rows]
    m = m + (g - m) * (1 - beta1)
    v = v + (g * g - v) * (1 - beta2)
    exp_avg[rows] = m
    exp_avg_sq[rows] = v
    param[rows] = p + (m / (v.sqrt() + eps)) * -step_size


def _adam_dense_fusable(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, row_scale: Tensor,
                        col_weights: Tensor, step_size: Tensor, beta1: float, beta2: float, eps: float) -> None:
    """The same update as a masked sweep over whole tables (rows with row_scale 0 keep their values).

    When a batch touches most rows, one contiguous pass beats gathering and scattering nearly all of them.
    """
    touched = (row_scale > 0)[:, None]
    g = grad + (row_scale[:, None] * col_weights) * param
    m = exp_avg + (g - exp_avg) * (1 - beta1)
    v = exp_avg_sq + (g * g - exp_avg_sq) * (1 - beta2)
    new_p = param + (m / (v.sqrt() + eps)) * -step_size
    exp_avg.copy_(torch.where(touched, m, exp_avg))
    exp_avg_sq.copy_(torch.where(touched, v, exp_avg_sq))
    param.copy_(torch.where(touched, new_p, param))


def _row_rmsprop_math(p: Tensor, s: Tensor, grad: Tensor, row_scale: Tensor, col_weights: Tensor,
                      step_size: Tensor | float, beta2: float, eps: float) -> tuple[Tensor, Tensor]:
    """RowRMSprop's arithmetic on rows ``p`` with their state ``s`` (rows, 2: the second moments of the factor
    columns' mean square and of the bias column): the new rows and state. The one definition the touched-rows and
    whole-table forms below share."""
    g = grad + (row_scale[:, None] * col_weights) * p
    d = g.shape[1] - 1
    ms = torch.stack([(g[:, :d] * g[:, :d]).mean(1), g[:, d] * g[:, d]], 1)
    s = s + (ms - s) * (1 - beta2)
    k = -step_size / (s.sqrt() + eps)  # per row: the factor columns' multiplier, then the bias column's
    return p + g * torch.cat([k[:, :1].expand(-1, d), k[:, 1:]], 1), s


def _row_rmsprop_rows(param: Tensor, row_sq: Tensor, rows: Tensor, grad: Tensor, row_scale: Tensor,
                      col_weights: Tensor, step_size: Tensor | float, beta2: float, eps: float) -> None:
    """RowRMSprop's update of the unique ``rows`` (values ``grad``); ``row_sq``: (table rows, 2). Written to run
    eagerly or under torch.compile (one gather and one scatter per tensor)."""
    new_p, new_s = _row_rmsprop_math(param[rows], row_sq[rows], grad, row_scale, col_weights, step_size, beta2, eps)
    row_sq[rows] = new_s
    param[rows] = new_p


def _row_rmsprop_dense_fusable(param: Tensor, row_sq: Tensor, grad: Tensor, row_scale: Tensor, col_weights: Tensor,
                               step_size: Tensor, beta2: float, eps: float) -> None:
    """The same update as a masked sweep over whole tables (rows with row_scale 0 keep their values and state),
    for torch.compile: no gather of the touched rows, so no device-to-host sync for their count on a GPU."""
    touched = (row_scale > 0)[:, None]
    new_p, new_s = _row_rmsprop_math(param, row_sq, grad, row_scale, col_weights, step_size, beta2, eps)
    row_sq.copy_(torch.where(touched, new_s, row_sq))
    param.copy_(torch.where(touched, new_p, param))


def _device_scalar(value: float, p: Tensor) -> Tensor:
    """A step size as a 0-d tensor on ``p``'s device (a compiled kernel's input, so a new value does not recompile).
    ``torch.full`` fills on the device; ``torch.tensor(value, device=cuda)`` would copy from the host and block."""
    return torch.full((), value, dtype=p.dtype, device=p.device)


_COMPILED: dict[str, object] = {}


def compiled_adam_rows():
    """``_adam_rows_fusable`` under torch.compile (compiled once per process, shapes dynamic)."""
    if "adam" not in _COMPILED:
        _COMPILED["adam"] = torch.compile(_adam_rows_fusable, dynamic=True)
    return _COMPILED["adam"]


def compiled_row_rmsprop():
    """``_row_rmsprop_rows`` under torch.compile (compiled once per process, shapes dynamic)."""
    if "row" not in _COMPILED:
        _COMPILED["row"] = torch.compile(_row_rmsprop_rows, dynamic=True)
    return _COMPILED["row"]


def compiled_row_rmsprop_dense():
    """``_row_rmsprop_dense_fusable`` under torch.compile (compiled once per process, shapes dynamic)."""
    if "row_dense" not in _COMPILED:
        _COMPILED["row_dense"] = torch.compile(_row_rmsprop_dense_fusable, dynamic=True)
    return _COMPILED["row_dense"]


def compiled_adam_dense():
    """``_adam_dense_fusable`` under torch.compile (compiled once per process, shapes dynamic)."""
    if "dense" not in _COMPILED:
        _COMPILED["dense"] = torch.compile(_adam_dense_fusable, dynamic=True)
    return _COMPILED["dense"]


class RowOptimizer(torch.optim.Optimizer):
    """A lazy optimizer of row tables: each step updates only the rows a batch touches, from their summed
    gradients, and keeps per-row state (``state_keys``, tensors with one row per table row) and a step count per
    table. The step's forms (``.grad``, ``rows=``, ``update=``) are shared; a subclass gives the update."""

    state_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], defaults: dict, *, compile: bool = False):
        if not defaults["lr"] > 0.0:
            raise ValueError(f"Invalid learning rate: {defaults['lr']}")
        if not defaults["eps"] > 0.0:
            raise ValueError(f"Invalid epsilon value: {defaults['eps']}")
        super().__init__(params, defaults)
        self.compile = compile
        for group in self.param_groups:
            for p in group["params"]:
                if p.is_sparse or p.is_complex() or p.dim() != 2:
                    raise ValueError(f"{type(self).__name__} needs dense, real, 2-D (row table) parameters")

    @classmethod
    def state_width(cls, key: str, table_width: int) -> int:
        """Columns of state tensor ``key`` of a table ``table_width`` wide."""
        return table_width

    def _state(self, p: Tensor) -> dict:
        return row_state(self, p)

    def load_state_dict(self, state_dict: dict) -> None:
        """As Optimizer.load_state_dict; the loaded state is then moved to table memory (huge pages)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in self.state_keys:
                if key in state:
                    state[key] = table_like(state[key])

    def _begin_step(self, p: Tensor, group: dict) -> tuple[dict, float]:
        """Count one step of ``p`` (of ``group``); (its state, the step's step size)."""
        raise NotImplementedError

    def _apply(self, group: dict, p: Tensor, rows: Tensor | None, values: Tensor,
               l2: tuple[Tensor, Tensor] | None = None) -> None:
        """The update of ``p``'s rows ``rows`` (None: dense form) from their summed gradients ``values``."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None, *, rows: list[tuple[Tensor, ...] | None] | None = None,
             update: Callable[[list[tuple[dict, float]]], None] | None = None):
        """One step of every parameter with a gradient.

        ``rows``, optional: per parameter (in param_groups order) ``(ids, values)``: unique row ids and summed
        gradient rows, used instead of ``.grad`` (None for a parameter reads its ``.grad``), as
        sync.sync_sparse_rows gives; or ``(ids, values, row_scale, col_weights)``, which adds the gradient of an
        L2 penalty, ``row_scale[:, None] * col_weights * param[ids]`` (per-row counts times per-column
        weights), to the values before the update, reading the rows once. ``ids`` None: dense form, values
        for every row of the table and row_scale the touch counts (rows with count 0 are left alone).

        ``update``, optional: the update is done elsewhere with this optimizer's state (``mfscale.cpu_step``):
        every parameter counts one step and ``update`` gets, per parameter, (its state, the step's step size),
        and applies this optimizer's update to the touched rows of the parameter and of its state.
        (Through ``step``, so hooks and LR schedulers see a step.)
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if update is not None:
            update([self._begin_step(p, group) for group in self.param_groups for p in group["params"]])
            return loss
        k = -1
        for group in self.param_groups:
            for p in group["params"]:
                k += 1
                if rows is not None and rows[k] is not None:
                    ids, values, *l2 = rows[k]
                    self._apply(group, p, ids, values, (l2[0], l2[1]) if l2 else None)
                    continue
                g = p.grad
                if g is None:
                    continue
                if not g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support dense gradients")
                if g.is_coalesced():
                    ids, values = g._indices()[0], g._values()
                else:
                    ids, values = sum_rows(g._indices()[0], g._values(), g.shape[0])
                self._apply(group, p, ids, values)
        return loss


class LazyAdam(RowOptimizer):
    """Exact equivalent of torch.optim.SparseAdam's lazy update for row-sparse gradients, without coalesce().

    ``step()`` reads each parameter's ``.grad``: a sparse COO row gradient, duplicate rows allowed (summed
    here), or already coalesced (used as is); ``step(rows=...)`` takes unique rows instead (see there).
    ``compile``: run the update as the torch.compile'd kernels (set by ``mfscale.step`` where the step is
    compiled; the math is the same).
    """

    state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, *, compile: bool = False):
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid beta parameters: {betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps}, compile=compile)

    def _begin_step(self, p: Tensor, group: dict) -> tuple[dict, float]:
        state = self._state(p)
        state["step"] += 1  # SparseAdam counts a step for every gradient, an empty one too
        beta1, beta2 = group["betas"]
        step = state["step"]
        return state, float(group["lr"]) * math.sqrt(1 - beta2**step) / (1 - beta1**step)

    def _apply(self, group: dict, p: Tensor, rows: Tensor | None, values: Tensor,
               l2: tuple[Tensor, Tensor] | None = None) -> None:
        state, size = self._begin_step(p, group)
        beta1, beta2 = group["betas"]
        if rows is None:  # dense form: every row of the table, touched where l2's row_scale (a count) > 0
            if l2 is None:
                raise ValueError("LazyAdam: dense rows need l2 row_scale (touch counts) to know the touched rows")
            if not self.compile:  # eagerly, gathering the touched rows is cheaper than masked whole-table passes
                rows = torch.nonzero(l2[0]).squeeze(1)
                values, l2 = values.index_select(0, rows), (l2[0].index_select(0, rows), l2[1])
            else:
                step_size = _device_scalar(size, p)
                # detach: compiled for symbolic sizes (a Parameter's sizes would be specialized on)
                compiled_adam_dense()(p.detach(), state["exp_avg"], state["exp_avg_sq"], values, l2[0], l2[1],
                                      step_size, beta1, beta2, group["eps"])
                return
        if values.numel() == 0:
            return
        if self.compile:
            if l2 is None:
                l2 = (values.new_zeros(values.shape[0]), values.new_zeros(values.shape[1]))
            step_size = _device_scalar(size, p)
            compiled_adam_rows()(p.detach(), state["exp_avg"], state["exp_avg_sq"], rows, values, l2[0], l2[1],
                                 step_size, beta1, beta2, group["eps"])
            return
        _adam_rows(p, state["exp_avg"], state["exp_avg_sq"], rows, values, l2, step_size=size, beta1=beta1,
                   beta2=beta2, eps=group["eps"])


class RowRMSprop(RowOptimizer):
    """Adam without a first moment and with one second moment per row's factor columns and one for its bias
    column (module docstring): two floats of state per row. ``betas`` as Adam's, for one config and checkpoint
    format; only beta2 is used. Same step forms and dense form as LazyAdam (touched rows only)."""

    state_keys = ("row_sq",)

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.0, 0.98), eps: float = 1e-8, *, compile: bool = False):
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta2: {betas[1]}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps}, compile=compile)
        for group in self.param_groups:
            for p in group["params"]:
                if p.shape[1] < 2:
                    raise ValueError("RowRMSprop needs tables of factor columns and a bias column (width >= 2)")

    @classmethod
    def state_width(cls, key: str, table_width: int) -> int:
        return 2

    def _begin_step(self, p: Tensor, group: dict) -> tuple[dict, float]:
        state = self._state(p)
        state["step"] += 1
        return state, float(group["lr"]) * math.sqrt(1 - group["betas"][1] ** state["step"])

    def _apply(self, group: dict, p: Tensor, rows: Tensor | None, values: Tensor,
               l2: tuple[Tensor, Tensor] | None = None) -> None:
        state, size = self._begin_step(p, group)
        if rows is None:  # dense form: the touched rows are those with a count > 0
            if l2 is None:
                raise ValueError("RowRMSprop: dense rows need l2 row_scale (touch counts) to know the touched rows")
            if self.compile:  # one masked sweep (detach: compiled for symbolic sizes)
                step_size = _device_scalar(size, p)
                compiled_row_rmsprop_dense()(p.detach(), state["row_sq"], values, l2[0], l2[1], step_size,
                                             group["betas"][1], group["eps"])
                return
            rows = torch.nonzero(l2[0]).squeeze(1)
            values, l2 = values.index_select(0, rows), (l2[0].index_select(0, rows), l2[1])
        if values.numel() == 0:
            return
        if l2 is None:
            l2 = (values.new_zeros(values.shape[0]), values.new_zeros(values.shape[1]))
        fn = compiled_row_rmsprop() if self.compile else _row_rmsprop_rows
        step_size = _device_scalar(size, p) if self.compile else size
        # detach: compiled for symbolic sizes (a Parameter's sizes would be specialized on)
        fn(p.detach(), state["row_sq"], rows, values, l2[0], l2[1], step_size, group["betas"][1], group["eps"])


class RatingSGD(RowOptimizer):
    """``--optim.optimizer sgd``: plain SGD, one update per rating (Funk's and Koren's SGD), with no per-row state.

    Its update has no mini-batch form here: ``mfscale.cpu_step.sgd_step`` applies it rating by rating, through
    ``step(update=...)`` (which counts the step and hands over the scheduled learning rate), in ``step.SgdStep``.
    ``betas`` are kept only so that every tables' optimizer has one config and checkpoint format.
    """

    state_keys = ()

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 0.03,
                 betas: tuple[float, float] = (0.0, 0.0), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    def _begin_step(self, p: Tensor, group: dict) -> tuple[dict, float]:
        state = self._state(p)
        state["step"] += 1
        return state, float(group["lr"])

    def _apply(self, group: dict, p: Tensor, rows: Tensor | None, values: Tensor,
               l2: tuple[Tensor, Tensor] | None = None) -> None:
        raise RuntimeError("RatingSGD updates rating by rating (mfscale.cpu_step.sgd_step), not from summed row "
                           "gradients")


# Per ``--optim.optimizer``: the class whose per-row state it keeps. Optimizers with the same state (lazy_adam and
# sparse_adam: Adam's moments) can take over each other's checkpoints; others cannot.
STATE_OF: dict[str, type[RowOptimizer]] = {"lazy_adam": LazyAdam, "sparse_adam": LazyAdam, "row_rmsprop": RowRMSprop,
                                            "sgd": RatingSGD}


def row_floats(optimizer: str, dim: int) -> int:
    """Floats a table row of ``dim`` factors and a bias occupies with its optimizer's state."""
    cls = STATE_OF[optimizer]
    return (dim + 1) + sum(cls.state_width(k, dim + 1) for k in cls.state_keys)


def state_keys(opt: torch.optim.Optimizer) -> tuple[str, ...]:
    """The names of a tables' optimizer's per-row state tensors (SparseAdam: Adam's two moments)."""
    return opt.state_keys if isinstance(opt, RowOptimizer) else LazyAdam.state_keys


def row_state(opt: torch.optim.Optimizer, p: Tensor) -> dict:
    """Table ``p``'s state in ``opt`` (LazyAdam, SparseAdam or RowRMSprop), created as zeros (in table memory)
    when it has none yet: ``step`` and the tensors ``state_keys(opt)`` names, one row per table row."""
    state = opt.state[p]
    if len(state) == 0:
        state["step"] = 0
        for key in state_keys(opt):
            width = opt.state_width(key, p.shape[1]) if isinstance(opt, RowOptimizer) else p.shape[1]
            state[key] = table_empty((p.shape[0], width), p.dtype, p.device).zero_()
    return state


def batch_lr_scales(counts: Sequence[np.ndarray], batch: int, ref_batch: int) -> tuple[float, ...]:
    """Per table (``counts``: its rows' training ratings): the factor on the learning rate that keeps how far its
    rows move per epoch at ``batch`` (global, ratings per step) what it is at ``ref_batch``.

    A normalized optimizer (RowRMSprop, Adam) moves a row about lr per step that touches it, whatever number of its
    ratings the step sums, so an epoch moves a table's rows in proportion to its row visits: steps x rows touched per
    step, (n / B) sum_i (1 - (1 - B/n)^c_i) in a shuffled epoch. A larger batch visits a frequent row fewer times (a
    movie in every step either way) and a rare row as often (its ratings still fall in different steps).
    """
    return tuple(float(_row_visits(c, ref_batch) / v) if (v := _row_visits(c, batch)) else 1.0 for c in counts)


def _row_visits(counts: np.ndarray, batch: int) -> float:
    """Expected row visits of one table in an epoch of global batches of ``batch``: ceil(n / batch) steps (taken
    here as equal, of n / steps ratings each) draw the shuffled ratings without replacement, so a row of c ratings
    is in a step with probability about 1 - (1 - 1/steps)^c."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    steps = math.ceil(c.sum() / batch)
    if steps <= 1:
        return float(len(c))
    return steps * float(-np.expm1(c * math.log1p(-1.0 / steps)).sum())


def build_tables(cfg: OptimConfig, params: list[Tensor], lr_scales: Sequence[float] | None = None
                 ) -> torch.optim.Optimizer:
    """The embedding tables' optimizer from the config: LazyAdam, RowRMSprop, RatingSGD, or SparseAdam (the
    reference); ``lr_scales``: per table, a factor on ``cfg.lr`` (:func:`batch_lr_scales`)."""
    betas = (cfg.beta1, cfg.beta2)
    # one group per table, scaled or not, so that a checkpoint's groups fit a resumed job either way
    scales = [1.0] * len(params) if lr_scales is None else lr_scales
    params = [{"params": [p], "lr": cfg.lr * s} for p, s in zip(params, scales, strict=True)]
    if cfg.optimizer == "sgd":
        return RatingSGD(params, lr=cfg.lr, betas=betas)
    if cfg.optimizer == "lazy_adam":
        return LazyAdam(params, lr=cfg.lr, betas=betas)
    if cfg.optimizer == "row_rmsprop":
        return RowRMSprop(params, lr=cfg.lr, betas=betas)
    return torch.optim.SparseAdam(params, lr=cfg.lr, betas=betas)


def lr_lambda(schedule: str, total_steps: int, min_frac: float) -> Callable[[int], float]:
    """The learning-rate multiplier at a step: constant, or cosine/linear decay to ``min_frac``."""
    def f(step: int) -> float:
        t = min(step, total_steps) / max(total_steps, 1)
        if schedule == "cosine":
            return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * t))
        if schedule == "linear":
            return 1 - (1 - min_frac) * t
        return 1.0

    return f


class Optimizers:
    """The job's optimizers: ``tables`` (built by the layout with :func:`build_tables`), ``dense`` (Adam on the
    global bias) and one learning-rate schedule for both over ``total_steps``; with their checkpoint state."""

    def __init__(self, cfg: OptimConfig, tables: torch.optim.Optimizer, dense_params: list[Tensor],
                 total_steps: int):
        self.tables = tables
        self.dense = torch.optim.Adam(dense_params, lr=cfg.dense_lr)
        lam = lr_lambda(cfg.schedule, total_steps, cfg.min_lr_frac)
        self.schedules = [torch.optim.lr_scheduler.LambdaLR(opt, lam) for opt in (self.tables, self.dense)]

    def schedule_step(self) -> None:
        for s in self.schedules:
            s.step()

    @property
    def lrs(self) -> tuple[float, float, float]:
        """The current learning rates: (user rows, movie rows, dense)."""
        users, movies = (g["lr"] for g in self.tables.param_groups for _ in g["params"])
        return users, movies, self.dense.param_groups[0]["lr"]

    @property
    def betas(self) -> tuple[float, float]:
        """The tables' Adam betas (a resumed run keeps those it started with)."""
        return tuple(self.tables.param_groups[0]["betas"])

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint's metadata holds; the tables' moments travel in the layout's parts."""
        return {"opt_sparse_groups": self.tables.state_dict()["param_groups"], "opt_dense": self.dense.state_dict(),
                "scheds": [s.state_dict() for s in self.schedules]}

    def step_dense_cpu(self, grad: float) -> None:
        """torch.optim.Adam's step (as built here: no weight decay, no amsgrad) of the one dense parameter, the global
        bias, on a CPU, in Python floats (float64): the same state in the same tensors (checkpoints, reconcile), but
        a few microseconds where ``Adam.step`` took 0.2 ms of a 2 ms step on ml-10m, its hooks and tensor ops on one
        number (session 17's profile). On a GPU ``dense.step()`` stays: reading the value would wait for the device."""
        group = self.dense.param_groups[0]
        p = group["params"][0]
        state = self.dense.state[p]
        if not state:  # as Adam's first step creates it
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        (b1, b2), lr, eps = group["betas"], float(group["lr"]), float(group["eps"])
        t = float(state["step"]) + 1
        m = b1 * float(state["exp_avg"]) + (1 - b1) * grad
        v = b2 * float(state["exp_avg_sq"]) + (1 - b2) * grad * grad
        value = float(p.detach()) - lr / (1 - b1**t) * m / (math.sqrt(v) / math.sqrt(1 - b2**t) + eps)
        with torch.no_grad():
            state["step"].fill_(t)
            state["exp_avg"].fill_(m)
            state["exp_avg_sq"].fill_(v)
            p.fill_(value)
        self.dense._opt_called = True  # an optimizer step happened: what LambdaLR checks before its own

    def dense_rank_state(self) -> dict[str, Tensor]:
        """This rank's global bias and its Adam state (ranks keep their own copies between sync points)."""
        p = self.dense.param_groups[0]["params"][0]
        return {"value": p.detach().clone(), **{k: v.clone() for k, v in self.dense.state[p].items()}}

    def load_dense_rank_state(self, saved: dict[str, Tensor]) -> None:
        p = self.dense.param_groups[0]["params"][0]
        with torch.no_grad():
            p.copy_(saved["value"])
        self.dense.state[p].update({k: v.clone() for k, v in saved.items() if k != "value"})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The tables' hyperparameters (lr, initial_lr, betas, ...) only: their moments came with the parts.
        saved_groups = state["opt_sparse_groups"]
        if len(saved_groups) == 1:  # a checkpoint from before one group per table (session 17): theirs for both
            saved_groups = saved_groups * len(self.tables.param_groups)
        for group, saved in zip(self.tables.param_groups, saved_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.dense.load_state_dict(state["opt_dense"])
        for s, sd in zip(self.schedules, state["scheds"], strict=True):
            groups = len(s.optimizer.param_groups)
            if len(sd["base_lrs"]) == 1 < groups:  # the one-group checkpoint above: its schedule for both tables
                sd = {**sd, "base_lrs": sd["base_lrs"] * groups, "_last_lr": sd["_last_lr"] * groups}
            s.load_state_dict(sd)

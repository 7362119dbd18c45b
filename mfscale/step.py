"""The training step: one optimizer step on this rank's batch, whatever the table layout.

:func:`build` chooses and builds the step for a job (the trainer only calls it). Every variant has the same
call, ``step(user, item, rating, global_rows, global_step) -> summed squared error``, and a ``kind`` that logs,
tests and benchmarks read:

- ``cpp`` (:class:`CppStep`): closed-form gradients and the optimizer's update of the touched rows in one C++ op
  (``mfscale.cpu_step``), on a CPU where a rank's batch gradient is complete without an exchange (one
  process, or the blocks layout). Built on first use; ``--train.cpu_kernel auto`` falls back to torch ops.
- ``compiled`` / ``eager`` (:class:`ClosedFormStep`): the same math as torch ops
  (``BiasedMF.closed_form_grads``: no autograd), the per-rating L2 term reaching the optimizer as (ratings of the
  global batch touching each row) x (column weight); its kernels under torch.compile or not.
- ``sgd`` (:class:`SgdStep`): ``--optim.optimizer sgd``, one plain SGD update per rating in a C++ op
  (``cpu_step.sgd_step``), where CppStep applies; no torch-ops form (a per-rating loop is sequential).
- ``autograd`` (:class:`AutogradStep`): forward/backward through ``nn.Embedding(sparse=True)``; the reference,
  and what dropout, gravity, mixed precision and SparseAdam need (``JobConfig.fused_blockers``).

Every variant implements both model options (issue 24): without biases (``--model.biases off``) the bias columns'
and the global bias's gradients are 0, so they stay 0; with ``--model.max_norm`` the rows a batch touches are
renormalized in place before the step uses them (``TableLayout.renorm_touched``; inside the C++ op for ``cpp``).

All divide summed losses by the global batch's rating count, so W ranks compute the gradient of one process
on the union of their batches. The layout (``mfscale.layout``) combines and applies the table gradients; the
dense global bias is summed over ranks (DDP with a sum hook, or one all_reduce) and stepped by Adam here.
"""

from __future__ import annotations

import abc
import ctypes
import logging
import platform
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from . import cpu_step, daybias
from .config import SGD_LR, JobConfig
from .distributed import DistEnv
from .errors import ConfigError
from .layout import TableLayout
from .model import SPARSE_TABLES, BiasedMF, batch_errors, compiled_batch_errors
from .optim import LazyAdam, Optimizers, RatingSGD, RowRMSprop, build_tables

log = logging.getLogger("mfscale")

# Fused kernels are compiled (a one-off 10-60 s) only for data where an epoch takes longer than that.
COMPILE_MIN_ROWS = 1_000_000

# glibc malloc: requests up to this size come from the heap, and freed heap memory up to the trim threshold
# stays mapped. By default glibc mmaps (and on free unmaps) blocks of 128 KiB and up until its adaptive
# threshold has grown, so every step's multi-MB temporaries were fresh pages: ~2,400 page faults per step
# at batch 42k, 1.3-1.5x slower steps (benchmarks/RESULTS.md). Same effect as MALLOC_MMAP_THRESHOLD_ /
# MALLOC_TRIM_THRESHOLD_, which only work if set before the process starts.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
MALLOC_TRIM_THRESHOLD = 1 << 30


def keep_step_memory() -> bool:
    """Tune glibc's malloc so a training step's temporaries reuse mapped memory (no-op elsewhere)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD,
                                                                               MALLOC_TRIM_THRESHOLD))


class Step(abc.ABC):
    """One optimizer step of the tables and the global bias on this rank's batch.

    The global bias (the one dense parameter) is summed over ranks every step where the ranks meet every step
    anyway (replicated tables). Where they do not (blocks), a blocking collective per step would put the ranks
    in lockstep (2 ranks on 2 cores: 0.75-0.87x of one process with it, 1.0-1.06x without; issue 20), so each
    rank steps its own copy (``local_bias``): Adam on W x its batch's gradient, its estimate of the global
    batch's, and at every sync point (``TableLayout.sync_point``: the sub-epoch ends) ``reconcile`` replaces the
    copies and their Adam moments by their means over the ranks. The tables stay exact given the biases.
    """

    kind = "?"

    def __init__(self, env: DistEnv, layout: TableLayout, optims: Optimizers, reg_weights: torch.Tensor):
        self.env, self.layout, self.optims, self.reg_weights = env, layout, optims, reg_weights
        self.local_bias = env.distributed and not layout.meets_every_step
        self.max_norm = layout.cfg.model.max_norm  # 0 = off

    def __call__(self, user: torch.Tensor, item: torch.Tensor, rating: torch.Tensor, global_rows: int,
                 global_step: int, day_row: torch.Tensor | None = None, time_bin: torch.Tensor | None = None,
                 time_dev: torch.Tensor | None = None) -> torch.Tensor:
        """One step on the batch; returns its summed squared error (a tensor: no sync on a GPU).

        With user-day biases (``layout.day_bias``; ``day_row``: each rating's) or time-aware biases
        (``layout.time_bias``; ``time_bin``, ``time_dev``: each rating's ``TimeBias.rating_features``) the tables'
        step fits ``rating`` minus those biases and returns its errors, which are the whole model's, and the biases
        take their step from them (``mfscale.daybias``, ``mfscale.timebias``): the gradient of every parameter at the
        same point, as one step of the whole model.
        """
        days, time = self.layout.day_bias, self.layout.time_bias
        if days is None and time is None:
            return self._step(user, item, rating, global_rows, global_step, False)[0]
        if days is not None and day_row is None:
            raise ValueError("a job with user-day biases needs each rating's day_row")
        if time is not None and (time_bin is None or time_dev is None):
            raise ValueError("a job with time-aware biases needs each rating's time_bin and time_dev")
        group, scale = self.layout.opt.param_groups[0], 2.0 / global_rows
        lr, beta2, eps = float(group["lr"]), group["betas"][1], group["eps"]
        target, combine = rating, self.layout.time_combine()
        if time is not None:  # the tables fit rating - b_{i,bin} - alpha_u dev
            user, item = user.long(), item.long()  # once, for the time ops (the table step takes either)
            op = time.uses_op(combine)
            target = time.target(user, item, time_bin, time_dev, rating, op)
        if self.kind == "cpp":  # one C++ op: targets, tables and the day biases' step (three passes as torch ops)
            sse, err = self._step(user, item, target, global_rows, global_step, time is not None,
                                  days=None if days is None else self.day_op_args(day_row, global_rows))
        else:
            if days is not None:  # torch ops index with int64 (the C++ op takes the batch's int32 rows as they are)
                day_row = day_row.long()
            sse, err = self._step(user, item, target if days is None else days.targets(day_row, target),
                                  global_rows, global_step, True)
            if days is not None:
                ids, grad, counts = daybias.group(day_row, err.to(days.value.dtype) * scale, len(days.value))
                ids, grad, counts = self.layout.day_grads(ids, grad, counts)  # replicas: summed over the ranks
                days.update(ids, grad, counts, lr=lr, beta2=beta2, eps=eps,
                            l2=2.0 * self.layout.cfg.optim.reg_day / global_rows)
        if time is not None:
            time.update(user, item, time_bin, time_dev, err, global_rows=global_rows, lr=lr, beta2=beta2, eps=eps,
                        reg=self.layout.cfg.optim.reg_time, reg_drift=self.layout.cfg.optim.reg_drift,
                        combine=combine, op=op)
        return sse

    def day_op_args(self, day_row: torch.Tensor, global_rows: int) -> tuple:
        """The user-day biases' arguments of the C++ step (``DayBias.op_args``), which steps them in the same op from
        the errors: the tables' step size schedule, beta2, and the L2 2 reg_day / G."""
        group = self.layout.opt.param_groups[0]
        return self.layout.day_bias.op_args(day_row, lr=float(group["lr"]), beta2=group["betas"][1],
                                            l2=2.0 * self.layout.cfg.optim.reg_day / global_rows)

    @abc.abstractmethod
    def _step(self, user: torch.Tensor, item: torch.Tensor, rating: torch.Tensor, global_rows: int,
              global_step: int, errors: bool, days: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tables' and global bias's step; returns the summed squared error and, with ``errors``, each rating's
        error (prediction - rating, before the step). ``days``: ``DayBias.op_args``, for the C++ step alone."""

    def state_dict(self) -> dict[str, Any] | None:
        """The step's own checkpoint state (the fp16 GradScaler's), or None."""
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        return None  # nothing of its own by default

    def step_global_bias(self, grad: torch.Tensor | float) -> None:
        """The dense global bias: this rank's gradient (a tensor; on a CPU also a number) summed over ranks (or, with
        ``local_bias``, scaled to the global batch), then one Adam step."""
        model, opt = self.layout.model, self.optims.dense
        if self.local_bias:
            grad = grad * self.env.world_size
        elif self.env.distributed:
            grad = torch.as_tensor(grad, dtype=model.global_bias.dtype, device=model.global_bias.device)
            self.env.count("all_reduce")
            dist.all_reduce(grad)
        if model.global_bias.device.type == "cpu":
            self.optims.step_dense_cpu(float(grad))
            return
        model.global_bias.grad = grad.reshape(()).to(model.global_bias.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def reconcile(self) -> None:
        """At a sync point: the ranks' copies of the global bias and its Adam moments become their means."""
        if not self.local_bias:
            return
        p = self.layout.model.global_bias
        state = self.optims.dense.state[p]
        if not state:  # no step yet
            return
        keys = ("exp_avg", "exp_avg_sq")
        buf = torch.stack([p.detach().reshape(())] + [state[k].reshape(()) for k in keys])
        self.env.count("all_reduce")
        dist.all_reduce(buf)
        buf /= self.env.world_size
        with torch.no_grad():
            p.copy_(buf[0])
        for k, v in zip(keys, buf[1:], strict=True):
            state[k].copy_(v)


class ClosedFormStep(Step):
    """Closed-form gradients as torch ops into the layout's optimizer (LazyAdam or RowRMSprop); ``compiled``: their
    kernels and the optimizer's under torch.compile (same math)."""

    def __init__(self, env: DistEnv, layout: TableLayout, optims: Optimizers, reg_weights: torch.Tensor,
                 compiled: bool = False):
        super().__init__(env, layout, optims, reg_weights)
        self.kind = "compiled" if compiled else "eager"
        self.errors = compiled_batch_errors() if compiled else batch_errors
        # the whole-table sweep only pays compiled (eagerly, gathering the touched rows is cheaper)
        self.dense_min = layout.dense_min if compiled else None
        layout.opt.compile = compiled  # the optimizer runs its compiled kernels for this step
        self.scratch: dict[str, torch.Tensor] = {}  # gradient rows, reused every step (closed_form_grads)

    def _step(self, user, item, rating, global_rows, global_step, errors, days=None):
        model = self.layout.model
        if self.max_norm:
            self.layout.renorm_touched(user, item, self.max_norm)
        gu, gi, g_mean, sse, err = model.closed_form_grads(user, item, rating, global_rows, errors=self.errors,
                                                           dense_min=self.dense_min, scratch=self.scratch,
                                                           return_errors=True)
        dtype = gu.rows.dtype
        col_weights = self.reg_weights * (2.0 / global_rows)
        implicit = self.layout.implicit
        if implicit is not None:  # the users' L2 pulls toward z_u: the optimizer adds count w p, this takes count w z
            d = implicit.dim
            z = implicit.z if gu.ids is None else implicit.z[gu.ids.long()]  # dense form: every row
            gu.rows[:, :d] -= gu.counts.to(dtype)[:, None] * col_weights[:d] * z
        self.layout.apply_row_grads([(g.ids, g.rows, g.counts.to(dtype)) for g in (gu, gi)], col_weights)
        self.step_global_bias(g_mean)
        return sse, err


class CppStep(Step):
    """ClosedFormStep's gradients and the tables' optimizer's update (LazyAdam or RowRMSprop) of the touched rows in
    one C++ op (``mfscale.cpu_step``).

    Only where ``layout.rows_complete`` (no row gradients to exchange); the global bias is summed over ranks and
    stepped by Adam as in ClosedFormStep.
    """

    kind = "cpp"

    @staticmethod
    def applies(env: DistEnv, layout: TableLayout) -> bool:
        """CPU tables, LazyAdam or RowRMSprop, and a layout whose row gradients are local to the rank."""
        return env.device.type == "cpu" and layout.rows_complete and isinstance(layout.opt, (LazyAdam, RowRMSprop))

    def __init__(self, env: DistEnv, layout: TableLayout, optims: Optimizers, reg_weights: torch.Tensor):
        if not self.applies(env, layout):
            raise ValueError("CppStep needs CPU tables, LazyAdam or RowRMSprop and a layout whose row gradients are "
                             "local")
        if len({(tuple(g["betas"]), g["eps"]) for g in layout.opt.param_groups}) != 1:
            raise ValueError("CppStep: the op takes one betas/eps for both tables")
        super().__init__(env, layout, optims, reg_weights)
        self.scratch: dict[str, torch.Tensor] = {}  # the op's per-table marks and work memory
        self.row_wise = isinstance(layout.opt, RowRMSprop)
        self._col_weights: tuple[float, torch.Tensor] | None = None  # (scale, reg_weights * scale) of the last step

    # This step's Python is kept short: it runs between two ops that sweep the caches, so every line of it runs cold
    # (ml-10m: 0.12 ms of a 1.25 ms step before session 18, ~40 us when the same lines run warm).
    def __call__(self, user, item, rating, global_rows, global_step, day_row=None, time_bin=None, time_dev=None):
        days = self.layout.day_bias
        if self.layout.time_bias is not None or (days is not None and day_row is None):
            return super().__call__(user, item, rating, global_rows, global_step, day_row, time_bin, time_dev)
        return self._step(user, item, rating, global_rows, global_step, False,
                          days=None if days is None else self.day_op_args(day_row, global_rows))[0]

    def _step(self, user, item, rating, global_rows, global_step, errors, days=None):
        model, opt = self.layout.model, self.layout.opt
        users, items = model.users.weight.detach(), model.items.weight.detach()
        err = users.new_empty(user.shape[0]) if errors else None  # the op writes each rating's error there
        group, scale = opt.param_groups[0], 2.0 / global_rows
        if self._col_weights is None or self._col_weights[0] != scale:  # the same but in an epoch's last step
            self._col_weights = (scale, self.reg_weights * scale)
        out: list[float] = []

        def update(steps: list[tuple[dict, float]]) -> None:
            (su, size_u), (si, size_i) = steps  # the optimizer's params: [users, items]
            if self.row_wise:
                state_u, state_i = (su["row_sq"], None), (si["row_sq"], None)
            else:
                state_u, state_i = (su["exp_avg"], su["exp_avg_sq"]), (si["exp_avg"], si["exp_avg_sq"])
            out.extend(cpu_step.fused_step(
                users, items, state_u, state_i, user, item, rating.to(users.dtype), float(model.global_bias),
                scale, self._col_weights[1], (size_u, size_i), group["betas"], group["eps"], self.scratch,
                max_norm=self.max_norm, biases=model.biases, row_wise=self.row_wise, days=days, errors=err,
                user_prior=None if self.layout.implicit is None else self.layout.implicit.z))

        opt.step(update=update)
        g_sum, sse = out
        # the gradient rounded to the bias's dtype, as a tensor of it would hold it
        self.step_global_bias(_as_dtype(g_sum if model.biases else 0.0, model.global_bias.dtype))
        return torch.tensor(sse, dtype=torch.float64), err


class SgdStep(Step):
    """``--optim.optimizer sgd``: one SGD update per rating of the batch, in batch order, of the tables and the
    user-day biases in one C++ op (``cpu_step.sgd_step``; Hogwild over the threads). The global bias takes the
    batch's step as in the other steps (Adam on the mean error's gradient, summed over ranks).

    Only where ``layout.rows_complete`` on a CPU (one process, or blocks tables: DSGD, each rank updating the rows of
    its stratum): replicated ranks exchange summed row gradients, which per-rating updates do not have.
    """

    kind = "sgd"

    def __init__(self, env: DistEnv, layout: TableLayout, optims: Optimizers, reg_weights: torch.Tensor):
        if env.device.type != "cpu":
            raise ConfigError("--optim.optimizer sgd updates the tables rating by rating in a C++ op on the CPU; on "
                              "a GPU use --optim.optimizer row_rmsprop")
        if not layout.rows_complete:
            raise ConfigError("--optim.optimizer sgd needs one process or --train.tables blocks (replicated tables "
                              "exchange summed row gradients, and per-rating updates have none)")
        if not isinstance(layout.opt, RatingSGD):
            raise ValueError("SgdStep needs the tables' optimizer RatingSGD")
        try:
            cpu_step.load()
        except cpu_step.KernelUnavailable as exc:
            raise ConfigError(f"--optim.optimizer sgd: the C++ op could not be built ({exc}); use --optim.optimizer "
                              "row_rmsprop") from exc
        super().__init__(env, layout, optims, reg_weights)
        self.lr_checked = False

    def _check_lr(self) -> None:
        """Warn once, at the first step (a resumed run's learning rate is the checkpoint's, known only then), when
        the run's learning rate is one meant for RowRMSprop's normalized steps."""
        self.lr_checked = True
        group = self.layout.opt.param_groups[0]
        lr = float(group.get("initial_lr", group["lr"]))
        if lr < SGD_LR / 3 and self.env.is_main:
            log.warning("--optim.optimizer sgd with --optim.lr %g: per-rating steps want about %g (README); this "
                        "run may stop far from its best RMSE", lr, SGD_LR)

    def __call__(self, user, item, rating, global_rows, global_step, day_row=None, time_bin=None, time_dev=None):
        if self.layout.time_bias is not None:  # config.validate refuses it first
            raise ConfigError("--optim.optimizer sgd does not step the time-aware biases (--model.time_bins, "
                              "--model.user_drift)")
        if not self.lr_checked:
            self._check_lr()
        model, cfg = self.layout.model, self.layout.cfg
        days = self.layout.day_bias
        if days is not None and day_row is None:
            raise ValueError("a job with user-day biases needs each rating's day_row")
        day_args = None if days is None else (days.table, day_row, cfg.optim.reg_day)
        users, items = (p.detach() for p in model.sparse_parameters())
        out: list[float] = []

        def update(steps: list[tuple[dict, float]]) -> None:
            (_, lr_u), (_, lr_i) = steps  # one schedule for both tables
            if lr_u != lr_i:
                raise ValueError("SgdStep: the op takes one learning rate for both tables")
            out.extend(cpu_step.sgd_step(users, items, user, item, rating.to(users.dtype),
                                         float(model.global_bias.detach()), lr_u, cfg.optim.reg_factor,
                                         float(self.reg_weights[-1]), biases=model.biases, days=day_args))

        self.layout.opt.step(update=update)
        e_sum, sse = out
        # the global bias: Adam on the batch's mean squared error's gradient, as the other steps take it
        self.step_global_bias(torch.tensor(2.0 * e_sum / global_rows if model.biases else 0.0,
                                           dtype=model.global_bias.dtype))
        return torch.tensor(sse, dtype=torch.float64)

    def _step(self, user, item, rating, global_rows, global_step, errors, days=None):
        raise NotImplementedError("SgdStep steps in __call__ (the user-day biases inside its op)")


def _as_dtype(x: float, dtype: torch.dtype) -> float:
    """``x`` rounded to ``dtype``: ``float(torch.tensor(x, dtype=dtype))`` without making a tensor."""
    if dtype == torch.float64:
        return x
    return ctypes.c_float(x).value if dtype == torch.float32 else float(torch.tensor(x, dtype=dtype))


def _sum_allreduce_hook(state, bucket):  # no annotations: DDP checks them and ours are strings (PEP 563)
    """DDP comm hook that sums instead of averaging: losses are already divided by the global batch."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class AutogradStep(Step):
    """Autograd through the (DDP-wrapped) model; sparse table gradients go to the layout."""

    kind = "autograd"

    def __init__(self, cfg: JobConfig, env: DistEnv, layout: TableLayout, optims: Optimizers,
                 reg_weights: torch.Tensor):
        super().__init__(env, layout, optims, reg_weights)
        self.local_bias = False  # DDP sums the global bias's gradient every step
        self.cfg = cfg
        self.forward_model: torch.nn.Module = layout.model
        if env.distributed:  # the dense global bias through DDP, the tables through the layout
            DDP._set_params_and_buffers_to_ignore_for_model(layout.model, list(SPARSE_TABLES))
            self.forward_model = DDP(layout.model, device_ids=[env.device.index] if env.device.type == "cuda"
                                     else None, broadcast_buffers=False)
            self.forward_model.register_comm_hook(None, _sum_allreduce_hook)
        precision = cfg.train.precision
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def state_dict(self):
        return self.scaler.state_dict() if self.scaler else None

    def load_state_dict(self, state):
        if self.scaler and state:
            self.scaler.load_state_dict(state)

    def _dropout_mask(self, n: int, global_step: int) -> torch.Tensor | None:
        p = self.cfg.model.dropout
        if p == 0:
            return None
        # Keyed by (seed, rank, step), so a resumed run draws the same masks without saving RNG streams.
        g = torch.Generator(device=self.env.device)
        g.manual_seed(hash((self.cfg.train.seed, self.env.rank, global_step)) & 0x7FFF_FFFF_FFFF)
        keep = torch.rand((n, self.cfg.model.dim + 1), generator=g, device=self.env.device) >= p  # bias col unused
        return keep.to(torch.float32) / (1 - p)

    def _step(self, user, item, rating, global_rows, global_step, errors, days=None):
        dev = self.env.device
        opt_dense = self.optims.dense
        if self.max_norm:  # as nn.Embedding(max_norm=...)'s forward: in place, outside the graph
            self.layout.renorm_touched(user, item, self.max_norm)
        with torch.autocast(dev.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            pred, (u, v) = self.forward_model(user, item, self._dropout_mask(user.numel(), global_step))
            err = pred.to(torch.promote_types(pred.dtype, torch.float32)) - rating  # fp32 at least, f64 kept
            sse = err.square().sum()
            # Per-column weights (reg_factor on factors, reg_bias on the bias column) in one matmul each.
            implicit = self.layout.implicit
            pulled = u if implicit is None else u - torch.nn.functional.pad(implicit.z[user.long()], (0, 1))
            reg = (pulled.square() @ self.reg_weights).sum() + (v.square() @ self.reg_weights).sum()
            loss = (sse + reg) / global_rows
            if self.cfg.optim.gravity > 0:
                d = self.cfg.model.dim
                loss = loss + self._gravity(u[:, :d], v[:, :d], global_rows)
        if self.scaler:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        self.env.count("all_reduce")  # DDP's bucket of the global bias (no-op count on one process)
        self.layout.apply_sparse_grads(self.scaler)
        if self.scaler:
            self.scaler.step(opt_dense)
            self.scaler.update()
        else:
            opt_dense.step()
        opt_dense.zero_grad(set_to_none=True)
        return sse.detach(), err.detach() if errors else None

    def _gravity(self, p: torch.Tensor, q: torch.Tensor, global_rows: int) -> torch.Tensor:
        """gravity * mean over the global batch's (user, movie) pairs of <p_u, q_i>^2, via d x d Grams.

        sum_{a,b} <p_a, q_b>^2 = <P^T P, Q^T Q>_F. With A, C the Grams summed over ranks, the surrogate
        <A_r, C> + <A, C_r> (other side detached) has exactly the gradient of <A, C> for this rank's rows.
        """
        a_local, c_local = p.T @ p, q.T @ q
        a_all, c_all = a_local.detach().clone(), c_local.detach().clone()
        if self.env.distributed:
            self.env.count("all_reduce", 2)
            dist.all_reduce(a_all)
            dist.all_reduce(c_all)
        scale = self.cfg.optim.gravity / float(global_rows) ** 2
        return scale * ((a_local * c_all).sum() + (a_all * c_local).sum())


# ---- choosing the step ---------------------------------------------------------------------------------
def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp32":
        return
    if device.type != "cuda":
        raise ConfigError(f"--precision {precision} needs a CUDA device (mixed precision is autocast on CUDA); "
                          "use --precision fp32 on CPU")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16 is not supported by this GPU; use fp16 or fp32")


def _cpp_step_builds(mode: str, env: DistEnv, layout: TableLayout) -> bool:
    """Whether the closed-form step runs as the C++ op (``--train.cpu_kernel``); builds it on first use."""
    if mode == "off" or not CppStep.applies(env, layout):
        if mode == "on":
            raise ConfigError("--train.cpu_kernel on needs a CPU device and one process or --train.tables "
                              "blocks (the replicated layout exchanges gradient rows between the ranks)")
        return False
    try:
        cpu_step.load()
    except cpu_step.KernelUnavailable as exc:
        if mode == "on":
            raise ConfigError(f"--train.cpu_kernel on: the C++ step could not be built ({exc}); use "
                              "--train.cpu_kernel off") from exc
        log.warning("the C++ training step could not be built (%s); running the fused step as torch ops", exc)
        return False
    return True


def _compiles(cfg: JobConfig, device: torch.device, required: bool) -> bool:
    """Compile the closed-form kernels now, on a throwaway model, so a missing compiler shows up before
    training; True when they compiled. With ``--train.compile auto`` a failure falls back to the same kernels
    run eagerly (identical math)."""
    # Sizes all different (9 ratings; 3 of 5 user rows, 4 of 7 movie rows touched), so that the kernels are
    # compiled for symbolic sizes and training reuses them: equal sizes here would be assumed equal later.
    scratch = BiasedMF(5, 7, cfg.model.dim).to(device)
    opt = build_tables(cfg.optim, scratch.sparse_parameters())  # the job's optimizer, its compiled kernels
    opt.compile = True
    try:
        user = torch.tensor([0, 1, 2, 1, 0, 2, 1, 0, 2], device=device)
        item = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0], device=device)
        w = torch.ones(cfg.model.dim + 1, device=device)
        for dense_min in (None, (0, 0)):  # both kernel forms (rows, whole table)
            gu, gi, _, _ = scratch.closed_form_grads(user, item, torch.ones(9, device=device), 9,
                                                      errors=compiled_batch_errors(), dense_min=dense_min)
            opt.step(rows=[(g.ids, g.rows, g.counts.to(w.dtype), w) for g in (gu, gi)])
    except Exception as exc:  # compile errors come from many layers (dynamo, inductor, the C++ compiler)
        if required:
            raise ConfigError(f"--train.compile on: torch.compile failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); use --train.compile off") from exc
        log.warning("torch.compile failed (%s); running the fused step without it", type(exc).__name__)
        return False
    return True


def build(cfg: JobConfig, env: DistEnv, layout: TableLayout, optims: Optimizers) -> Step:
    """The step for this job: closed form where it applies (the C++ op on a CPU that can build it, else torch
    ops, compiled from ``COMPILE_MIN_ROWS`` training ratings), else autograd."""
    t = cfg.train
    check_precision(t.precision, env.device)
    # Embedding rows stay in the tables' dtype under autocast (pytorch#98814), so these match them.
    reg_weights = torch.full((cfg.model.dim + 1,), cfg.optim.reg_factor, device=env.device,
                             dtype=layout.model.users.weight.dtype)
    reg_weights[-1] = cfg.optim.reg_bias if cfg.model.biases else 0.0  # plain MF: no bias to regularize
    if cfg.optim.optimizer == "sgd":  # no other form (config.validate has refused what it cannot do)
        return _logged(SgdStep(env, layout, optims, reg_weights))
    closed_form = t.step == "fused" or (t.step == "auto" and not cfg.fused_blockers())
    if not closed_form:
        return _logged(AutogradStep(cfg, env, layout, optims, reg_weights))
    if _cpp_step_builds(t.cpu_kernel, env, layout):
        return _logged(CppStep(env, layout, optims, reg_weights))
    compiled = t.compile == "on" or (t.compile == "auto" and layout.data.split_rows("train") >= COMPILE_MIN_ROWS)
    compiled = compiled and _compiles(cfg, env.device, required=t.compile == "on")
    return _logged(ClosedFormStep(env, layout, optims, reg_weights, compiled))


_DESCRIPTION = {"cpp": "fused, one C++ op (mfscale/csrc/fused_step.cpp)", "compiled": "fused, kernels compiled",
                "eager": "fused, torch ops", "autograd": "autograd",
                "sgd": "one SGD update per rating, one C++ op (mfscale/csrc/fused_step.cpp)"}


def _logged(step: Step) -> Step:
    log.info("training step: %s", _DESCRIPTION[step.kind])
    return step


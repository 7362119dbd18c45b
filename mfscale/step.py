"""The training step variants: one optimizer step on this rank's batch, whatever the table layout.

- :class:`FusedStep`: the loss's gradients in closed form (``BiasedMF.closed_form_grads``), no autograd; the
  per-rating L2 term reaches LazyAdam as (ratings of the global batch touching each row) x (column weight).
- :class:`KernelStep`: the same math as FusedStep in one C++ op (``mfscale.cpu_step``), on the CPU where a
  rank's batch gradient is complete without an exchange (one process, or the blocks layout).
- :class:`AutogradStep`: forward/backward through ``nn.Embedding(sparse=True)``; the reference, and what
  dropout, gravity, mixed precision and SparseAdam need.

Both divide summed losses by the global batch's rating count, so W ranks compute the gradient of one process
on the union of their batches. The layout (``mfscale.layout``) combines and applies the table gradients; the
dense global bias is summed over ranks (DDP with a sum hook, or one all_reduce) and stepped by Adam here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from . import cpu_step
from .config import JobConfig
from .distributed import DistEnv
from .layout import TableLayout
from .model import batch_errors
from .optim import LazyAdam


def step_global_bias(env: DistEnv, model: torch.nn.Module, opt_dense: torch.optim.Optimizer,
                     grad: torch.Tensor) -> None:
    """The dense global bias: this rank's gradient summed over ranks, then one Adam step."""
    if env.distributed:
        dist.all_reduce(grad)
    model.global_bias.grad = grad.reshape(()).to(model.global_bias.dtype)
    opt_dense.step()
    opt_dense.zero_grad(set_to_none=True)


class FusedStep:
    """Closed-form gradients into the layout's optimizer (LazyAdam)."""

    def __init__(self, env: DistEnv, layout: TableLayout, opt_dense: torch.optim.Optimizer,
                 reg_weights: torch.Tensor, errors: Callable[..., torch.Tensor] = batch_errors,
                 dense_min: tuple[int, int] | None = None):
        self.env, self.layout, self.opt_dense, self.reg_weights = env, layout, opt_dense, reg_weights
        self.errors, self.dense_min = errors, dense_min
        self.scratch: dict[str, torch.Tensor] = {}  # gradient rows, reused every step (closed_form_grads)

    def __call__(self, user: torch.Tensor, item: torch.Tensor, rating: torch.Tensor, global_rows: int
                 ) -> torch.Tensor:
        model = self.layout.model
        gu, gi, g_mean, sse = model.closed_form_grads(user, item, rating, global_rows, errors=self.errors,
                                                      dense_min=self.dense_min, scratch=self.scratch)
        dtype = gu.rows.dtype
        self.layout.apply_row_grads([(g.ids, g.rows, g.counts.to(dtype)) for g in (gu, gi)],
                                    self.reg_weights * (2.0 / global_rows))
        step_global_bias(self.env, model, self.opt_dense, g_mean)
        return sse


class KernelStep:
    """FusedStep's gradients and LazyAdam's update of the touched rows in one C++ op (``mfscale.cpu_step``).

    Only where ``layout.rows_complete`` (no row gradients to exchange) and the optimizer is LazyAdam; the
    global bias is summed over ranks and stepped by Adam as in FusedStep.
    """

    @staticmethod
    def applies(env: DistEnv, layout: TableLayout) -> bool:
        """CPU tables, LazyAdam, and a layout whose row gradients are local to the rank."""
        return env.device.type == "cpu" and layout.rows_complete and isinstance(layout.opt, LazyAdam)

    def __init__(self, env: DistEnv, layout: TableLayout, opt_dense: torch.optim.Optimizer,
                 reg_weights: torch.Tensor):
        if not self.applies(env, layout):
            raise ValueError("KernelStep needs CPU tables, LazyAdam and a layout whose row gradients are local")
        if len({(tuple(g["betas"]), g["eps"]) for g in layout.opt.param_groups}) != 1:
            raise ValueError("KernelStep: the op takes one betas/eps for both tables")
        self.env, self.layout, self.opt_dense, self.reg_weights = env, layout, opt_dense, reg_weights
        self.scratch: dict[str, torch.Tensor] = {}  # the op's per-table marks and work memory

    def __call__(self, user: torch.Tensor, item: torch.Tensor, rating: torch.Tensor, global_rows: int
                 ) -> torch.Tensor:
        model, opt = self.layout.model, self.layout.opt
        users, items = (p.detach() for p in model.sparse_parameters())
        group, scale = opt.param_groups[0], 2.0 / global_rows
        out: list[float] = []

        def update(steps: list[tuple[dict, float]]) -> None:
            (su, size_u), (si, size_i) = steps  # LazyAdam's params: [users, items]
            out.extend(cpu_step.fused_step(
                users, items, (su["exp_avg"], su["exp_avg_sq"]), (si["exp_avg"], si["exp_avg_sq"]),
                user.to(torch.int64), item.to(torch.int64), rating.to(users.dtype),
                float(model.global_bias.detach()), scale, self.reg_weights * scale, (size_u, size_i),
                group["betas"], group["eps"], self.scratch))

        opt.step(update=update)
        g_sum, sse = out
        step_global_bias(self.env, model, self.opt_dense, torch.tensor(g_sum, dtype=model.global_bias.dtype))
        return torch.tensor(sse, dtype=torch.float64)


class AutogradStep:
    """Autograd through the (DDP-wrapped) model; sparse table gradients go to the layout."""

    def __init__(self, cfg: JobConfig, env: DistEnv, layout: TableLayout, opt_dense: torch.optim.Optimizer,
                 reg_weights: torch.Tensor, forward_model: torch.nn.Module, scaler: torch.amp.GradScaler | None,
                 autocast_dtype: torch.dtype | None):
        self.cfg, self.env, self.layout, self.opt_dense = cfg, env, layout, opt_dense
        self.reg_weights, self.forward_model = reg_weights, forward_model
        self.scaler, self.autocast_dtype = scaler, autocast_dtype
        self.global_step = 0  # set by the trainer before each call (keys the dropout masks)

    def _dropout_mask(self, n: int) -> torch.Tensor | None:
        p = self.cfg.model.dropout
        if p == 0:
            return None
        # Keyed by (seed, rank, step), so a resumed run draws the same masks without saving RNG streams.
        g = torch.Generator(device=self.env.device)
        g.manual_seed(hash((self.cfg.train.seed, self.env.rank, self.global_step)) & 0x7FFF_FFFF_FFFF)
        keep = torch.rand((n, self.cfg.model.dim + 1), generator=g, device=self.env.device) >= p  # bias col unused
        return keep.to(torch.float32) / (1 - p)

    def __call__(self, user: torch.Tensor, item: torch.Tensor, rating: torch.Tensor, global_rows: int
                 ) -> torch.Tensor:
        dev = self.env.device
        with torch.autocast(dev.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            pred, (u, v) = self.forward_model(user, item, self._dropout_mask(user.numel()))
            err = pred.to(torch.promote_types(pred.dtype, torch.float32)) - rating  # fp32 at least, f64 kept
            sse = err.square().sum()
            # Per-column weights (reg_factor on factors, reg_bias on the bias column) in one matmul each.
            reg = (u.square() @ self.reg_weights).sum() + (v.square() @ self.reg_weights).sum()
            loss = (sse + reg) / global_rows
            if self.cfg.optim.gravity > 0:
                d = self.cfg.model.dim
                loss = loss + self._gravity(u[:, :d], v[:, :d], global_rows)
        if self.scaler:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        self.layout.apply_sparse_grads(self.scaler)
        if self.scaler:
            self.scaler.step(self.opt_dense)
            self.scaler.update()
        else:
            self.opt_dense.step()
        self.opt_dense.zero_grad(set_to_none=True)
        return sse.detach()

    def _gravity(self, p: torch.Tensor, q: torch.Tensor, global_rows: int) -> torch.Tensor:
        """gravity * mean over the global batch's (user, movie) pairs of <p_u, q_i>^2, via d x d Grams.

        sum_{a,b} <p_a, q_b>^2 = <P^T P, Q^T Q>_F. With A, C the Grams summed over ranks, the surrogate
        <A_r, C> + <A, C_r> (other side detached) has exactly the gradient of <A, C> for this rank's rows.
        """
        a_local, c_local = p.T @ p, q.T @ q
        a_all, c_all = a_local.detach().clone(), c_local.detach().clone()
        if self.env.distributed:
            dist.all_reduce(a_all)
            dist.all_reduce(c_all)
        scale = self.cfg.optim.gravity / float(global_rows) ** 2
        return scale * ((a_local * c_all).sum() + (a_all * c_local).sum())

"""Gradient synchronization for sparse embedding tables with ordinary collectives.

NCCL cannot all-reduce sparse tensors (pytorch/pytorch#22400), so the tables stay out of DDP's reducer
and their gradients are combined here with all_gather, which runs the same on gloo and NCCL: every rank
dedupes its batch's rows, the ranks exchange row counts, then padded row ids and rows, and each rank
sums duplicates (``optim.sum_rows``). Every rank ends with the same gradient: the sum over ranks (the loss is already
normalized by the global batch size, so a sum equals one process training on the union of the batches).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .optim import sum_rows


def _all_gather_padded(t: torch.Tensor, counts: list[int], world: int) -> list[torch.Tensor]:
    pad = max(counts)
    buf = t.new_zeros((pad, *t.shape[1:]))
    buf[: t.shape[0]] = t
    out = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(out, buf)
    return [o[:c] for o, c in zip(out, counts, strict=True)]


def all_sum_rows(local: list[tuple[torch.Tensor, torch.Tensor]], n_rows: list[int],
                 group: dist.ProcessGroup | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per table, the sum over ranks of row-sparse values given as (unique row ids, rows) on each rank.

    The tables' values must share a width (they do: dim + 1, or dim + 2 with a count column), so all tables
    travel in one message: row counts first, then padded ids and padded rows.
    """
    world = dist.get_world_size(group)
    device = local[0][1].device
    sizes = torch.tensor([ids.numel() for ids, _ in local], dtype=torch.long, device=device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    per_rank = [s.tolist() for s in all_sizes]
    counts = [sum(s) for s in per_rank]
    ids = _all_gather_padded(torch.cat([i.long() for i, _ in local]), counts, world)
    rows = _all_gather_padded(torch.cat([v for _, v in local]), counts, world)
    out = []
    for k, n in enumerate(n_rows):
        parts_i, parts_v = [], []
        for r in range(world):
            start = sum(per_rank[r][:k])
            parts_i.append(ids[r][start : start + per_rank[r][k]])
            parts_v.append(rows[r][start : start + per_rank[r][k]])
        out.append(sum_rows(torch.cat(parts_i), torch.cat(parts_v), n))
    return out


def all_gather_ids(local: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """Per table, every rank's row ids concatenated (rank order), from 1-D id tensors on each rank: for replicas
    that must all change the rows any rank touches (``--model.max_norm``). All tables in one message."""
    world = dist.get_world_size(group)
    sizes = torch.tensor([t.numel() for t in local], dtype=torch.long, device=local[0].device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    per_rank = [s.tolist() for s in all_sizes]
    ids = _all_gather_padded(torch.cat([t.long() for t in local]), [sum(s) for s in per_rank], world)
    out = []
    for k in range(len(local)):
        out.append(torch.cat([ids[r][sum(per_rank[r][:k]) : sum(per_rank[r][: k + 1])] for r in range(world)]))
    return out


def sync_sparse_rows(params: list[torch.nn.Parameter],
                     group: dist.ProcessGroup | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The sum of all ranks' sparse gradients of each parameter, as unique row ids and summed rows."""
    local = []
    for p in params:
        if p.grad is None:  # a rank whose batch was empty still joins the collectives
            local.append((torch.empty(0, dtype=torch.long, device=p.device),
                          torch.empty((0, p.shape[1]), dtype=p.dtype, device=p.device)))
        else:
            local.append(sum_rows(p.grad._indices()[0], p.grad._values(), p.shape[0]))
    return all_sum_rows(local, [p.shape[0] for p in params], group)


def sync_sparse_grads(params: list[torch.nn.Parameter], group: dist.ProcessGroup | None = None) -> None:
    """Replace each parameter's sparse gradient by the sum of all ranks' gradients (in place).

    The new gradients have unique rows (not necessarily sorted, so not flagged coalesced); an optimizer
    that takes unique rows directly (optim.LazyAdam.step(rows=...)) can use sync_sparse_rows and skip a dedupe.
    """
    for p, (uniq, summed) in zip(params, sync_sparse_rows(params, group), strict=True):
        p.grad = torch.sparse_coo_tensor(uniq.unsqueeze(0), summed, p.shape)

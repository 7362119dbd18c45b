"""Both whole tables on every rank; gradient rows all-gathered every step (the layout through 2026-11).

Each step the ranks all-gather the gradient rows their batches touched (``sync.all_sum_rows``) and every rank
applies the union. Traffic and optimizer work per rank grow with the global batch, so adding ranks adds no
speed and no memory; on one process it is the default (the streamed input path, no exchange).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..config import JobConfig
from ..distributed import DistEnv
from ..errors import ConfigError
from ..optim import RowOptimizer, row_floats
from ..shards import TRAIN_ROW_BYTES, Dataset, days_of
from ..stream import RatingStream, make_loader
from ..sync import all_gather_ids, all_sum_rows, sync_sparse_grads, sync_sparse_rows
from .base import DENSE_SWEEP_MIN_FRACTION, TableLayout, fits_on_device
from .rows import auto_strata, deal_rows, train_counts

# Several ranks meet every step (the gradient rows' all_gather); the loop's own collectives (the stop vote, the
# training loss) run every this many steps: one tiny all_reduce took ~0.2 ms against ~6-8 ms steps with 2
# gloo ranks on 2 CPU cores, so every 10th step makes that ~0.3%.
SYNC_EVERY = 10


class Replicated(TableLayout):
    """Both whole tables on every rank; gradient rows all-gathered every step."""

    name = "replicated"

    def __init__(self, cfg: JobConfig, env: DistEnv, data: Dataset, batch_size: int,
                 lr_scales: tuple[float, float] | None = None):
        super().__init__(cfg, env, data, batch_size, lr_scales)
        self._build(np.arange(data.n_users), data.n_items, np.arange(data.n_items))
        self.workers = cfg.data.workers
        if cfg.data.resident == "on" and self.workers:
            raise ConfigError("--data.resident on reads batches in the training process; use --workers 0")
        # The whole training split on the device (batches cut there, identical to streamed ones)?
        self.resident = not self.workers and fits_on_device(data.split_rows("train"), cfg.data.resident, env)
        if self.resident:  # every row group (streamed: read as the epochs go, nothing at start-up)
            self.decoded_bytes = data.split_rows("train") * TRAIN_ROW_BYTES
        self.strata = self._strata(cfg, env, data, batch_size)
        deal = None
        if self.strata > 1:  # users and movies dealt to k blocks each, balanced by their training ratings
            deal = tuple(deal_rows(counts, self.strata) for counts in train_counts(data))
        day_rows = None
        timed = cfg.uses_day_bias() or cfg.uses_time_bias()
        if timed or cfg.model.implicit:  # every rank holds every user's, as it holds every user row
            train = data.read_split("train", ("user", "item") + (("timestamp",) if timed else ()))
            if cfg.uses_day_bias():
                self._build_day_bias(train["user"], train["timestamp"])
                day_rows = self.day_bias.rows
            if cfg.uses_time_bias():
                self._build_time_bias(train["user"].astype(np.int64), train["item"].astype(np.int64),
                                      days_of(train["timestamp"]), None)
            # --model.implicit: one visit per epoch of every rating (each rank the same, on its replica)
            if self._build_implicit(train["user"].astype(np.int64), train["item"].astype(np.int64), None):
                self.implicit.add_group("all", train["user"], train["item"], 0, data.n_items)
        self.stream = RatingStream(data, "train", batch_size=batch_size, rank=env.rank, world_size=env.world_size,
                                   seed=cfg.train.seed, resident=env.device if self.resident else None,
                                   strata=deal, day_rows=day_rows,
                                   time_features=None if self.time_bias is None else self.time_bias.rating_features)
        self.steps_per_epoch = self.stream.steps_per_epoch
        self.rows_complete = not env.distributed
        self.meets_every_step = env.distributed
        if not env.distributed:
            self.dense_min = tuple(math.ceil(DENSE_SWEEP_MIN_FRACTION * n) for n in (data.n_users, data.n_items))

    def _strata(self, cfg: JobConfig, env: DistEnv, data: Dataset, batch_size: int) -> int:
        """k of the k x k strata batches are drawn from (``--train.strata``; 0: rows.auto_strata)."""
        if cfg.train.strata == 1:
            return 1
        if not self.resident:
            raise ConfigError("--train.strata regroups the training split in memory: it needs a resident split "
                              "(--data.resident on, --workers 0)")
        return cfg.train.strata or auto_strata(data.n_users, data.n_items, cfg.model.dim,
                                               data.split_rows("train"), batch_size * env.world_size,
                                               row_floats(cfg.optim.optimizer, cfg.model.dim))

    def sync_point(self, step_in_epoch: int) -> bool:
        return not self.env.distributed or step_in_epoch % SYNC_EVERY == 0 or step_in_epoch == self.steps_per_epoch

    def batches(self, epoch: int, start_step: int) -> Iterator[dict[str, Any]]:
        self.stream.set_epoch(epoch, start_step)
        if self.resident:
            it = iter(self.stream)
        else:
            it = iter(make_loader(self.stream, self.workers, pin_memory=self.env.device.type == "cuda"))
        return it if self.implicit is None else self._with_implicit(it, start_step)

    def _with_implicit(self, it: Iterator[dict[str, Any]], start_step: int) -> Iterator[dict[str, Any]]:
        """--model.implicit: the epoch's one visit before its first step (a run resumed inside the epoch made it
        already), and the end of the implicit rows' epoch after its last."""
        if start_step == 0:
            self.implicit.visit("all", self.model.users.weight.detach())
        yield from it
        self.implicit.end_epoch()

    def global_ids(self, batch):
        return batch["user"].cpu().numpy().astype(np.int64), batch["item"].cpu().numpy().astype(np.int64)

    def apply_row_grads(self, tables, col_weights) -> None:
        if self.env.distributed:
            dim = tables[0][1].shape[1]
            local = [(ids, torch.cat([rows, counts[:, None]], 1)) for ids, rows, counts in tables]
            self.bytes_sent += sum(ids.numel() * (8 + (dim + 1) * rows.element_size()) for ids, rows in local) \
                * (self.env.world_size - 1)
            self.env.count("all_gather", 3)  # sizes, ids, rows
            synced = all_sum_rows(local, [self.data.n_users, self.data.n_items])
            tables = [(ids, v[:, :-1], v[:, -1]) for ids, v in synced]
        self.opt.step(rows=[(ids, rows, counts, col_weights) for ids, rows, counts in tables])

    def day_grads(self, ids, grad, counts):
        """Every replica applies the sum of the ranks' user-day gradients (one all_gather of their rows)."""
        if not self.env.distributed:
            return ids, grad, counts
        local = [(ids, torch.stack([grad, counts], 1))]
        self.bytes_sent += ids.numel() * (8 + 2 * grad.element_size()) * (self.env.world_size - 1)
        self.env.count("all_gather", 3)  # sizes, ids, rows
        (ids, v), = all_sum_rows(local, [len(self.day_bias.keys) + 1])
        return ids, v[:, 0], v[:, 1]

    def time_combine(self):
        """Every replica applies the sum of the ranks' time-bias gradients (one all_gather of their rows)."""
        if not self.env.distributed:
            return None

        def combine(local, n_rows):
            self.bytes_sent += sum(ids.numel() * (8 + 2 * v.element_size()) for ids, v in local) \
                * (self.env.world_size - 1)
            self.env.count("all_gather", 3)  # sizes, ids, rows
            return all_sum_rows(local, n_rows)

        return combine

    def renorm_touched(self, user, item, max_norm) -> None:
        """Every replica renormalizes the rows any rank's batch touches (the union), so the replicas stay equal
        and equal one process on the union: one all_gather of the batches' unique row ids per step."""
        if self.env.distributed:
            local = [torch.unique(user.long()), torch.unique(item.long())]
            self.bytes_sent += sum(t.numel() * 8 for t in local) * (self.env.world_size - 1)
            self.env.count("all_gather", 2)  # sizes, ids
            user, item = all_gather_ids(local)
        super().renorm_touched(user, item, max_norm)

    def apply_sparse_grads(self, scaler=None) -> None:
        params = self.model.sparse_parameters()
        synced = None
        if self.env.distributed:
            sent = sum(p.grad._nnz() * (8 + p.shape[1] * p.element_size()) for p in params if p.grad is not None)
            self.bytes_sent += sent * (self.env.world_size - 1)
            self.env.count("all_gather", 3)  # sizes, ids, rows
            if isinstance(self.opt, RowOptimizer) and scaler is None:
                synced = sync_sparse_rows(params)  # unique rows: no second dedupe
            else:
                sync_sparse_grads(params)
        if scaler is not None:
            scaler.step(self.opt)
        elif synced is not None:
            self.opt.step(rows=synced)
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def user_owner(self, user):
        return user % self.env.world_size

    def user_local(self, user):
        return user

    def eval_tables(self):
        return self.model.users.weight.detach(), self.model.items.weight.detach(), self.model.global_bias.detach()

    @property
    def n_parts(self) -> int:
        return 1

    def writes_part(self) -> bool:
        return self.env.is_main

    def held_ids(self, position):
        return np.arange(self.data.n_users), np.arange(self.data.n_items)

"""How the embedding tables are laid out across ranks, exchanged and updated: one interface, two layouts.

The training loop, evaluation and checkpointing talk to a :class:`TableLayout` (``base.py``); they never ask
which one. :func:`build` picks and builds it from the config:

- :class:`Replicated` (``replicated.py``): every rank holds both whole tables; gradient rows all-gathered.
- :class:`Blocks` (``blocks.py``): stratified blocks (DSGD), 1/W of each table per rank, no per-step exchange.

``rows.py`` deals rows to blocks and draws their initial values, the same for every layout and world size.
"""

from __future__ import annotations

import logging

from .. import optim
from ..config import JobConfig
from ..distributed import DistEnv
from ..errors import ConfigError, DataError
from ..shards import Dataset
from .base import EvalShare, TableLayout
from .blocks import Blocks
from .replicated import Replicated
from .rows import auto_strata, deal_rows, init_rows, movie_block, stratum_balance, train_counts

__all__ = ["Blocks", "EvalShare", "Replicated", "TableLayout", "auto_batch_size", "auto_strata", "build", "choose",
           "deal_rows",
           "init_rows", "movie_block", "stratum_balance", "train_counts"]

log = logging.getLogger("mfscale")

# The auto batch: ~AUTO_STEPS_PER_EPOCH steps per epoch, or ~AUTO_STEPS_LARGE from AUTO_LARGE_TRAIN training
# ratings, global batch AUTO_GLOBAL_MIN..AUTO_GLOBAL_MAX. Half the steps (a 2x batch, each table's lr scaled to
# keep its rows' movement per epoch, optim.batch_lr_scales) ran the step 1.12-1.14x faster on the CPU and cost no
# test RMSE on the ml-32m and ml-25m presets, but 0.0003 on ml-10m and 0.0006-0.0010 on ml-1m, beyond their seed
# spreads (benchmarks/RESULTS.md, session 17): the larger batch is the default only on large data.
AUTO_STEPS_PER_EPOCH, AUTO_STEPS_LARGE, AUTO_LARGE_TRAIN = 200, 100, 20_000_000
AUTO_GLOBAL_MIN, AUTO_GLOBAL_MAX, AUTO_RANK_MIN = 1024, 262_144, 256


def auto_steps(n_train: int, steps: int = 0) -> int:
    """Steps per epoch the auto batch aims at: ``steps`` (--train.auto_steps), or the default for the data size."""
    return steps or (AUTO_STEPS_LARGE if n_train >= AUTO_LARGE_TRAIN else AUTO_STEPS_PER_EPOCH)


def auto_global_batch(n_train: int, steps: int) -> int:
    """All ranks' batch together for about ``steps`` steps per epoch (whole Ki, AUTO_GLOBAL_MIN..MAX)."""
    return min(AUTO_GLOBAL_MAX, max(AUTO_GLOBAL_MIN, n_train // steps // 1024 * 1024))


def auto_batch_size(n_train: int, world_size: int, steps: int = 0) -> int:
    """Per-rank batch of the auto rule (``steps``: --train.auto_steps, 0 = by the data size).

    The global batch (all ranks together) depends only on the data size, so a job gets the same number
    of updates, and so the same quality, whatever the number of processes it runs on.
    """
    return max(AUTO_RANK_MIN, auto_global_batch(n_train, auto_steps(n_train, steps)) // world_size)


def auto_lr_scales(cfg: JobConfig, data: Dataset, n_train: int, global_batch: int) -> tuple[float, float] | None:
    """Per table, the factor on --optim.lr at the auto batch: --optim.lr is the step size at AUTO_STEPS_PER_EPOCH
    steps per epoch, and a larger auto batch (fewer steps) scales each table's so its rows move as far per epoch
    (optim.batch_lr_scales). None (lr as given) for an explicit --train.batch_size and for sgd, whose per-rating
    steps do not depend on the batch."""
    if cfg.train.batch_size or cfg.optim.optimizer == "sgd":
        return None
    ref = auto_global_batch(n_train, AUTO_STEPS_PER_EPOCH)
    if global_batch == ref:
        return None
    return optim.batch_lr_scales(train_counts(data), global_batch, ref)


def choose(requested: str, world_size: int) -> str:
    """``auto``: blocks on more than one rank (no per-step row exchange; measured in benchmarks/RESULTS.md),
    replicated on one (the two are the same there, and replicated keeps the streamed input path)."""
    if requested != "auto":
        return requested
    return "blocks" if world_size > 1 else "replicated"


def build(cfg: JobConfig, env: DistEnv, data: Dataset) -> TableLayout:
    """This rank's layout of the tables for the job: its rows, their optimizer and its training batches."""
    n_train = data.split_rows("train")
    if n_train == 0:
        raise DataError(f"{cfg.data.path}: the training split is empty")
    # Shard sizes and row counts against the manifest before any rank reads (--data.verify on: sha256 too);
    # the layouts that read whole files hash them as they read (Dataset.reading).
    data.verify(("train",), whole=False)
    batch_size = cfg.train.batch_size or auto_batch_size(n_train, env.world_size, cfg.train.auto_steps)
    lr_scales = auto_lr_scales(cfg, data, n_train, batch_size * env.world_size)
    if lr_scales is not None:
        log.info("auto batch %d x %d ranks: --optim.lr x %.3f for the user rows, x %.3f for the movie rows "
                 "(the step sizes of %d steps per epoch)", batch_size, env.world_size, *lr_scales,
                 AUTO_STEPS_PER_EPOCH)
    if choose(cfg.train.tables, env.world_size) == "replicated":
        built: TableLayout = Replicated(cfg, env, data, batch_size, lr_scales)
    else:
        if cfg.data.workers and cfg.train.tables == "blocks":
            raise ConfigError("--train.tables blocks holds each rank's ratings in memory (no DataLoader "
                              "workers); use --workers 0")
        if cfg.data.workers:
            log.warning("--workers %d ignored: blocks tables hold each rank's ratings in memory", cfg.data.workers)
        if cfg.train.strata != 1:
            raise ConfigError("--train.strata applies to the replicated layout (blocks tables train strata of "
                              "their own); use --train.tables replicated or --train.strata 1")
        built = Blocks(cfg, env, data, batch_size, lr_scales)
    # Evaluation reads the validation and test splits whole (sha256 too): hash them while the rest of start-up
    # and the first epoch go on, so the first evaluation only collects the verdict.
    data.hash_in_background(("val", "test"))
    return built

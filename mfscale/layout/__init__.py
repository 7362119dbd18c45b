"""How the embedding tables are laid out across ranks, exchanged and updated: one interface, two layouts.

The training loop, evaluation and checkpointing talk to a :class:`TableLayout` (``base.py``); they never ask
which one. :func:`build` picks and builds it from the config:

- :class:`Replicated` (``replicated.py``): every rank holds both whole tables; gradient rows all-gathered.
- :class:`Blocks` (``blocks.py``): stratified blocks (DSGD), 1/W of each table per rank, no per-step exchange.

``rows.py`` deals rows to blocks and draws their initial values, the same for every layout and world size.
"""

from __future__ import annotations

import logging

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

AUTO_STEPS_PER_EPOCH = 200
AUTO_GLOBAL_MIN, AUTO_GLOBAL_MAX, AUTO_RANK_MIN = 1024, 262_144, 256


def auto_batch_size(n_train: int, world_size: int) -> int:
    """Per-rank batch for about AUTO_STEPS_PER_EPOCH steps per epoch.

    The global batch (all ranks together) depends only on the data size, so a job gets the same number
    of updates, and so the same quality, whatever the number of processes it runs on.
    """
    global_batch = min(AUTO_GLOBAL_MAX, max(AUTO_GLOBAL_MIN, n_train // AUTO_STEPS_PER_EPOCH // 1024 * 1024))
    return max(AUTO_RANK_MIN, global_batch // world_size)


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
    batch_size = cfg.train.batch_size or auto_batch_size(n_train, env.world_size)
    if choose(cfg.train.tables, env.world_size) == "replicated":
        built: TableLayout = Replicated(cfg, env, data, batch_size)
    else:
        if cfg.data.workers and cfg.train.tables == "blocks":
            raise ConfigError("--train.tables blocks holds each rank's ratings in memory (no DataLoader "
                              "workers); use --workers 0")
        if cfg.data.workers:
            log.warning("--workers %d ignored: blocks tables hold each rank's ratings in memory", cfg.data.workers)
        if cfg.train.strata != 1:
            raise ConfigError("--train.strata applies to the replicated layout (blocks tables train strata of "
                              "their own); use --train.tables replicated or --train.strata 1")
        built = Blocks(cfg, env, data, batch_size)
    # Evaluation reads the validation and test splits whole (sha256 too): hash them while the rest of start-up
    # and the first epoch go on, so the first evaluation only collects the verdict.
    data.hash_in_background(("val", "test"))
    return built

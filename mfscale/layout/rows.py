"""Which rank holds which rows: initial rows by global id, training counts, dealing rows into balanced blocks.

Rows are dealt to blocks by rating count (most-rated first, in a snake order 0..W-1, W-1..0, ...), which
balances both the rows and the ratings per block; inside a block rows keep ascending global id order, so
with W = 1 local ids are global ids. Initial rows come from :func:`init_rows`, keyed by (seed, table, chunk of
rows), so every layout and every world size starts from the same tables without any rank materializing a
whole table.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch

from ..shards import Dataset, deal_rows  # noqa: F401  (deal_rows: this module's public name too)

INIT_CHUNK_ROWS = 1 << 16


def init_rows(ids: np.ndarray, dim: int, std: float, seed: int, table: int, dtype: torch.dtype | None = None
              ) -> torch.Tensor:
    """Initial rows ``[factors ~ N(0, std), bias 0]`` of the given global row ids of one table.

    Drawn chunk by chunk (``INIT_CHUNK_ROWS`` rows per chunk, a generator per (seed, table, chunk)), so a rank
    that owns scattered rows gets exactly the values a single process would, while holding one chunk at a time.
    """
    dtype = dtype or torch.get_default_dtype()
    out = torch.zeros((len(ids), dim + 1), dtype=dtype)
    if len(ids) == 0:
        return out
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    chunks = sorted_ids // INIT_CHUNK_ROWS
    bounds = np.flatnonzero(np.diff(chunks)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(ids)], strict=True):
        c = int(chunks[lo])
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, table, c]).generate_state(1)[0]))
        block = torch.randn((INIT_CHUNK_ROWS, dim), generator=g, dtype=dtype).mul_(std)
        out[torch.from_numpy(order[lo:hi]), :dim] = block[torch.from_numpy(sorted_ids[lo:hi] - c * INIT_CHUNK_ROWS)]
    return out


def train_counts(data: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Training ratings per user row and per movie row (from users.parquet / movies.parquet)."""
    out = []
    # pyarrow, not polars: polars' thread pool deadlocks in a rank forked from a process that used it
    for file, key in (("users.parquet", "user_idx"), ("movies.parquet", "item_idx")):
        table = pq.read_table(data.root / file, columns=[key, "n_train"])
        counts = np.zeros(len(table), dtype=np.int64)
        counts[table.column(key).to_numpy()] = table.column("n_train").to_numpy()
        out.append(counts)
    return out[0], out[1]


def deal_users(data: Dataset, counts: np.ndarray, world: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Block (rank) of every user, and of every user bucket (None: not by buckets).

    Whole user buckets (prepare writes the training split bucket by bucket) are dealt to ranks by their training
    ratings in snake order, so a rank decodes only its buckets' row groups, about 1/W of the split. A dataset
    prepared without buckets, or more ranks than buckets: users are dealt one by one (``deal_rows``), and every
    rank decodes the whole split to find its users.
    """
    buckets = data.buckets
    if buckets is None or int(buckets["n"]) < world:
        return deal_rows(counts, world), None
    table = pq.read_table(data.root / "users.parquet", columns=["user_idx", "bucket"])
    bucket = np.zeros(len(table), dtype=np.int64)
    bucket[table.column("user_idx").to_numpy()] = table.column("bucket").to_numpy()
    rank_of = deal_rows(np.asarray(buckets["rows"], dtype=np.int64), world)
    return rank_of[bucket], rank_of


def deal_pieces(counts: np.ndarray, world: int, pieces: int) -> tuple[np.ndarray, np.ndarray]:
    """Block (0..world-1) and piece (0..pieces-1) of every row: rows dealt into ``world * pieces`` groups by
    :func:`deal_rows`; group g belongs to block ``snake(g mod 2 world)`` (snake(x) = x below ``world``, else
    ``2 world - 1 - x``), and a block's pieces are its groups in ascending order.

    That block is exactly ``deal_rows(counts, world)``'s block of each row, whatever ``pieces``: a lap of the
    fine deal covers whole laps of the coarse one, so the same row falls in the same place of the snake. A block
    therefore holds the same rows for any number of pieces (checkpoint parts by block stay valid across it)."""
    group = deal_rows(counts, world * pieces)
    g = np.arange(world * pieces)
    x = g % (2 * world)
    block_of = np.where(x < world, x, 2 * world - 1 - x)
    piece_of = np.empty_like(g)
    for b in range(world):
        mine = np.flatnonzero(block_of == b)  # ascending, exactly `pieces` of them
        piece_of[mine] = np.arange(len(mine))
    return block_of[group], piece_of[group]


def movie_block(rank: int | np.ndarray, sub_epoch: int, world: int) -> int | np.ndarray:
    """The movie block rank ``rank`` holds in sub-epoch ``sub_epoch`` of the blocks layout (DSGD's rotation)."""
    return (rank + sub_epoch) % world


def stratum_balance(strata: np.ndarray) -> dict[str, float]:
    """Of a W x W matrix of stratum sizes (ratings of user block r x movie block b): the largest stratum over
    the mean (1.0 = perfect), and the ratings the equal step count of each sub-epoch pays for (W x its
    largest stratum) over the ratings trained."""
    w = strata.shape[0]
    per_sub = [max(strata[q, movie_block(q, s, w)] for q in range(w)) for s in range(w)]
    return {"max_over_mean": float(strata.max() / max(strata.mean(), 1e-12)),
            "padded_over_actual": float(w * sum(per_sub) / max(strata.sum(), 1))}


def local_index(block: np.ndarray, world: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per row its index inside its block (ascending global id), and per block its global row ids."""
    members = [np.flatnonzero(block == b) for b in range(world)]
    local = np.empty(len(block), dtype=np.int64)
    for m in members:
        local[m] = np.arange(len(m))
    return local, members


# A stratum's share of both tables with their optimizer state (Adam: two moments per row), at most: on the 2-core
# EPYC (32 MiB L3, 2 MiB L2 per core) ml-10m's 63 MB of tables trained 1.38x faster per step in 4 x 4 strata, 1.65x
# in 8 x 8 and 1.69x in 16 x 16 than in one global shuffle (benchmarks/RESULTS.md). A fixed size, not this machine's
# cache: a job resumed elsewhere keeps its batches.
STRATUM_TABLE_BYTES = 8 << 20
MIN_STRATUM_BATCHES = 2  # global batches per stratum at least: fewer, and most batches straddle two strata


def auto_strata(n_users: int, n_items: int, dim: int, n_train: int, global_batch: int,
                row_floats: int | None = None) -> int:
    """k for k x k strata: the smallest power of two at which a stratum's share of the tables (a row with its
    optimizer state: ``row_floats`` floats, default Adam's 3 (dim + 1)) fits STRATUM_TABLE_BYTES, as long as a
    stratum still holds MIN_STRATUM_BATCHES global batches.
    Tables that fit already (ml-1m, ml-latest-small) get 1: one global shuffle.

    Not the default: in strata each row is touched in fewer, larger steps per epoch (on ml-10m at k = 8, a
    user in ~24 steps instead of ~80), and Adam moves a row about ``lr`` per touch whatever its gradient's
    size, so rows train less per epoch: test RMSE 0.7652 against 0.7504 on ml-10m (RESULTS, issue 22)."""
    table_bytes = (n_users + n_items) * (row_floats or 3 * (dim + 1)) * 4
    k = 1
    while table_bytes / k > STRATUM_TABLE_BYTES and n_train / (2 * k) ** 2 >= MIN_STRATUM_BATCHES * global_batch:
        k *= 2
    return k

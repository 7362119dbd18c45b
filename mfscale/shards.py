"""The on-disk dataset: Parquet shards of encoded ratings plus ``manifest.json``.

Layout of a prepared directory::

    manifest.json          format version, source, counts, rating stats, split spec, shard list
    users.parquet          user_idx <-> user_id (original), rating counts
    movies.parquet         item_idx <-> movie_id (original), counts, title, year, genres
    train/part-00000.parquet ...   int32 user, int32 item, float32 rating, int32 timestamp
    val/...  test/...

Shards are uncompressed with plain encoding so a memory-mapped read is close to a copy. Validation and test
shards are row groups of up to ``ROW_GROUP_ROWS`` rows; the training split is written in stripes of that many
rows, each stripe one row group per user bucket (``write_split``): the stripes are the unit the stream deals to
ranks and workers (``Dataset.stripes``), the buckets what a blocks rank reads of them (``Dataset.row_groups``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigError, DataError, disk_full, is_disk_full, one_line

log = logging.getLogger("mfscale")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
ROW_GROUP_ROWS = 1 << 18  # 256Ki ratings = 4 MiB: enough groups to deal evenly, big enough to stream fast
SHARD_ROWS = 1 << 22  # 16 row groups per file
MIN_GROUPS, MIN_GROUP_ROWS = 64, 1024
# User buckets of the training split (``write_split``): a blocks rank on W <= buckets ranks reads only its
# buckets' row groups, about 1/W of the split. 240 = 2^4 x 3 x 5: W = 2, 3, 4, 5, 6, 8, 10, 12, 15, 16, 20, 24
# get equal shares, other W at most one bucket more than the mean (7 ranks: 1.03x; 32: 1.07x). With 120, 16
# ranks (two 8-GPU nodes) padded every sub-epoch by 7% (benchmarks/scaling_model.py). Fewer on small data: a
# row group per (stripe, bucket) of at least MIN_BUCKET_ROWS ratings on average.
MAX_BUCKETS, MIN_BUCKET_ROWS = 240, 64
SHARD_SCHEMA = pa.schema(
    [("user", pa.int32()), ("item", pa.int32()), ("rating", pa.float32()), ("timestamp", pa.int32())]
)
# The columns training reads (not the timestamp), and their bytes per rating: what decoded_bytes counts.
TRAIN_COLUMNS = ("user", "item", "rating")
TRAIN_ROW_BYTES = sum(SHARD_SCHEMA.field(c).type.byte_width for c in TRAIN_COLUMNS)
VERIFY_MODES = ("auto", "on", "off")
# In a dataset directory: the shards whose sha256 matched the manifest, each with the stat it had when hashed
# (see Dataset.verify). Only a cache: losing it costs one more hash of each shard.
VERIFIED = ".verified.json"
# A verdict is recorded only for a file last changed this long before its hash: file times come from a coarse
# clock (a kernel tick), so a write in the same tick as the last one could leave ctime unchanged (git's "racily
# clean" entries). Such a file is simply hashed again next time.
RACY_S = 1.0
HASH_BLOCK = 8 << 20  # bytes per read when hashing (hashlib releases the GIL on blocks this large)
# Errors pyarrow raises on a damaged file: ArrowInvalid ("Parquet magic bytes not found in footer", "Couldn't
# deserialize thrift"), ArrowIOError (an OSError), ...
READ_ERRORS = (pa.ArrowException, OSError)

DAY_SECONDS = 86_400  # a day of the timestamps (UTC): the time-aware biases' unit (daybias, timebias)


def days_of(timestamp: np.ndarray) -> np.ndarray:
    """Days since 1970 (UTC) of unix timestamps, int32."""
    return (np.asarray(timestamp, dtype=np.int64) // DAY_SECONDS).astype(np.int32)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in ``HASH_BLOCK`` blocks into one reused buffer."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    buf = bytearray(HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def rebuild_hint(root: Path) -> str:
    return f"re-run python -m mfscale.prepare to rebuild {root}"


def damaged(path: Path, detail: str, root: Path | None = None) -> DataError:
    """The one line for a shard that does not match its manifest entry or cannot be read."""
    root = path.parent.parent if root is None else root  # shards live in ROOT/SPLIT/
    return DataError(f"{path} is damaged ({detail}); {rebuild_hint(root)}")


def group_rows(n: int, row_group_rows: int = ROW_GROUP_ROWS) -> int:
    """Rows per row group (per stripe in a bucketed split) of an ``n``-row split: small splits still get
    >= MIN_GROUPS of them, so ranks x workers can each be dealt some."""
    return max(MIN_GROUP_ROWS, min(row_group_rows, -(-n // MIN_GROUPS)))


def deal_rows(counts: np.ndarray, world: int) -> np.ndarray:
    """Block (0..world-1) of every row: rows sorted by count, most first, dealt in snake order, which balances
    both the rows and their counts per block (users into buckets here, rows into ranks' blocks in layout)."""
    order = np.argsort(-np.asarray(counts, dtype=np.int64), kind="stable")
    k = np.arange(len(order))
    pos, lap = k % world, k // world
    block = np.empty(len(order), dtype=np.int64)
    block[order] = np.where(lap % 2 == 0, pos, world - 1 - pos)
    return block


def auto_buckets(n_rows: int, n_users: int) -> int:
    """User buckets of a training split: ``MAX_BUCKETS``, fewer where a (stripe, bucket) row group would hold
    under ``MIN_BUCKET_ROWS`` ratings on average, and never more than there are users."""
    stripes = -(-max(n_rows, 1) // group_rows(n_rows))
    return int(max(1, min(MAX_BUCKETS, n_users, n_rows // (stripes * MIN_BUCKET_ROWS))))


def write_split(
    directory: Path,
    user: np.ndarray,
    item: np.ndarray,
    rating: np.ndarray,
    timestamp: np.ndarray,
    *,
    shard_rows: int = SHARD_ROWS,
    row_group_rows: int = ROW_GROUP_ROWS,
    bucket: np.ndarray | None = None,
) -> list[dict]:
    """Write one split as Parquet shards; return their manifest entries.

    ``bucket`` (the user bucket of every row; the training split): the rows are cut into stripes of
    ``group_rows`` consecutive rows, and inside a stripe each bucket's rows, in their order, are one row group.
    A process that needs only some users' ratings (a blocks rank) then decodes only their buckets' row groups,
    while a stripe, read whole and put in its fixed random order (``stripe_order``), is the random sample of the
    split that the stream deals (``Dataset.stripes``). Entries then list each row group's bucket and stripe.
    """
    directory.mkdir(parents=True, exist_ok=True)
    n = len(user)
    row_group_rows = group_rows(n, row_group_rows)
    if bucket is not None:  # whole stripes per file
        shard_rows = max(1, shard_rows // row_group_rows) * row_group_rows
    entries = []
    for k, start in enumerate(range(0, max(n, 1), shard_rows)):
        stop = min(start + shard_rows, n)
        path = directory / f"part-{k:05d}.parquet"
        entry: dict = {"file": f"{directory.name}/{path.name}", "rows": stop - start}

        def table(idx: slice | np.ndarray) -> pa.Table:
            return pa.table([pa.array(user[idx].astype(np.int32, copy=False)),
                             pa.array(item[idx].astype(np.int32, copy=False)),
                             pa.array(rating[idx].astype(np.float32, copy=False)),
                             pa.array(timestamp[idx].astype(np.int32, copy=False))], schema=SHARD_SCHEMA)

        if bucket is None:
            pq.write_table(table(slice(start, stop)), path, row_group_size=row_group_rows, compression="none",
                           use_dictionary=False, write_statistics=False)
        else:
            buckets, stripes = [], []
            with pq.ParquetWriter(path, SHARD_SCHEMA, compression="none", use_dictionary=False,
                                  write_statistics=False) as writer:
                for lo in range(start, max(stop, start + 1), row_group_rows):
                    hi = min(lo + row_group_rows, stop)
                    order = lo + np.argsort(bucket[lo:hi], kind="stable")
                    b = bucket[order]
                    cuts = np.flatnonzero(np.diff(b)) + 1
                    for a, e in zip(np.r_[0, cuts], np.r_[cuts, len(order)], strict=True):
                        if e > a:
                            writer.write_table(table(order[a:e]), row_group_size=int(e - a))
                            buckets.append(int(b[a]))
                            stripes.append(lo // row_group_rows)
                if stop == start:
                    writer.write_table(table(slice(0, 0)))
            entry.update(row_group_buckets=buckets, row_group_stripes=stripes)
        entry.update(row_groups=pq.ParquetFile(path).num_row_groups, bytes=path.stat().st_size,
                     sha256=file_digest(path))
        entries.append(entry)
    return entries


def stripe_order(seed: int, stripe: int, rows: int) -> np.ndarray:
    """The fixed random order of a stripe's rows (its row groups hold them bucket by bucket): a seeded
    permutation, so a contiguous run of a stripe, as the stream cuts batches, is a random sample of the split."""
    return np.random.default_rng([seed, 0x57121BE, stripe]).permutation(rows)


@dataclass(frozen=True)
class RowGroup:
    """A row group of one shard file; in a bucketed training split also its user bucket and stripe (else -1)."""

    path: Path
    index: int
    rows: int
    bucket: int = -1
    stripe: int = -1


@dataclass(frozen=True)
class Stripe:
    """One unit of streaming work: row groups of one file read together, in a fixed random order (``seed``:
    ``stripe_order``'s; None: as stored, a row group of a split written unbucketed, whose rows prepare shuffled)."""

    path: Path
    indices: tuple[int, ...]
    rows: int
    index: int
    seed: int | None = None


class Dataset:
    """A prepared dataset directory: manifest plus shard access.

    ``verify`` (``--data.verify``) is how much the shards are checked against the manifest; see ``verify()``.
    Checks that passed are remembered, so each file is checked and hashed at most once per Dataset.

    ``hash_share`` ``(i, n)``: this process is the i-th of n on its host that read the same files (torchrun's
    LOCAL_RANK and LOCAL_WORLD_SIZE), and it hashes only its share of them (by bytes, the same split on each
    of the n); the others hash the rest, so a host hashes each file once. A rank that finds a damaged shard
    exits with its line, and its peers with theirs at their next collective, before any checkpoint is written.
    """

    def __init__(self, root: Path | str, verify: str = "auto", hash_share: tuple[int, int] = (0, 1)):
        if verify not in VERIFY_MODES:
            raise ConfigError(f"data.verify must be auto, on or off, got {verify!r}")
        self.verify_mode = verify
        self.hash_share = hash_share
        self._checked: set[str] = set()  # shard files whose size, row count and row groups matched
        self._hashed: set[str] = set()  # shard files whose sha256 matched
        self._hashing: dict[str, Future] = {}  # shard file -> (its stat, its sha256), hashed in the background
        self._pool: ThreadPoolExecutor | None = None
        self._verdicts: dict[str, dict] | None = None  # VERIFIED, read once
        self.root = Path(root)
        path = self.root / MANIFEST
        if not self.root.is_dir():
            raise DataError(f"data directory not found: {self.root} (run python -m mfscale.prepare first)")
        if not path.is_file():
            raise DataError(f"{self.root} is not a prepared dataset: {MANIFEST} is missing")
        try:
            self.manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: unreadable manifest: {exc}") from None
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(
                f"{path}: format version {version} is not supported (expected {FORMAT_VERSION}); "
                "re-run python -m mfscale.prepare"
            )
        for split in SPLITS:
            for entry in self.manifest["shards"].get(split, []):
                if not (self.root / entry["file"]).is_file():
                    raise DataError(f"{self.root / entry['file']} is missing (the manifest lists it); "
                                    f"{rebuild_hint(self.root)}")

    @property
    def n_users(self) -> int:
        return int(self.manifest["counts"]["users"])

    @property
    def n_items(self) -> int:
        return int(self.manifest["counts"]["items"])

    @property
    def rating_range(self) -> tuple[float, float]:
        lo, hi = self.manifest["rating"]["scale"]
        return float(lo), float(hi)

    @property
    def fingerprint(self) -> str:
        """Identifies the data a model was trained on (checked when resuming a checkpoint)."""
        h = hashlib.sha256()
        for split in SPLITS:
            for entry in self.manifest["shards"].get(split, []):
                h.update(entry["sha256"].encode())
        return h.hexdigest()[:16]

    def split_rows(self, split: str) -> int:
        return int(sum(e["rows"] for e in self.manifest["shards"].get(split, [])))

    @property
    def buckets(self) -> dict | None:
        """The training split's user buckets (``{"n", "rows", "seed"}``), or None (prepared before buckets)."""
        return self.manifest.get("buckets")

    def row_groups(self, split: str) -> list[RowGroup]:
        """The split's row groups, from the shards' footers; each shard's size, row count and row groups are
        checked against the manifest on the way (unless ``verify`` is off), so every training path, which
        starts here, gets those checks."""
        groups = []
        for entry in self.manifest["shards"].get(split, []):
            path = self.root / entry["file"]
            meta = self._footer(entry, check=self.verify_mode != "off")
            buckets = entry.get("row_group_buckets")
            stripes = entry.get("row_group_stripes")
            if buckets is not None and not (len(buckets) == len(stripes or ()) == meta.num_row_groups):
                raise damaged(path, f"the manifest lists buckets for {len(buckets)} row groups, the file has "
                              f"{meta.num_row_groups}", self.root)
            for i in range(meta.num_row_groups):
                rows = meta.row_group(i).num_rows
                if rows:
                    groups.append(RowGroup(path, i, rows, *((int(buckets[i]), int(stripes[i])) if buckets else ())))
        return groups

    def stripes(self, split: str) -> list[Stripe]:
        """The split's units of streaming: each stripe of a bucketed split (its row groups, one per bucket, read
        together and put in ``stripe_order``), else each row group."""
        seed = int(self.buckets["seed"]) if self.buckets else None
        out: list[Stripe] = []
        for g in self.row_groups(split):
            if g.stripe < 0:  # unbucketed: the row group is the stripe
                out.append(Stripe(g.path, (g.index,), g.rows, len(out)))
            elif not out or out[-1].path != g.path or out[-1].index != g.stripe:
                out.append(Stripe(g.path, (g.index,), g.rows, g.stripe, seed))
            else:
                last = out[-1]
                out[-1] = Stripe(last.path, (*last.indices, g.index), last.rows + g.rows, last.index, last.seed)
        return out

    def read_split(self, split: str, columns: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """A whole split as numpy arrays (validation/test sets, tests, in-memory fast paths); ``columns``: only
        these (default: all).

        The files are verified as ``verify(whole=True)`` does (their sha256 too, unless ``verify`` is off; once per
        Dataset), hashed while they are read (``reading``).
        """
        names = list(columns or SHARD_SCHEMA.names)
        files = [self.root / e["file"] for e in self.manifest["shards"].get(split, [])]
        if not files:
            return {name: np.empty(0, dtype=SHARD_SCHEMA.field(name).type.to_pandas_dtype()) for name in names}
        tables = []
        with self.reading((split,)):
            for f in files:
                try:
                    tables.append(pq.read_table(f, columns=names, memory_map=True))
                except READ_ERRORS as exc:
                    raise damaged(f, f"cannot read it: {one_line(exc)}", self.root) from None
        table = pa.concat_tables(tables)
        return {name: table.column(name).to_numpy() for name in names}

    # -- integrity ---------------------------------------------------------------------------------
    def verify(self, splits: Iterable[str] = ("train",), mode: str | None = None, *, whole: bool = True,
               all_shares: bool = False) -> dict:
        """Check the shards of ``splits`` against the manifest; raise DataError naming the first damaged one.

        ``mode`` (default: the Dataset's ``verify``, i.e. ``--data.verify``):

        - ``off``: no checks.
        - ``auto``: every shard's byte size (a stat) and its Parquet footer's row count, row groups and columns
          (a footer read); plus the sha256 of every shard when ``whole`` says this process reads the files
          whole anyway (a resident training split, the blocks layout, validation/test sets), so the hash costs
          CPU time only: the data is in the page cache right before or after.
        - ``on``: all of that and the sha256 of every shard, whatever ``whole`` says.

        A hash costs ~0.1 s per 150 MB (ml-10m: 12% of an epoch on 2 cores), so ``auto`` hashes a file once per
        version of it: a shard whose sha256 matched is recorded in ``VERIFIED`` with its inode, size, mtime and
        ctime, and is not hashed again while those are unchanged. Any write to a file (a truncation, a flipped
        byte, a copy over it) changes its ctime, which no user call can set back; git's index and rsync trust
        the same stat fields. Damage below the file system (a failing disk) keeps them: ``on`` hashes every
        time, whatever ``VERIFIED`` says. An unwritable dataset directory only means hashing every time.

        A manifest written before mfscale recorded shard sizes (or without sha256s) skips that check, logged once.
        ``all_shares``: hash every file, not only this process's ``hash_share`` (a read that failed: the damage
        may be in a file a sibling process hashes).

        Files already checked by this Dataset are not checked again, so calling this at start-up and reading
        later costs one check. Returns what was done: ``{"mode", "files", "bytes", "hashed", "cached",
        "seconds"}`` (``cached``: shards ``VERIFIED`` vouched for, unhashed).

        The job calls it at start-up, before any rank reads training data (``mfscale.layout.build``);
        ``row_groups`` (every training path) and the whole-file readers (``read_split``, the resident stream)
        also check what they read, so a damaged shard is one line even where this is not called.
        """
        mode = self.verify_mode if mode is None else mode
        if mode not in VERIFY_MODES:
            raise ConfigError(f"data.verify must be auto, on or off, got {mode!r}")
        t0 = time.perf_counter()
        done = {"mode": mode, "files": 0, "bytes": 0, "hashed": 0, "cached": 0, "seconds": 0.0}
        if mode == "off":
            return done
        entries = [e for s in splits for e in self.manifest["shards"].get(s, [])]
        for entry in entries:
            if entry["file"] not in self._checked:
                self._footer(entry, check=True)
            done["files"] += 1
        if mode == "on" or whole:
            todo = [e for e in (entries if all_shares else self._my_share(entries)) if e["file"] not in self._hashed]
            if any("sha256" not in e for e in todo):
                self._note_missing("sha256")
            todo = [e for e in todo if "sha256" in e]
            if mode == "auto":
                for entry in [e for e in todo if self._still_verified(e)]:
                    todo.remove(entry)
                    self._hashed.add(entry["file"])
                    done["cached"] += 1
            self._start_hashing(todo)
            verified = {}
            for entry in todo:  # in manifest order: the first damaged shard is the one named
                stat, digest = self._digest(entry)
                if digest != entry["sha256"]:
                    raise damaged(self.root / entry["file"], f"sha256 {digest[:16]}..., the manifest says "
                                  f"{entry['sha256'][:16]}...", self.root)
                self._hashed.add(entry["file"])
                if stat[3] < stat[4] - int(RACY_S * 1e9):
                    verified[entry["file"]] = {"sha256": digest, "stat": stat[:4]}
                done["hashed"] += 1
                done["bytes"] += stat[1]
            self._record_verified(verified)
        done["seconds"] = time.perf_counter() - t0
        return done

    def hash_in_background(self, splits: Iterable[str]) -> None:
        """Start hashing this process's share of the shards of ``splits`` in background threads (hashlib
        releases the GIL), for files that will be read whole: start-up and the read itself go on meanwhile,
        and ``verify(whole=True)`` then only waits for the results. A no-op with ``--data.verify off``."""
        if self.verify_mode == "off":
            return
        entries = [e for s in splits for e in self.manifest["shards"].get(s, [])]
        self._start_hashing([e for e in self._my_share(entries) if "sha256" in e and e["file"] not in self._hashed
                             and not (self.verify_mode == "auto" and self._still_verified(e))])

    @contextlib.contextmanager
    def reading(self, splits: Iterable[str]) -> Iterator[None]:
        """Read ``splits`` whole inside this block: their shards are hashed meanwhile and verified at its end
        (as ``verify(whole=True)``). If the read fails, a damaged shard is the error reported (its one line,
        not what its bad bytes broke on the way)."""
        splits = tuple(splits)
        self.hash_in_background(splits)
        self.verify(splits, whole=False)  # sizes and footers before the read: a truncated file is named first
        try:
            yield
        except Exception:
            try:
                self.verify(splits, whole=True, all_shares=True)
            except DataError as damage:
                raise damage from None
            raise
        self.verify(splits, whole=True)

    def _my_share(self, entries: list[dict]) -> list[dict]:
        """The entries this process hashes: the largest files first, each to the least loaded of the
        ``hash_share`` processes (every process computes the same assignment from the manifest)."""
        i, n = self.hash_share
        if n <= 1:
            return entries
        load = [0] * n
        mine = set()
        for entry in sorted(entries, key=lambda e: (-e.get("bytes", e["rows"]), e["file"])):
            k = load.index(min(load))
            load[k] += entry.get("bytes", entry["rows"])
            if k == i:
                mine.add(entry["file"])
        return [e for e in entries if e["file"] in mine]

    def _start_hashing(self, entries: list[dict]) -> None:
        todo = [e for e in entries if e["file"] not in self._hashing]
        if not todo:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(_hash_threads(self.hash_share[1]), thread_name_prefix="mfscale-sha256")
        for entry in sorted(todo, key=lambda e: -e.get("bytes", 0)):  # the largest first: they finish last
            self._hashing[entry["file"]] = self._pool.submit(_stat_and_digest, self.root / entry["file"])

    def _digest(self, entry: dict) -> tuple[list[int], str]:
        """One shard's stat before hashing (``_stat_and_digest``) and its sha256, from the background (started
        if it was not); an unreadable file is its one line."""
        self._start_hashing([entry])
        try:
            return self._hashing.pop(entry["file"]).result()
        except OSError as exc:
            raise damaged(self.root / entry["file"], f"cannot read it: {exc.strerror or exc}", self.root) from None

    def _still_verified(self, entry: dict) -> bool:
        """Whether ``VERIFIED`` holds this shard's manifest sha256 with the stat the file has now."""
        if self._verdicts is None:
            try:
                self._verdicts = json.loads((self.root / VERIFIED).read_text())
            except (OSError, ValueError):
                self._verdicts = {}
            if not isinstance(self._verdicts, dict):
                self._verdicts = {}
        known = self._verdicts.get(entry["file"])
        try:
            stat = _identity(self.root / entry["file"])
        except OSError:
            return False
        return isinstance(known, dict) and known.get("sha256") == entry["sha256"] and known.get("stat") == stat

    def _record_verified(self, verified: dict[str, dict]) -> None:
        """Add shards just hashed to ``VERIFIED`` (merged under a lock: the processes of a host each hash a
        share); best effort: a read-only or full directory only means hashing again next time."""
        if not verified:
            return
        try:
            fd = os.open(self.root, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    current = json.loads((self.root / VERIFIED).read_text())
                except (OSError, ValueError):
                    current = {}
                current = {**(current if isinstance(current, dict) else {}), **verified}
                write_json_atomic(self.root / VERIFIED, current)
                self._verdicts = current
            finally:
                os.close(fd)  # releases the lock
        except (OSError, DataError) as exc:
            log.debug("%s: cannot record verified shards (%s); they are hashed again next time", self.root, exc)

    def _footer(self, entry: dict, check: bool) -> pq.FileMetaData:
        """A shard's Parquet footer; with ``check``, its size and contents against its manifest entry."""
        path = self.root / entry["file"]
        if check and entry["file"] not in self._checked:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise DataError(f"{path} is missing (the manifest lists it); {rebuild_hint(self.root)}") from None
            except OSError as exc:
                raise damaged(path, f"cannot read it: {exc.strerror or exc}", self.root) from None
            if "bytes" not in entry:
                self._note_missing("byte size")
            elif size != entry["bytes"]:
                raise damaged(path, f"size {size:,} bytes, the manifest says {entry['bytes']:,}", self.root)
        try:
            meta = pq.ParquetFile(path, memory_map=True).metadata
        except READ_ERRORS as exc:
            raise damaged(path, f"not a readable Parquet file: {one_line(exc)}", self.root) from None
        if check and entry["file"] not in self._checked:
            if (meta.num_rows, meta.num_row_groups) != (entry["rows"], entry["row_groups"]):
                raise damaged(path, f"{meta.num_rows:,} rows in {meta.num_row_groups} row groups, the manifest "
                              f"says {entry['rows']:,} in {entry['row_groups']}", self.root)
            try:
                schema = meta.schema.to_arrow_schema()
            except READ_ERRORS as exc:
                raise damaged(path, f"unreadable schema: {one_line(exc)}", self.root) from None
            if schema.names != SHARD_SCHEMA.names or schema.types != SHARD_SCHEMA.types:
                raise damaged(path, f"columns {', '.join(f'{f.name} {f.type}' for f in schema)}, expected "
                              f"{', '.join(f'{f.name} {f.type}' for f in SHARD_SCHEMA)}", self.root)
            self._checked.add(entry["file"])
        return meta

    def _note_missing(self, what: str) -> None:
        key = (str(self.root.resolve()), what)
        if key not in _NOTED:
            _NOTED.add(key)
            log.info("%s: the manifest records no %s for some shards (prepared by an older mfscale); that check "
                     "is skipped (re-run python -m mfscale.prepare to get it)", self.root, what)


_NOTED: set[tuple[str, str]] = set()  # (dataset, check) pairs already logged as skipped


def record_written(root: Path, manifest: dict) -> None:
    """Record the shards a writer just hashed (``write_split``) as verified, in the dataset's staging
    directory: no other process knows these files yet, so no write can hide in the racy window (``RACY_S``),
    and the first job on a freshly prepared dataset need not hash it again. A copy has new inodes: the first
    job on it hashes."""
    write_json_atomic(root / VERIFIED, {e["file"]: {"sha256": e["sha256"], "stat": _identity(root / e["file"])}
                                        for entries in manifest["shards"].values() for e in entries})


def _identity(path: Path) -> list[int]:
    """The stat fields that change when a file's bytes do: inode, size, mtime and ctime (ns)."""
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _stat_and_digest(path: Path) -> tuple[list[int], str]:
    """``(inode, size, mtime, ctime, now)`` (ns), then the sha256. The stat is taken first: a file changed
    while it is hashed gets a newer ctime than the one recorded."""
    stat = [*_identity(path), time.time_ns()]
    return stat, file_digest(path)


def _hash_threads(local_processes: int) -> int:
    """Files hashed in parallel: this process's CPUs shared among the processes on this host."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, local_processes))


_OPEN: OrderedDict[tuple, pq.ParquetFile] = OrderedDict()
OPEN_FILES = 32


def _open_parquet(path: Path) -> pq.ParquetFile:
    """A shard opened once per process and version of the file: a bucketed training shard's footer lists
    thousands of row groups, and parsing it took 8 ms per open, as long as decoding a stripe (ml-10m)."""
    st = os.stat(path)
    key = (os.getpid(), str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    f = _OPEN.get(key)
    if f is None:
        f = _OPEN[key] = pq.ParquetFile(path, memory_map=True)
        if len(_OPEN) > OPEN_FILES:
            _OPEN.popitem(last=False)
    else:
        _OPEN.move_to_end(key)
    return f


def read_row_group(group: RowGroup) -> dict[str, np.ndarray]:
    """Read one row group through a memory map; a damaged shard is a DataError naming it."""
    return read_row_groups(group.path, [group.index])


def read_row_groups(path: Path, indices: list[int] | tuple[int, ...],
                    columns: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Read row groups of one file (one footer read) through a memory map, concatenated in the given order;
    a damaged shard is a DataError naming it."""
    names = list(columns or SHARD_SCHEMA.names)
    try:
        table = _open_parquet(path).read_row_groups(list(indices), columns=names)
    except READ_ERRORS as exc:
        which = (f"row group {indices[0]}" if len(indices) == 1 else
                 f"row groups {indices[0]}-{indices[-1]}" if list(indices) == list(range(indices[0], indices[-1] + 1))
                 else f"{len(indices)} row groups")
        raise damaged(path, f"cannot read {which}: {one_line(exc)}") from None
    return {name: table.column(name).to_numpy() for name in names}


def read_stripe(stripe: Stripe, columns: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """A stripe's rows in its fixed order (``Stripe``)."""
    arrays = read_row_groups(stripe.path, stripe.indices, columns)
    if stripe.seed is None:
        return arrays
    order = stripe_order(stripe.seed, stripe.index, stripe.rows)
    return {k: v[order] for k, v in arrays.items()}


def find_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``ids`` is in ``sorted_ids`` (ascending, unique): (position, found). A position where not found
    is a valid index (clamped), so ``sorted_ids[pos]`` never fails. Ids are encoded in sorted order (prepare), and
    the user-day keys are sorted: every "which row is this id" lookup is this one.

    torch.searchsorted runs on all cores: 3.4x numpy's on ml-10m's 8.5M day keys (0.56 s against 1.92 s).
    """
    import torch  # here: prepare and the other data tools import this module and need no torch otherwise

    ids = np.asarray(ids)
    if len(sorted_ids) == 0:
        return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
    # "W": a read-only array (Arrow's, a memory map) is copied; torch.from_numpy warns on those
    table, query = (torch.from_numpy(np.require(a, np.int64, ("C", "W"))) for a in (sorted_ids, ids))
    pos = torch.searchsorted(table, query)
    pos = pos.clamp_(max=len(sorted_ids) - 1).numpy()
    return pos, table.numpy()[pos] == ids


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 to a temporary file beside ``path``, flush it to disk, then rename: readers see the old or the new
    file, whole. On any failure the temporary file is removed and the old file stays; a full disk or quota is one
    line (errors.disk_full: the directory, the bytes this file needs, the bytes free)."""
    path = Path(path)
    data = text.encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # a full disk or quota can show only here (delayed allocation, NFS)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise disk_full(path.parent, len(data), f"writing {path.name}", exc=exc) from None
        raise


def write_json_atomic(path: Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def staging_dir(out: Path) -> Path:
    """An empty directory beside ``out`` to build it in, with ordinary permissions (mkdtemp makes 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def install_dir(tmp: Path, out: Path) -> None:
    """Rename a finished directory into place; an old one is removed only after the swap."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)

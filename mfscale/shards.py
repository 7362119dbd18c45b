"""The on-disk dataset: Parquet shards of encoded ratings plus ``manifest.json``.

Layout of a prepared directory::

    manifest.json          format version, source, counts, rating stats, split spec, shard list
    users.parquet          user_idx <-> user_id (original), rating counts
    movies.parquet         item_idx <-> movie_id (original), counts, title, year, genres
    train/part-00000.parquet ...   int32 user, int32 item, float32 rating, int32 timestamp
    val/...  test/...

Shards are uncompressed with plain encoding so a memory-mapped read is close to a copy, and their row
groups (``ROW_GROUP_ROWS`` rows) are the unit the stream deals to ranks and workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
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
SHARD_SCHEMA = pa.schema(
    [("user", pa.int32()), ("item", pa.int32()), ("rating", pa.float32()), ("timestamp", pa.int32())]
)
VERIFY_MODES = ("auto", "on", "off")
HASH_BLOCK = 8 << 20  # bytes per read when hashing (hashlib releases the GIL on blocks this large)
# Errors pyarrow raises on a damaged file: ArrowInvalid ("Parquet magic bytes not found in footer", "Couldn't
# deserialize thrift"), ArrowIOError (an OSError), ...
READ_ERRORS = (pa.ArrowException, OSError)


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


def write_split(
    directory: Path,
    user: np.ndarray,
    item: np.ndarray,
    rating: np.ndarray,
    timestamp: np.ndarray,
    *,
    shard_rows: int = SHARD_ROWS,
    row_group_rows: int = ROW_GROUP_ROWS,
) -> list[dict]:
    """Write one split as Parquet shards; return their manifest entries."""
    directory.mkdir(parents=True, exist_ok=True)
    n = len(user)
    # Small splits still get >= MIN_GROUPS row groups so ranks x workers can each be dealt some.
    row_group_rows = max(MIN_GROUP_ROWS, min(row_group_rows, -(-n // MIN_GROUPS)))
    entries = []
    for k, start in enumerate(range(0, max(n, 1), shard_rows)):
        stop = min(start + shard_rows, n)
        table = pa.table(
            [
                pa.array(user[start:stop].astype(np.int32, copy=False)),
                pa.array(item[start:stop].astype(np.int32, copy=False)),
                pa.array(rating[start:stop].astype(np.float32, copy=False)),
                pa.array(timestamp[start:stop].astype(np.int32, copy=False)),
            ],
            schema=SHARD_SCHEMA,
        )
        path = directory / f"part-{k:05d}.parquet"
        pq.write_table(
            table, path, row_group_size=row_group_rows, compression="none", use_dictionary=False,
            write_statistics=False,
        )
        entries.append(
            {
                "file": f"{directory.name}/{path.name}",
                "rows": stop - start,
                "row_groups": pq.ParquetFile(path).num_row_groups,
                "bytes": path.stat().st_size,
                "sha256": file_digest(path),
            }
        )
    return entries


@dataclass(frozen=True)
class RowGroup:
    """One unit of streaming work: a row group of one shard file."""

    path: Path
    index: int
    rows: int


class Dataset:
    """A prepared dataset directory: manifest plus shard access.

    ``verify`` (``--data.verify``) is how much the shards are checked against the manifest; see ``verify()``.
    Checks that passed are remembered, so each file is checked and hashed at most once per Dataset.
    """

    def __init__(self, root: Path | str, verify: str = "auto"):
        if verify not in VERIFY_MODES:
            raise ConfigError(f"data.verify must be auto, on or off, got {verify!r}")
        self.verify_mode = verify
        self._checked: set[str] = set()  # shard files whose size, row count and row groups matched
        self._hashed: set[str] = set()  # shard files whose sha256 matched
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

    def row_groups(self, split: str) -> list[RowGroup]:
        """The split's row groups, from the shards' footers; each shard's size, row count and row groups are
        checked against the manifest on the way (unless ``verify`` is off), so every training path, which
        starts here, gets those checks."""
        groups = []
        for entry in self.manifest["shards"].get(split, []):
            path = self.root / entry["file"]
            meta = self._footer(entry, check=self.verify_mode != "off")
            for i in range(meta.num_row_groups):
                rows = meta.row_group(i).num_rows
                if rows:
                    groups.append(RowGroup(path, i, rows))
        return groups

    def read_split(self, split: str) -> dict[str, np.ndarray]:
        """A whole split as numpy arrays (validation/test sets, tests, in-memory fast paths).

        The files are read whole, so they are verified first as ``verify(whole=True)`` does (their sha256 too,
        unless ``verify`` is off; once per Dataset).
        """
        self.verify((split,), whole=True)
        files = [self.root / e["file"] for e in self.manifest["shards"].get(split, [])]
        if not files:
            return {name: np.empty(0, dtype=t.to_pandas_dtype()) for name, t in
                    zip(SHARD_SCHEMA.names, SHARD_SCHEMA.types, strict=True)}
        tables = []
        for f in files:
            try:
                tables.append(pq.read_table(f, memory_map=True))
            except READ_ERRORS as exc:
                raise damaged(f, f"cannot read it: {one_line(exc)}", self.root) from None
        table = pa.concat_tables(tables)
        return {name: table.column(name).to_numpy() for name in SHARD_SCHEMA.names}

    # -- integrity ---------------------------------------------------------------------------------
    def verify(self, splits: Iterable[str] = ("train",), mode: str | None = None, *, whole: bool = True) -> dict:
        """Check the shards of ``splits`` against the manifest; raise DataError naming the first damaged one.

        ``mode`` (default: the Dataset's ``verify``, i.e. ``--data.verify``):

        - ``off``: no checks.
        - ``auto``: every shard's byte size (a stat) and its Parquet footer's row count, row groups and columns
          (a footer read); plus the sha256 of every shard when ``whole`` says this process reads the files
          whole anyway (a resident training split, the blocks layout, validation/test sets), so the hash costs
          CPU time only: the data is in the page cache right before or after.
        - ``on``: all of that and the sha256 of every shard, whatever ``whole`` says.

        A manifest written before mfscale recorded shard sizes (or without sha256s) skips that check, logged once.
        Files already checked by this Dataset are not checked again, so calling this at start-up and reading
        later costs one check. Returns what was done: ``{"mode", "files", "bytes", "hashed", "seconds"}``.

        The job calls it at start-up, before any rank reads training data (``mfscale.layout.build``);
        ``row_groups`` (every training path) and the whole-file readers (``read_split``, the resident stream)
        also check what they read, so a damaged shard is one line even where this is not called.
        """
        mode = self.verify_mode if mode is None else mode
        if mode not in VERIFY_MODES:
            raise ConfigError(f"data.verify must be auto, on or off, got {mode!r}")
        t0 = time.perf_counter()
        done = {"mode": mode, "files": 0, "bytes": 0, "hashed": 0, "seconds": 0.0}
        if mode == "off":
            return done
        entries = [e for s in splits for e in self.manifest["shards"].get(s, [])]
        for entry in entries:
            if entry["file"] not in self._checked:
                self._footer(entry, check=True)
            done["files"] += 1
        if mode == "on" or whole:
            todo = [e for e in entries if e["file"] not in self._hashed]
            if any("sha256" not in e for e in todo):
                self._note_missing("sha256")
            todo = [e for e in todo if "sha256" in e]
            with ThreadPoolExecutor(max(1, min(len(todo), _hash_threads()))) as pool:
                digests = list(pool.map(lambda e: file_digest(self.root / e["file"]), todo))
            for entry, digest in zip(todo, digests, strict=True):
                if digest != entry["sha256"]:
                    raise damaged(self.root / entry["file"], f"sha256 {digest[:16]}..., the manifest says "
                                  f"{entry['sha256'][:16]}...", self.root)
                self._hashed.add(entry["file"])
                done["hashed"] += 1
                done["bytes"] += (self.root / entry["file"]).stat().st_size
        done["seconds"] = time.perf_counter() - t0
        return done

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


def _hash_threads() -> int:
    """Files hashed in parallel: this process's CPUs shared among the ranks on this machine."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


def read_row_group(group: RowGroup) -> dict[str, np.ndarray]:
    """Read one row group through a memory map; a damaged shard is a DataError naming it."""
    try:
        table = pq.ParquetFile(group.path, memory_map=True).read_row_group(group.index)
    except READ_ERRORS as exc:
        raise damaged(group.path, f"cannot read row group {group.index}: {one_line(exc)}") from None
    return {name: table.column(name).to_numpy() for name in SHARD_SCHEMA.names}


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

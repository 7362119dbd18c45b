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

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
ROW_GROUP_ROWS = 1 << 18  # 256Ki ratings = 4 MiB: enough groups to deal evenly, big enough to stream fast
SHARD_ROWS = 1 << 22  # 16 row groups per file
MIN_GROUPS, MIN_GROUP_ROWS = 64, 1024
SHARD_SCHEMA = pa.schema(
    [("user", pa.int32()), ("item", pa.int32()), ("rating", pa.float32()), ("timestamp", pa.int32())]
)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    """A prepared dataset directory: manifest plus shard access."""

    def __init__(self, root: Path | str):
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
                    raise DataError(f"{self.root}: shard {entry['file']} listed in the manifest is missing")

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
        groups = []
        for entry in self.manifest["shards"].get(split, []):
            path = self.root / entry["file"]
            meta = pq.ParquetFile(path, memory_map=True).metadata
            for i in range(meta.num_row_groups):
                rows = meta.row_group(i).num_rows
                if rows:
                    groups.append(RowGroup(path, i, rows))
        return groups

    def read_split(self, split: str) -> dict[str, np.ndarray]:
        """A whole split as numpy arrays (validation/test sets, tests, in-memory fast paths)."""
        files = [self.root / e["file"] for e in self.manifest["shards"].get(split, [])]
        if not files:
            return {name: np.empty(0, dtype=t.to_pandas_dtype()) for name, t in
                    zip(SHARD_SCHEMA.names, SHARD_SCHEMA.types, strict=True)}
        tables = [pq.read_table(f, memory_map=True) for f in files]
        table = pa.concat_tables(tables)
        return {name: table.column(name).to_numpy() for name in SHARD_SCHEMA.names}


def read_row_group(group: RowGroup) -> dict[str, np.ndarray]:
    """Read one row group through a memory map."""
    table = pq.ParquetFile(group.path, memory_map=True).read_row_group(group.index)
    return {name: table.column(name).to_numpy() for name in SHARD_SCHEMA.names}


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path``, then rename: readers see the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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

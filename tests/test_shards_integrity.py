"""Damaged shards and a full disk in prepare (issue 21): one line naming the file or directory, exit 2.

A truncated, bit-flipped or missing training shard is one line that names it and says to re-run prepare, from
``Dataset`` and through ``python -m mfscale.train`` (exit 2, no traceback, before training starts). A disk that
fills while prepare writes shards is one line with the directory, the bytes needed and the bytes free; the
partial output is removed and an existing dataset stays as it was.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mfscale import config, errors, prepare
from mfscale.errors import ConfigError, DataError
from mfscale.shards import Dataset, read_row_group

REPO = Path(__file__).resolve().parents[1]


def cli(module: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m module args`` with this checkout's mfscale first on the path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("MFSCALE_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """``python -m mfscale.prepare --synthetic tiny``: 10,200 training ratings in one shard of 10 row groups."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    proc = cli("mfscale.prepare", "--synthetic", "tiny", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def data(tiny, tmp_path) -> Path:
    """A copy of the tiny dataset to damage."""
    shutil.copytree(tiny, tmp_path / "data")
    return tmp_path / "data"


def shard(data: Path, split: str = "train") -> Path:
    return data / split / "part-00000.parquet"


def entry(data: Path, split: str = "train") -> dict:
    return json.loads((data / "manifest.json").read_text())["shards"][split][0]


def hint(data: Path) -> str:
    return f"re-run python -m mfscale.prepare to rebuild {data}"


def truncate(path: Path) -> str:
    """Cut the file in half (its footer goes); the line the check must give."""
    size = path.stat().st_size
    os.truncate(path, size // 2)
    return f"{path} is damaged (size {size // 2:,} bytes, the manifest says {size:,}); {hint(path.parents[1])}"


def flip(path: Path) -> str:
    """Flip one bit in the middle of a row group's ``item`` column data: the file still parses, and its item
    ids are wrong (without the check, training dies in the step with an id out of range)."""
    col = pq.ParquetFile(path).metadata.row_group(3).column(1)
    assert col.path_in_schema == "item"
    offset = col.data_page_offset + col.total_compressed_size // 2  # past the page header, inside the values
    raw = bytearray(path.read_bytes())
    want = hashlib.sha256(raw).hexdigest()
    raw[offset] ^= 0x40
    path.write_bytes(raw)
    got = hashlib.sha256(raw).hexdigest()
    return (f"{path} is damaged (sha256 {got[:16]}..., the manifest says {want[:16]}...); "
            f"{hint(path.parents[1])}")


def remove(path: Path) -> str:
    path.unlink()
    return f"{path} is missing (the manifest lists it); {hint(path.parents[1])}"


DAMAGE = {"truncated": truncate, "flipped": flip, "missing": remove}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_shard_is_one_line_from_verify(data, kind):
    expected = DAMAGE[kind](shard(data))
    with pytest.raises(DataError) as exc:
        Dataset(data).verify(("train",), "auto")
    assert str(exc.value) == expected


@pytest.mark.parametrize("tables", ["replicated", "blocks"])
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_train_on_damaged_shard_exits_2_with_one_line(data, tmp_path, kind, tables):
    """The real job, default flags (one process: the resident stream; or the blocks layout, the default on
    several ranks, which reads the split itself): the damage is found at start-up (no checkpoint written)."""
    expected = DAMAGE[kind](shard(data))
    run_dir = tmp_path / "run"
    proc = cli("mfscale.train", "--data", data, "--run-dir", run_dir, "--epochs", "1", "--train.tables", tables)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"mfscale.train: error: {expected}", proc.stderr
    assert proc.returncode == 2
    assert not (run_dir / "checkpoints").exists()


def test_modes(data):
    """auto hashes only files read whole; on hashes every file; off checks nothing."""
    path = shard(data)
    expected = flip(path)
    assert Dataset(data).verify(("train",), "auto", whole=False)["hashed"] == 0  # size and rows still match
    for mode, whole in (("on", False), ("auto", True)):
        with pytest.raises(DataError) as exc:
            Dataset(data).verify(("train",), mode, whole=whole)
        assert str(exc.value) == expected
    expected = truncate(path)
    assert Dataset(data, verify="off").verify(("train",)) == {"mode": "off", "files": 0, "bytes": 0, "hashed": 0,
                                                               "seconds": 0.0}
    with pytest.raises(DataError) as exc:
        Dataset(data, verify="on").verify(("train",), whole=False)
    assert str(exc.value) == expected
    with pytest.raises(ConfigError):
        Dataset(data, verify="maybe")
    with pytest.raises(ConfigError, match="data.verify must be auto, on or off"):
        config.from_args(["--data", str(data), "--data.verify", "maybe"])
    assert config.from_args(["--data", str(data), "--data.verify", "on"]).data.verify == "on"


def test_every_reader_checks_what_it_reads(data):
    """row_groups (every training path) checks sizes and rows; read_split also hashes the files it reads."""
    expected = truncate(shard(data, "val"))
    with pytest.raises(DataError) as exc:
        Dataset(data).row_groups("val")
    assert str(exc.value) == expected
    with pytest.raises(DataError) as exc:
        Dataset(data).read_split("val")
    assert str(exc.value) == expected
    expected = flip(shard(data, "train"))
    assert len(Dataset(data).row_groups("train")) == entry(data)["row_groups"]  # sizes and rows still match
    with pytest.raises(DataError) as exc:
        Dataset(data).read_split("train")
    assert str(exc.value) == expected


def test_pyarrow_errors_become_one_line(data):
    """With the checks off, or damage after them, a read that pyarrow refuses is still one line, no traceback."""
    path = shard(data)
    groups = Dataset(data).row_groups("train")
    size = path.stat().st_size
    os.truncate(path, size // 2)
    with pytest.raises(DataError) as exc:
        read_row_group(groups[0])
    assert re.fullmatch(rf"{re.escape(str(path))} is damaged \(cannot read row group 0: .*magic bytes.*\); "
                        rf"{re.escape(hint(data))}", str(exc.value)), exc.value
    off = Dataset(data, verify="off")
    with pytest.raises(DataError) as exc:
        off.row_groups("train")
    assert re.fullmatch(rf"{re.escape(str(path))} is damaged \(not a readable Parquet file: .*magic bytes.*\); "
                        rf"{re.escape(hint(data))}", str(exc.value)), exc.value
    with pytest.raises(DataError) as exc:
        off.read_split("train")
    assert re.fullmatch(rf"{re.escape(str(path))} is damaged \(cannot read it: .*magic bytes.*\); "
                        rf"{re.escape(hint(data))}", str(exc.value)), exc.value


def test_row_count_and_row_groups_against_the_manifest(data):
    manifest = json.loads((data / "manifest.json").read_text())
    e = manifest["shards"]["train"][0]
    rows, groups = e["rows"], e["row_groups"]
    e["rows"] += 1
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as exc:
        Dataset(data).verify(("train",), "auto", whole=False)
    assert str(exc.value) == (f"{shard(data)} is damaged ({rows:,} rows in {groups} row groups, the manifest says "
                              f"{rows + 1:,} in {groups}); {hint(data)}")


def test_old_manifest_without_sizes_skips_that_check_and_says_so_once(data, caplog):
    manifest = json.loads((data / "manifest.json").read_text())
    for split in manifest["shards"].values():
        for e in split:
            del e["bytes"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.INFO, logger="mfscale"):
        assert Dataset(data).verify(("train", "val", "test"), "on")["hashed"] == 3
        Dataset(data).verify(("train",), "on")
    assert [r.getMessage() for r in caplog.records] == [
        f"{data}: the manifest records no byte size for some shards (prepared by an older mfscale); that check is "
        "skipped (re-run python -m mfscale.prepare to get it)"]
    path = shard(data)
    os.truncate(path, path.stat().st_size // 2)  # still found: the footer is gone
    with pytest.raises(DataError, match=r"is damaged \(not a readable Parquet file: .*magic bytes"):
        Dataset(data).verify(("train",), "auto", whole=False)


def test_each_file_is_checked_once_per_dataset(data):
    ds = Dataset(data)
    assert ds.verify(("train", "val"), "on")["hashed"] == 2
    assert ds.verify(("train", "val", "test"), "on")["hashed"] == 1
    flip(shard(data))  # after a check passed, the same Dataset does not read the file again
    assert ds.verify(("train",), "on")["hashed"] == 0


# -- a full disk while prepare writes shards ---------------------------------------------------------------
def test_disk_full_detection():
    assert errors.disk_full_errno(OSError(errno.ENOSPC, "Error writing bytes to file.")) == errno.ENOSPC
    assert errors.disk_full_errno(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))) == errno.EDQUOT
    polars_like = RuntimeError("parquet: File out of specification: underlying IO error: No space left on "
                               "device (os error 28)")
    assert errors.disk_full_errno(polars_like) == errno.ENOSPC
    assert errors.disk_full_errno(OSError(errno.EACCES, "Permission denied")) is None


def test_disk_full_in_prepare_is_one_line_and_keeps_the_old_dataset(small_tmpfs, tmp_path):
    ref = tmp_path / "ref"  # the same data on a roomy disk: what the dataset needs
    assert cli("mfscale.prepare", "--synthetic", "small", "--out", ref, "--quiet").returncode == 0
    counts = json.loads((ref / "manifest.json").read_text())["counts"]
    need = prepare.estimate_bytes(counts["ratings"], counts["users"], counts["items"])
    used = sum(p.stat().st_size for p in ref.rglob("*") if p.is_file())
    assert used <= need <= 1.25 * used

    out = small_tmpfs / "data"
    assert cli("mfscale.prepare", "--synthetic", "tiny", "--out", out, "--quiet").returncode == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for target, extra in ((out, ["--overwrite"]), (small_tmpfs / "new", [])):
        proc = cli("mfscale.prepare", "--synthetic", "small", "--out", target, "--quiet", *extra)
        free = shutil.disk_usage(small_tmpfs).free
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip() == (f"mfscale.prepare: error: no space left in {small_tmpfs}: the prepared dataset "
                                       f"needs about {need:,} bytes, {free:,} bytes are free; free some space or "
                                       "write elsewhere")
        assert proc.returncode == 2
        assert sorted(p.name for p in small_tmpfs.iterdir()) == ["data"]  # no partial output, no temp files
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert Dataset(out).verify(("train", "val", "test"), "on")["hashed"] == 3

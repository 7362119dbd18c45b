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
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mfscale import config, errors, prepare, shards
from mfscale.errors import ConfigError, DataError
from mfscale.shards import Dataset, read_row_group

from .conftest import finish_logged, kill_logged, start_logged

REPO = Path(__file__).resolve().parents[1]


def cli(module: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m module args`` with this checkout's mfscale first on the path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("MFSCALE_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def cli_together(jobs: dict, out: Path, timeout: float = 300) -> dict:
    """``cli`` of each job's (module, args) all at once (each is mostly Python's and torch's start-up, which
    overlaps on several cores); their results by the jobs' keys. Output goes to files under ``out``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("MFSCALE_TRACEBACK", None)
    procs = {key: start_logged([sys.executable, "-m", module, *map(str, args)], out / str(k), env)
             for k, (key, (module, args)) in enumerate(jobs.items())}
    deadline = time.monotonic() + timeout
    try:
        return {key: finish_logged(p, out / str(k), deadline) for k, (key, p) in enumerate(procs.items())}
    finally:
        for p in procs.values():
            kill_logged(p)


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


@pytest.fixture(scope="module")
def damaged_runs(tiny, tmp_path_factory) -> dict[tuple[str, str], tuple[str, Path, subprocess.CompletedProcess]]:
    """test_train_on_damaged_shard_exits_2_with_one_line's jobs, all at once: per (damage, tables), the line the
    check must give, the run dir and the job's result; each on a copy of the tiny dataset damaged so."""
    base = tmp_path_factory.mktemp("damaged-runs")
    cases, jobs = {}, {}
    for kind in DAMAGE:
        for tables in ("replicated", "blocks"):
            data = base / f"{kind}-{tables}" / "data"
            shutil.copytree(tiny, data)
            run_dir = data.parent / "run"
            cases[kind, tables] = (DAMAGE[kind](shard(data)), run_dir)
            jobs[kind, tables] = ("mfscale.train", ["--data", data, "--run-dir", run_dir, "--epochs", "1",
                                                    "--train.tables", tables])
    done = cli_together(jobs, base / "logs")
    return {key: (*cases[key], done[key]) for key in cases}


@pytest.mark.parametrize("tables", ["replicated", "blocks"])
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_train_on_damaged_shard_exits_2_with_one_line(damaged_runs, kind, tables):
    """The real job, default flags (one process: the resident stream; or the blocks layout, the default on
    several ranks, which reads the split itself): the damage is found at start-up (no checkpoint written). (The
    jobs: the damaged_runs fixture.)"""
    expected, run_dir, proc = damaged_runs[kind, tables]
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
                                                               "cached": 0, "seconds": 0.0}
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


def test_a_verified_shard_is_hashed_again_only_when_it_changed(data, monkeypatch):
    """auto records each shard whose sha256 matched with its stat (shards.VERIFIED) and does not hash it again
    while inode, size, mtime and ctime are unchanged; any write to it changes them, and on always hashes."""
    (data / shards.VERIFIED).unlink()  # prepare's verdicts, copied: they name the original files' stats
    time.sleep(shards.RACY_S + 0.1)  # the copy's times are older than the racy window: its verdicts are kept
    assert Dataset(data).verify(("train", "val"), "auto")["hashed"] == 2
    assert json.loads((data / shards.VERIFIED).read_text()).keys() == {entry(data)["file"], entry(data, "val")["file"]}
    assert Dataset(data).verify(("train", "val", "test"), "auto") | {"seconds": 0} == {
        "mode": "auto", "files": 3, "bytes": shard(data, "test").stat().st_size, "hashed": 1, "cached": 2,
        "seconds": 0}
    assert Dataset(data).verify(("train",), "on")["hashed"] == 1
    expected = flip(shard(data))  # right after the verdict (a write in the same clock tick is caught too)
    with pytest.raises(DataError) as exc:
        Dataset(data).verify(("train",), "auto")
    assert str(exc.value) == expected
    (data / shards.VERIFIED).write_text("{not json")  # only a cache: unreadable means hash again
    assert Dataset(data).verify(("val",), "auto")["hashed"] == 1


def test_prepare_records_the_shards_it_hashed(tiny, tmp_path):
    """The first job on a freshly prepared dataset does not hash it again; a copy (new inodes) is hashed."""
    assert Dataset(tiny).verify(("train", "val", "test"), "auto")["cached"] == 3
    shutil.copytree(tiny, tmp_path / "copy")
    assert Dataset(tmp_path / "copy").verify(("train", "val", "test"), "auto")["hashed"] == 3


def test_a_file_changed_within_the_racy_window_gets_no_verdict(data):
    (data / shards.VERIFIED).unlink()
    os.utime(shard(data))  # changed just now
    assert Dataset(data).verify(("train",), "auto")["hashed"] == 1
    assert not (data / shards.VERIFIED).exists()
    assert Dataset(data).verify(("train",), "auto")["hashed"] == 1


def test_an_unwritable_verdict_file_only_means_hashing_again(data):
    time.sleep(shards.RACY_S + 0.1)
    (data / shards.VERIFIED).unlink()
    (data / shards.VERIFIED).mkdir()  # cannot be read or replaced, even by root (a read-only mount is the same)
    for _ in range(2):
        assert Dataset(data).verify(("train",), "auto")["hashed"] == 1


def test_a_failed_read_of_a_damaged_shard_reports_the_damage(data):
    """Dataset.reading hashes while the block reads; if the read breaks on the bad bytes (an id out of range,
    say), the damaged shard is the error, not what it broke."""
    with pytest.raises(IndexError), Dataset(data).reading(("train",)):
        raise IndexError("index 70000 is out of bounds")  # intact data: the read's own error
    expected = flip(shard(data))
    with pytest.raises(DataError) as exc, Dataset(data).reading(("train",)):
        raise IndexError("index 70000 is out of bounds")
    assert str(exc.value) == expected
    assert exc.value.__suppress_context__
    with pytest.raises(DataError) as exc, Dataset(data).reading(("train",)):
        pass  # a read that went through on bad bytes: the damage is still found at the block's end
    assert str(exc.value) == expected


def test_processes_on_one_host_hash_disjoint_shares(data):
    """hash_share (LOCAL_RANK, LOCAL_WORLD_SIZE): each file is hashed by one process of the host."""
    splits = ("train", "val", "test")
    shares = [Dataset(data, verify="on", hash_share=(i, 2)) for i in range(2)]
    assert [ds.verify(splits)["hashed"] for ds in shares] == [1, 2]  # the largest alone, the two others
    assert shares[0]._hashed.isdisjoint(shares[1]._hashed)
    assert len(shares[0]._hashed | shares[1]._hashed) == 3
    expected = flip(shard(data))  # train: the largest file, share 0's
    with pytest.raises(DataError) as exc:
        Dataset(data, verify="on", hash_share=(0, 2)).verify(splits)
    assert str(exc.value) == expected
    assert Dataset(data, verify="on", hash_share=(1, 2)).verify(splits)["hashed"] == 2
    with pytest.raises(DataError) as exc, Dataset(data, hash_share=(1, 2)).reading(("train",)):
        raise IndexError("index 16500 is out of bounds")  # a read broken by a shard of a sibling's share
    assert str(exc.value) == expected


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
    out = small_tmpfs / "data"  # and a tiny dataset on the small disk, prepared beside it
    prepared = cli_together({"ref": ("mfscale.prepare", ["--synthetic", "small", "--out", ref, "--quiet"]),
                             "out": ("mfscale.prepare", ["--synthetic", "tiny", "--out", out, "--quiet"])},
                            tmp_path / "logs")
    assert prepared["ref"].returncode == 0, prepared["ref"].stderr
    manifest = json.loads((ref / "manifest.json").read_text())
    counts = manifest["counts"]
    stripes = len({(e["file"], k) for e in manifest["shards"]["train"] for k in e["row_group_stripes"]})
    need = prepare.estimate_bytes(counts["ratings"], counts["users"], counts["items"],
                                  stripes * manifest["buckets"]["n"])
    used = sum(p.stat().st_size for p in ref.rglob("*") if p.is_file())
    assert used <= need <= 1.25 * used

    assert prepared["out"].returncode == 0, prepared["out"].stderr
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

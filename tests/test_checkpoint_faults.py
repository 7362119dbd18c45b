"""Damaged and hostile checkpoints against the real job (issue 21): every rank agrees on the newest checkpoint all
of them can load and verify, a damaged part is found by its sha256, nothing in a run directory is unpickled,
and a checkpoint of an older mfscale is refused in one line until converted."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mfscale import checkpoint, train

from .conftest import finish_logged, kill_logged, start_logged, tmpfs
from .test_faults import fill
from .test_train import torchrun

COMMON = ["--batch-size", "50", "--train.ranking_k", "0", "--checkpoint.every_steps", "25",
          "--checkpoint.keep_last", "4", "--train.patience", "0"]


def tables(run_dir: Path) -> dict[str, torch.Tensor]:
    state, path = checkpoint.load_latest(run_dir)
    return checkpoint.assemble(path, state, optimizer=True)


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory) -> Path:
    """2 ranks, 2 epochs, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("ckfaults") / "full"
    proc = torchrun(["--data", str(small_data), "--run-dir", str(run_dir), "--epochs", "2", *COMMON], run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def finished_run(reference: Path, run_dir: Path) -> Path:
    """A copy of the reference run at ``run_dir``: what running its job there again would leave, bit for bit
    (the job is deterministic: every test here that resumes it ends on the reference's tables), without the
    cost of running it."""
    shutil.copytree(reference, run_dir)
    return run_dir


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[:100]))
    else:  # one bit in the middle: the file may still load; only its sha256 tells
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


def _damage_the_newest_two(run_dir: Path) -> list[Path]:
    """For test_damaged_newest_parts_...: keep the checkpoints up to mid-epoch 1 and damage rank 1's part of the two
    newest of them (the newest bit-flipped, the one before it truncated); the checkpoints as they were."""
    ckpts = checkpoint.list_checkpoints(run_dir)
    newest_kept, second = ckpts[-2], ckpts[-3]
    for p in ckpts[-1:]:
        p.unlink()
    (run_dir / "metrics.json").unlink()
    for path, how in ((newest_kept, "bit_flipped"), (second, "truncated")):
        state = checkpoint.load_checkpoint_file(path)
        assert state["step_in_epoch"] > 0
        damage(path.parent / state["parts"][1], how)
    return ckpts


def _damage_every_rank_0_part(run_dir: Path) -> None:
    """For test_no_loadable_checkpoint_...: as if stopped before its end (there is more to train), and every
    checkpoint's rank-0 part truncated."""
    (run_dir / "metrics.json").unlink()
    for p in checkpoint.list_checkpoints(run_dir):
        state = checkpoint.load_checkpoint_file(p)
        damage(p.parent / state["parts"][0], "truncated")


def _to_the_older_format(run_dir: Path) -> None:
    """For test_an_older_mfscale_checkpoint_...: stopped mid-epoch 1, its checkpoints rewritten in the format from
    before 2026-12 (by hand): NumPy's RNG state as an array, no part checksums."""
    for p in checkpoint.list_checkpoints(run_dir)[-1:]:
        p.unlink()
    (run_dir / "metrics.json").unlink()
    for p in [*checkpoint.list_checkpoints(run_dir), checkpoint.best_path(run_dir)]:
        payload = torch.load(p, weights_only=True)
        name, keys, *rest = payload["state"]["rng"]["numpy"]
        payload["state"]["rng"]["numpy"] = (name, keys.numpy().astype(np.uint32), *rest)
        del payload["state"]["parts_sha256"]
        torch.save(payload, p)


def _start_torchrun(args: list[str], out: Path) -> subprocess.Popen:
    """test_train.torchrun's job, started (start_logged: output to out.stdout, out.stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mfscale.train",
           *args]
    return start_logged(cmd, out, env, cwd=out.parent)


@pytest.fixture(scope="module")
def resumed(small_data, reference, tmp_path_factory) -> dict:
    """The 2-rank jobs of the three tests below, each on a copy of the reference run damaged as its test says,
    started together (start-up, most of a small job's time, overlaps): per test, its run dir and torchrun's result;
    for the older checkpoint the refused job, then the conversion and the resumed job on the same run dir, in turn
    (beside the others)."""
    base = tmp_path_factory.mktemp("resumed")
    runs = {name: finished_run(reference, base / name / "run") for name in ("damaged", "unloadable", "older")}
    ckpts = _damage_the_newest_two(runs["damaged"])
    _damage_every_rank_0_part(runs["unloadable"])
    _to_the_older_format(runs["older"])

    def args(name: str) -> list[str]:
        return ["--data", str(small_data), "--run-dir", str(runs[name]), "--epochs", "2", *COMMON]

    deadline = time.monotonic() + 480
    started = {name: _start_torchrun(args(name), base / name / "job") for name in runs}
    out: dict = {name: {"run_dir": runs[name]} for name in runs}
    try:
        older = out["older"]
        older["refused"] = finish_logged(started.pop("older"), base / "older" / "job", deadline)
        older["convert"] = subprocess.run([sys.executable, "-m", "mfscale.checkpoint", "convert", str(runs["older"])],
                                          capture_output=True, text=True, timeout=120)
        older["converted_state"] = checkpoint.load_latest(runs["older"])[0]
        started["older"] = _start_torchrun(args("older"), base / "older" / "again")
        for name, proc in started.items():
            out[name]["proc"] = finish_logged(proc, base / name / ("again" if name == "older" else "job"), deadline)
    finally:
        for proc in started.values():
            kill_logged(proc)
    out["damaged"]["ckpts"] = ckpts
    return out


def test_damaged_newest_parts_fall_back_to_the_checkpoint_every_rank_can_load(reference, resumed):
    """Rank 1's part of the newest checkpoint has one bit flipped (it may still load: only its sha256 tells), of
    the one before it is truncated: every rank skips both, and the job resumes from the one before those. (One
    resume for both kinds of damage: each is named in its own warning. Its job: the resumed fixture.)"""
    run_dir, proc, ckpts = resumed["damaged"]["run_dir"], resumed["damaged"]["proc"], resumed["damaged"]["ckpts"]
    newest_kept, second = ckpts[-2], ckpts[-3]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(rf"rank 1 cannot use checkpoint {newest_kept.name}: .*is damaged \(sha256", proc.stderr), \
        proc.stderr[-3000:]
    assert f"rank 1 cannot use checkpoint {second.name}" in proc.stderr, proc.stderr[-3000:]
    assert f"resuming from {ckpts[-4].name}: skipped the newer {newest_kept.name}, {second.name}" in proc.stderr
    assert "Traceback" not in proc.stderr
    # resuming from the older checkpoint retraces the uninterrupted run exactly
    want, got = tables(reference), tables(run_dir)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_no_loadable_checkpoint_is_the_same_one_line_on_every_rank(resumed):
    """(Its job: the resumed fixture.)"""
    run_dir, proc = resumed["unloadable"]["run_dir"], resumed["unloadable"]["proc"]
    assert proc.returncode != 0  # torchrun's own exit status when its workers exit 2
    # The ranks share one stderr, so their lines may interleave: count the message, not lines; only the workers'
    # part, before torchrun's own traceback (its summary repeats each rank's line).
    workers = proc.stderr.split("Traceback (most recent call last)")[0]
    message = (f"mfscale.train: error: no checkpoint in {run_dir / 'checkpoints'} can be loaded by every rank (tried "
               f"{', '.join(p.name for p in reversed(checkpoint.list_checkpoints(run_dir)))}; the reasons are in the "
               "warnings above); use --checkpoint.resume never or a new --run-dir to start over")
    assert workers.count(message) == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("mfscale.train: error:")[0]


class _Touch:
    """Unpickling this runs ``touch PATH``."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):

        return (os.system, (f"touch {self.path}",))


def test_a_crafted_pickle_is_refused_and_never_runs(tmp_path, reference):
    run_dir = finished_run(reference, tmp_path / "run")
    pwned = tmp_path / "pwned"
    best = checkpoint.best_path(run_dir)
    payload = torch.load(best, weights_only=True)
    payload["state"]["config"]["evil"] = _Touch(str(pwned))
    torch.save(payload, best)
    cmds = (["mfscale.recommend", "--run", str(run_dir), "--user", "1"],
            ["mfscale.export", "--run", str(run_dir), "--out", str(tmp_path / "exp")])
    tools = [subprocess.Popen([sys.executable, "-m", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in cmds]  # both at once: each is mostly its start-up
    try:
        done = []
        for t in tools:
            out, err = t.communicate(timeout=120)
            done.append(subprocess.CompletedProcess(t.args, t.returncode, out, err))
    finally:
        for t in tools:
            if t.poll() is None:
                t.kill()
                t.communicate()
    for cmd, p in zip(cmds, done, strict=True):
        assert p.returncode == 2, p.stderr
        assert p.stderr.strip().splitlines()[-1].startswith(f"{cmd[0]}: error: {best} holds Python objects")
        assert "Traceback" not in p.stderr and not pwned.exists()
    # a crafted part: refused when the job resumes, on the rank that reads it
    state, path = checkpoint.load_latest(run_dir)
    part = path.parent / state["parts"][0]
    payload = torch.load(part, weights_only=True)
    payload["part"]["evil"] = _Touch(str(pwned))
    torch.save(payload, part)
    with pytest.raises(checkpoint.UnsafeCheckpoint):
        checkpoint.read_part(part)
    assert not pwned.exists()


def test_an_older_mfscale_checkpoint_is_refused_until_converted(reference, resumed):
    """Before 2026-12 the metadata held NumPy's RNG state as an array (loadable only by unpickling) and no part
    checksums: refused in one line naming the conversion, which makes it resume as it would have. (Its jobs, the
    refused one, the conversion and the resumed one, on one run dir: the resumed fixture.)"""
    run_dir, proc = resumed["older"]["run_dir"], resumed["older"]["refused"]
    assert proc.returncode != 0
    assert f"python -m mfscale.checkpoint convert {run_dir}" in proc.stderr.strip().splitlines()[-1] or \
        f"python -m mfscale.checkpoint convert {run_dir}" in proc.stderr, proc.stderr[-3000:]
    conv = resumed["older"]["convert"]
    assert conv.returncode == 0 and conv.stdout.startswith("converted "), conv.stderr
    assert "parts_sha256" in resumed["older"]["converted_state"]
    proc = resumed["older"]["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = tables(reference), tables(run_dir)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert json.loads((run_dir / "metrics.json").read_text())["test_rmse"] == \
        json.loads((reference / "metrics.json").read_text())["test_rmse"]


@pytest.fixture
def tmpfs_16m(tmp_path):
    """A 16 MiB tmpfs: room for a small run, then filled to the brim."""
    with tmpfs(tmp_path / "mnt", "16m") as mnt:
        yield mnt


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_previous_one_resumes(small_data, tmpfs_16m):
    """The job that meets the full disk runs as its own process (python -m mfscale.train: its exit status and
    stderr); the run before it and the resume after it run in this one (train.main: the same job, without a
    second start-up of Python and torch)."""
    run_dir = tmpfs_16m / "run"
    argv = ["--data", str(small_data), "--run-dir", str(run_dir), *COMMON, "--checkpoint.every_steps", "5"]
    args = [sys.executable, "-m", "mfscale.train", *argv]
    assert train.main([*argv, "--epochs", "2", "--train.epochs", "1"]) == 0
    kept, _ = checkpoint.load_latest(run_dir)
    filler = fill(tmpfs_16m, leave=64 << 10)  # a checkpoint part of this model is ~400 KB
    full = subprocess.run([*args, "--epochs", "2"], capture_output=True, text=True, timeout=300)
    last = full.stderr.strip().splitlines()[-1]
    assert full.returncode == 2, full.stderr[-3000:]
    assert last.startswith(f"mfscale.train: error: no space left in {run_dir / 'checkpoints'}: writing step-"), last
    assert "bytes are free" in last and "Traceback" not in full.stderr
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    filler.unlink()
    state, _ = checkpoint.load_latest(run_dir)  # what was valid stays valid, and resumes
    assert state["global_step"] == kept["global_step"]
    assert train.main([*argv, "--epochs", "2"]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 2

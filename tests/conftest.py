"""Shared fixtures: small prepared datasets with known low-rank structure, built by mfscale.prepare."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from mfscale import config, prepare


def write_lowrank_csv(path: Path, n_users: int = 300, n_items: int = 200, per_user: int = 40, rank: int = 3,
                      noise: float = 0.3, seed: int = 0) -> Path:
    """MovieLens-format ratings.csv from mean + biases + <p, q> + noise, rounded to half stars."""
    rng = np.random.default_rng(seed)
    p = rng.normal(0, 0.6, (n_users, rank))
    q = rng.normal(0, 0.6, (n_items, rank))
    bu, bi = rng.normal(0, 0.3, n_users), rng.normal(0, 0.4, n_items)
    lines = ["userId,movieId,rating,timestamp"]
    for u in range(n_users):
        items = rng.choice(n_items, per_user, replace=False)
        score = 3.5 + bu[u] + bi[items] + q[items] @ p[u] + rng.normal(0, noise, per_user)
        score = np.clip(np.round(score * 2) / 2, 0.5, 5.0)
        for i, s in zip(items, score, strict=True):
            lines.append(f"{u + 1},{int(i) * 2 + 1},{s:.1f},{1_000_000 + u * 100 + int(i)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def make_dataset(root: Path, **kw) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    csv = write_lowrank_csv(root / "ratings.csv", **kw)
    out = root / "data"
    assert prepare.main(["--input", str(csv), "--out", str(out), "--quiet", "--val-frac", "0.1",
                         "--test-frac", "0.1"]) == 0
    return out


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """12,000 ratings, 300 users, 200 movies, rank-3 structure."""
    return make_dataset(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="session")
def odd_data(tmp_path_factory) -> Path:
    """An odd number of ratings in every split (2,521 train, 315 val, 315 test; 137 users, 90 movies): two
    ranks get unequal shares, and at batch 90 the epoch's last global step holds 1 rating, so rank 1's last
    batch is empty."""
    return make_dataset(tmp_path_factory.mktemp("odd"), n_users=137, n_items=90, per_user=23, seed=3)


class _Fd:
    """A file descriptor of this process, pickled into a rank started by a forkserver, which gets its own copy
    (multiprocessing sends it along with the process)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction

        return _inherited_fd, (reduction.DupFd(self.fd),)


def _inherited_fd(dup) -> int:
    return dup.detach()


def _as_started_here(env: dict[str, str], out: int, err: int, target, *args) -> None:
    """``target(*args)`` as in a process started by the test process now: its environment of the moment, and its
    stdout and stderr (pytest's capture of the test running); a forkserver's child has the server's."""
    os.environ.clear()
    os.environ.update(env)
    for fd, to in ((out, 1), (err, 2)):
        os.dup2(fd, to)
        os.close(fd)
    target(*args)


def start_ranks(target, world: int, args: tuple, method: str = "forkserver") -> list[mp.Process]:
    """Processes that will run ``target(rank, *args)``, one per rank, in rank order (not started yet).

    By default each is forked from a forkserver that has imported torch and nothing else (its one other thread,
    OpenBLAS's, is stopped around a fork by OpenBLAS): a fresh interpreter as a spawned one would be after its
    first import, without paying for importing torch (most of a rank's start-up) in every rank of every launch.
    The rank runs in this process's environment and with its stdout and stderr of the moment, as a spawned one
    (``_as_started_here``). Never forked from the pytest process itself: forking after MKL/OpenMP threads
    started there can hang.
    """
    ctx = mp.get_context(method)
    if method != "forkserver":
        return [ctx.Process(target=target, args=(r, *args)) for r in range(world)]
    ctx.set_forkserver_preload(["torch"])  # used when the server starts (the first launch); the same each time
    env = dict(os.environ)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    return [ctx.Process(target=_as_started_here, args=(env, _Fd(1), _Fd(2), target, r, *args))
            for r in range(world)]


def spawn_ranks(target, world: int, args: tuple, timeout: float, method: str = "forkserver") -> list[int | None]:
    """Run ``target(rank, *args)`` in one process per rank (start_ranks); their exit codes, in rank order.

    A rank still running after ``timeout`` (from when all started) is killed and reported as None, so a hung
    collective fails the test instead of keeping pytest from exiting.
    """
    procs = start_ranks(target, world, args, method)
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        codes.append(p.exitcode)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes


def start_logged(cmd: list[str], out: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """``cmd`` started in a session of its own, its stdout and stderr to the files out.stdout and out.stderr (no
    pipe to fill while other jobs are waited for); finish_logged waits for it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".stdout"), "w") as o, open(out.with_suffix(".stderr"), "w") as e:
        return subprocess.Popen(cmd, stdout=o, stderr=e, text=True, env=env, cwd=cwd, start_new_session=True)


def finish_logged(proc: subprocess.Popen, out: Path, deadline: float) -> subprocess.CompletedProcess:
    """start_logged's job, waited for until ``deadline`` (time.monotonic) and killed with its children past it;
    its result with what it wrote."""
    try:
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        kill_logged(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.with_suffix(".stdout").read_text(),
                                       out.with_suffix(".stderr").read_text())


def kill_logged(proc: subprocess.Popen) -> None:
    """A start_logged job still running, killed with its children (its session's process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The 2-rank job of the restart tests (torchrun --max-restarts, SLURM requeue): 150 steps of 2 x 32 per epoch,
# long enough to interrupt; its uninterrupted run is the reference_run fixture.
RESTART_ARGS = ["--workers", "0", "--batch-size", "32", "--epochs", "6", "--train.patience", "0",
                "--checkpoint.every_steps", "3"]
_WRITE_EVENTS = ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate", "os.link", "os.symlink",
                 "os.chmod", "os.utime", "shutil.rmtree")


def _record_writes(roots: list[str], log: list[str]) -> None:
    """Audit hook: every file-system write under ``roots`` by this process (Python-level calls; torch.save
    to a path would bypass it, but the trainer saves through an open file and renames)."""

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in str(mode or "") for c in "wax+") or bool(
                (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        elif event in _WRITE_EVENTS:
            path, writing = args[0], True
        else:
            return
        if writing and isinstance(path, str | bytes | os.PathLike):
            full = os.path.abspath(os.fsdecode(path))
            if any(full.startswith(r) for r in roots):
                log.append(f"{event} {full}")

    sys.addaudithook(hook)


def as_rank(rank: int, world: int, port: int) -> None:
    """Make this spawned process rank ``rank`` of ``world`` on one machine, as torchrun would: its
    environment, and one thread (torchrun's OMP_NUM_THREADS=1: the same kernels, the same rounding)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)


def _reference_rank(rank: int, port: int, argv: list[str], out: str) -> None:
    as_rank(rank, 2, port)
    from mfscale.train import run

    cfg = config.from_args(argv)
    writes: list[str] = []
    _record_writes([os.path.abspath(cfg.run_dir), os.path.abspath(cfg.data.path)], writes)
    metrics = run(cfg)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "writes": writes}))


@pytest.fixture(scope="session")
def reference_run(small_data, tmp_path_factory) -> tuple[Path, dict, list[list[str]]]:
    """The restart tests' job run uninterrupted by 2 gloo ranks: (run dir, metrics, each rank's writes)."""
    base = tmp_path_factory.mktemp("reference")
    argv = ["--data", str(small_data), "--run-dir", str(base / "run"), *RESTART_ARGS]
    assert spawn_ranks(_reference_rank, 2, (free_port(), argv, str(base)), 300) == [0, 0]
    ranks = [json.loads((base / f"rank{r}.json").read_text()) for r in range(2)]
    return base / "run", ranks[0]["metrics"], [r["writes"] for r in ranks]


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's syntax: 1m, 16m) mounted at ``path``, unmounted afterwards; skips the test
    with the reason without root or when mounting fails. For tests of a full disk."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip() or proc.returncode}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], check=False)  # a file left open: detach it anyway


@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator[Path]:
    """A 1 MiB tmpfs (unmounted afterwards)."""
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        yield mnt

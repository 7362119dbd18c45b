"""Faults a cluster job meets (issue 21): a peer rank that dies or stops answering, and a full disk. Each ends with
one line on stderr per process and a non-zero exit code, and nothing that was valid is lost.

The peer tests run the real job under ``torchrun --standalone --nproc_per_node=2`` through a small wrapper
(``FAULTY_TRAIN``) that injects the fault at a given step; each rank's output is read from torchrun's per-rank
log files (``--log-dir``, ``--redirects 3``). The disk tests need a small tmpfs (root); they are skipped, with the
reason, without one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mfscale import errors, prepare
from mfscale.errors import DataError, disk_full, is_disk_full, peer_failure
from mfscale.monitor import Monitor, read_scalars
from mfscale.shards import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]

# The job, with a fault injected on rank FAULT_RANK at global step FAULT_STEP (test-only: nothing in mfscale reads
# these variables).
FAULTY_TRAIN = '''
import os, signal, sys, time
from mfscale import distributed, train
from mfscale.errors import DataError

FAULT, RANK, STEP = os.environ["FAULT"], int(os.environ["FAULT_RANK"]), int(os.environ.get("FAULT_STEP", "3"))
train_step = train.Trainer.train_step

def faulty_step(self, batch):
    if self.env.rank == RANK and self.progress.global_step == STEP:
        if FAULT == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if FAULT == "bad_file":  # as if only this rank found a damaged file
            raise DataError("train/part-00000.parquet is damaged: re-run python -m mfscale.prepare")
        if FAULT == "stuck":  # no collective until the launcher's SIGTERM (which StopSignal records)
            while not self.stop.signum:
                time.sleep(0.05)
    return train_step(self, batch)

train.Trainer.train_step = faulty_step

if FAULT == "slow_exit":  # this rank leaves the process group 1.5 s late when an error is on its way out
    destroy = distributed.destroy

    def slow_destroy():
        if sys.exc_info()[0] is not None and int(os.environ["RANK"]) == RANK:
            time.sleep(1.5)
        destroy()

    distributed.destroy = slow_destroy

sys.exit(train.main(sys.argv[1:]))
'''

PEER_GONE = (r"mfscale\.train: error: rank {peer} \(pid (\d+) on \S+\) went away during a collective: "
             r"(?:Connection closed by peer|Read error) \[127\.0\.0\.1\]:\d+(?:: Connection reset by peer)? "
             r"\(seen by rank {me}\); see that rank's own output or the launcher's summary for why it stopped")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "data"
    assert prepare.main(["--synthetic", "tiny", "--out", str(out), "--quiet"]) == 0
    return out


def faulty_torchrun(tmp_path: Path, fault: str, args: list[str], rank: int = 1,
                    timeout: float = 180) -> tuple[subprocess.CompletedProcess, dict[int, str], dict[int, int]]:
    """Run the job on 2 ranks with ``fault`` on ``rank``: torchrun's result, each rank's stderr, each rank's exit
    code as torchrun's summary gives it (negative: killed by that signal)."""
    script = tmp_path / "faulty_train.py"
    script.write_text(FAULTY_TRAIN)
    logs = tmp_path / "logs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "FAULT": fault,
           "FAULT_RANK": str(rank), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--log-dir", str(logs), "--redirects", "3", str(script), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    stderr = {int(p.parent.name): p.read_text() for p in logs.glob("*/attempt_0/*/stderr.log")}
    codes = {int(r): int(c) for r, c in re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\n\s+exitcode\s+: (-?\d+)",
                                                     proc.stderr)}
    return proc, stderr, codes


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def torchrun_pid(stderr: str, rank: int) -> int:
    m = re.search(rf"rank\s+: {rank} \(local_rank: \d+\)\n\s+exitcode\s+: -?\d+ \(pid: (\d+)\)", stderr)
    assert m, stderr[-3000:]
    return int(m.group(1))


# -- a peer that goes away ------------------------------------------------------------------------------------
def test_killed_peer_is_one_line_on_the_survivor(tiny, tmp_path):
    """Rank 1 is killed (SIGKILL) at step 3 while rank 0 waits for it in a collective."""
    proc, stderr, codes = faulty_torchrun(tmp_path, "kill", ["--data", str(tiny), "--run-dir", str(tmp_path / "r"),
                                                             "--epochs", "2", "--train.timeout_s", "20"])
    assert proc.returncode != 0
    assert codes == {0: errors.EXIT_PEER, 1: -signal.SIGKILL}, proc.stderr[-3000:]
    line = last_line(stderr[0])
    m = re.fullmatch(PEER_GONE.format(peer=1, me=0), line)
    assert m, stderr[0][-3000:]
    assert int(m.group(1)) == torchrun_pid(proc.stderr, 1)  # the pid torchrun's summary names
    assert "Traceback" not in stderr[0] and stderr[0].count("mfscale.train: error:") == 1
    assert stderr[1] == ""  # killed: nothing to say


def test_known_error_on_one_rank_is_its_line_and_the_peer_line_on_the_other(tiny, tmp_path):
    """Rank 1 raises a DataError at step 3: its own line, exit 2, and that line in torchrun's summary as the root
    cause; rank 0, waiting for it in a collective, says that rank 1 went away (exit 3), not a gloo traceback."""
    proc, stderr, codes = faulty_torchrun(tmp_path, "bad_file", ["--data", str(tiny), "--run-dir",
                                                                 str(tmp_path / "r"), "--epochs", "2",
                                                                 "--train.timeout_s", "20"])
    assert proc.returncode != 0
    assert codes == {0: errors.EXIT_PEER, 1: errors.EXIT_USAGE}, proc.stderr[-3000:]
    own = "mfscale.train: error: train/part-00000.parquet is damaged: re-run python -m mfscale.prepare"
    assert stderr[1].strip() == own
    assert re.fullmatch(PEER_GONE.format(peer=1, me=0), last_line(stderr[0])), stderr[0][-3000:]
    assert "Traceback" not in stderr[0]
    # torchrun's summary carries rank 1's line (its error file); which rank it calls the root cause depends on
    # which exit it observed first, within the same second: a race, not asserted.
    summary = proc.stderr.split("Traceback (most recent call last)")[-1]  # torchrun's own, then its summary
    assert "Root Cause (first observed failure):" in summary and f"traceback : {own}" in summary, proc.stderr[-3000:]


def test_damaged_shard_on_two_ranks_of_one_host(tiny, tmp_path):
    """The blocks layout on 2 ranks of one host, a bit flipped in the training shard: the rank whose share of the
    shards holds it (Dataset.hash_share: each file hashed by one process of the host; the training shard, the
    largest, is local rank 0's) prints the damage line, exit 2; the other says that rank went away. Nothing is
    written."""
    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    path = data / "train" / "part-00000.parquet"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(raw)
    proc, stderr, codes = faulty_torchrun(tmp_path, "none", ["--data", str(data), "--run-dir", str(tmp_path / "r"),
                                                             "--epochs", "1", "--train.timeout_s", "20"])
    damage = (rf"mfscale\.train: error: {re.escape(str(path))} is damaged \(sha256 [0-9a-f]{{16}}\.\.\., the manifest "
              rf"says [0-9a-f]{{16}}\.\.\.\); re-run python -m mfscale\.prepare to rebuild {re.escape(str(data))}")
    assert codes[0] == errors.EXIT_USAGE, proc.stderr[-3000:]
    assert re.fullmatch(damage, stderr[0].strip()), stderr[0][-3000:]
    # Rank 1 reads the shard too: its read breaks on the bad bytes (an id out of range), and then it hashes the
    # file itself (Dataset.reading): the same line; or it waits in a collective for rank 0 (the peer line); or
    # torchrun stops it first (no line).
    expected = {errors.EXIT_USAGE: damage, errors.EXIT_PEER: PEER_GONE.format(peer=0, me=1), -signal.SIGTERM: ""}
    assert codes[1] in expected, proc.stderr[-3000:]
    assert re.fullmatch(expected[codes[1]], last_line(stderr[1])), stderr[1][-3000:]
    assert "Traceback" not in stderr[0] + stderr[1], stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_stuck_peer_is_a_timeout_line(tiny, tmp_path):
    """Rank 1 stops calling collectives at step 3 (alive, stuck): rank 0 gives up after --train.timeout_s with one
    line; then torchrun's SIGTERM lets rank 1 go on into a collective, which says that rank 0 went away."""
    proc, stderr, codes = faulty_torchrun(tmp_path, "stuck", ["--data", str(tiny), "--run-dir", str(tmp_path / "r"),
                                                              "--epochs", "2", "--train.timeout_s", "5"])
    assert proc.returncode != 0
    assert codes == {0: errors.EXIT_PEER, 1: errors.EXIT_PEER}, proc.stderr[-3000:]
    assert re.fullmatch(r"mfscale\.train: error: a collective timed out: Timed out waiting 5000ms for (?:recv|send) "
                        r"operation to complete \(seen by rank 0\); rank 1 \(pid \d+ on \S+\) did not answer in time: "
                        r"stopped, stuck or unreachable \(the limit is --train\.timeout_s\)",
                        last_line(stderr[0])), stderr[0][-3000:]
    if codes[1] == errors.EXIT_PEER:
        assert re.fullmatch(PEER_GONE.format(peer=0, me=1), last_line(stderr[1])), stderr[1][-3000:]
    assert "Traceback" not in stderr[0] + stderr[1], stderr


def test_each_rank_prints_its_line_before_torchrun_stops_it(tmp_path):
    """Both ranks find the data directory missing; rank 1 exits first, and torchrun sends SIGTERM to rank 0 while
    rank 0 is still leaving the process group (made 1.5 s slow here; under load it happened by chance). Rank 0's
    line must not be lost to that SIGTERM (tests/test_train.py::test_bad_data_dir_fails_on_every_rank_under_torchrun
    was flaky for this reason)."""
    proc, stderr, codes = faulty_torchrun(tmp_path, "slow_exit", ["--data", str(tmp_path / "missing"), "--run-dir",
                                                                  str(tmp_path / "r")], rank=0)
    line = (f"mfscale.train: error: data directory not found: {tmp_path / 'missing'} "
            "(run python -m mfscale.prepare first)")
    assert "Sending process" in proc.stderr and "closing signal SIGTERM" in proc.stderr  # torchrun did stop rank 0
    assert stderr == {0: line + "\n", 1: line + "\n"}, stderr
    assert codes == {0: errors.EXIT_USAGE, 1: errors.EXIT_USAGE}, proc.stderr[-3000:]


GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
               "[127.0.0.1]:14040. This is typically caused by a remote worker crashing. Check the logs of the remote "
               "worker before reporting an error. GLHF! \N{BEACH WITH UMBRELLA}")
GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:17580: "
              "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the "
              "application. Check the logs of the remote worker before reporting an error. GLHF!")
GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                "20000ms for recv operation to complete")


def test_peer_failure_reads_what_the_backends_say():
    """The messages gloo gave here (torch 2.13, plain RuntimeError), DDP's wrapping of one, and torch's DistError
    types; a RuntimeError that is not about a peer keeps its traceback."""
    assert peer_failure(RuntimeError(GLOO_CLOSED)) == ("gone", "Connection closed by peer [127.0.0.1]:14040",
                                                       "127.0.0.1")
    assert peer_failure(RuntimeError(GLOO_RESET)) == ("gone", "Read error [127.0.0.1]:17580: Connection reset by "
                                                              "peer", "127.0.0.1")
    ddp = RuntimeError("Got the following error when running the callback: RuntimeError: " + GLOO_RESET)
    assert peer_failure(ddp) == peer_failure(RuntimeError(GLOO_RESET))
    assert peer_failure(RuntimeError(GLOO_TIMEOUT)) == ("timeout", "Timed out waiting 20000ms for recv operation to "
                                                                   "complete", None)
    assert peer_failure(RuntimeError("Application timeout caused pair closure")).kind == "timeout"
    nccl = torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or "
                                              "there was a network error, NCCL version 2.21.5\nncclRemoteError: ...")
    assert peer_failure(nccl).kind == "gone"
    store = torch.distributed.DistNetworkError("Connection reset by peer")
    assert peer_failure(store).kind == "gone"
    wrapped = ValueError("while saving")
    wrapped.__cause__ = RuntimeError(GLOO_CLOSED)
    assert peer_failure(wrapped).kind == "gone"
    assert peer_failure(RuntimeError("DataLoader timed out after 5 seconds")) is None
    assert peer_failure(RuntimeError("Tensors must be contiguous")) is None
    assert peer_failure(OSError(errno.ECONNRESET, "Connection reset by peer")) is None  # not from a collective


# -- a full disk ------------------------------------------------------------------------------------------------
def fill(directory: Path, leave: int = 0) -> Path:
    """Fill ``directory``'s file system until ``leave`` bytes (a multiple of its 4 KiB pages) are free."""
    filler = directory / "filler"
    with open(filler, "ab", buffering=0) as f:
        try:
            f.write(b"\0" * max(shutil.disk_usage(directory).free - leave, 0))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_disk_full_line(tmp_path):
    assert re.fullmatch(rf"no space left in {re.escape(str(tmp_path))}: writing metrics\.json needs 12,345 bytes, "
                        r"\d{1,3}(,\d{3})* bytes are free; free some space or write elsewhere",
                        str(disk_full(tmp_path, 12_345, "writing metrics.json")))
    assert str(disk_full("/nonexistent", 12_345, "writing metrics.json")) == (
        "no space left in /nonexistent: writing metrics.json needs 12,345 bytes, free space unknown; free some space "
        "or write elsewhere")
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert str(disk_full("/nonexistent", 5, "the checkpoint", exc=quota, about=True)) == (
        "disk quota exceeded in /nonexistent: the checkpoint needs about 5 bytes, free space unknown; free some space "
        "or write elsewhere")
    assert str(disk_full("/nonexistent", None, "writing TensorBoard events")) == (
        "no space left in /nonexistent: writing TensorBoard events does not fit, free space unknown; free some space "
        "or write elsewhere")


def test_is_disk_full_on_a_full_tmpfs(small_tmpfs, tmp_path):
    """What writes raise on a full disk: Python's, torch.save's (to a path: no errno, only "unexpected pos"; to a
    file object: that, caused by the OSError; the legacy format: the errno in words)."""
    fill(small_tmpfs)
    t = {"w": torch.zeros(100_000)}

    def to_file(p: Path, **kw) -> None:
        with open(p, "wb") as f:
            torch.save(t, f, **kw)

    raised: dict[str, BaseException] = {}
    for name, write in {
        "open().write": lambda p: p.write_bytes(b"x" * 100_000),
        "torch.save(path)": lambda p: torch.save(t, p),
        "torch.save(file)": to_file,
        "torch.save(legacy)": lambda p: to_file(p, _use_new_zipfile_serialization=False),
    }.items():
        path = small_tmpfs / name
        with pytest.raises(Exception) as info:  # noqa: PT011 - which type is what this test finds out
            write(path)
        raised[name] = info.value
        assert is_disk_full(info.value, small_tmpfs), (name, repr(info.value))
        path.unlink(missing_ok=True)
    assert "unexpected pos" in str(raised["torch.save(path)"])
    assert not is_disk_full(raised["torch.save(path)"])  # only with the directory to look at
    assert not is_disk_full(raised["torch.save(path)"], tmp_path)  # a roomy disk: a short write for another reason
    assert is_disk_full(raised["torch.save(file)"]) and is_disk_full(raised["torch.save(legacy)"])
    assert is_disk_full(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    assert is_disk_full(RuntimeError("parquet: underlying IO error: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_json_and_text_on_a_full_disk_are_one_line_and_keep_the_old_file(small_tmpfs):
    path = small_tmpfs / "metrics.json"
    write_json_atomic(path, {"old": True})
    fill(small_tmpfs, leave=4096)
    big = {"history": list(range(3000))}
    needed = len((json.dumps(big, indent=2) + "\n").encode())
    with pytest.raises(DataError) as info:
        write_json_atomic(path, big)
    free = shutil.disk_usage(small_tmpfs).free
    assert free == 4096  # the partial temporary file is gone
    assert str(info.value) == (f"no space left in {small_tmpfs}: writing metrics.json needs {needed:,} bytes, 4,096 "
                               "bytes are free; free some space or write elsewhere")
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler", "metrics.json"]
    (small_tmpfs / "filler").unlink()
    write_text_atomic(path, "{}\n")  # room again: written as usual
    assert path.read_text() == "{}\n"


TENSORBOARD_ON_A_FULL_DISK = '''
import errno, shutil, sys
from pathlib import Path
from mfscale.errors import DataError
from mfscale.monitor import Monitor

log = Path(sys.argv[1]) / "tb"
mon = Monitor(log, enabled=True)
mon.scalars(1, {"train/loss": 1.0})
mon.flush()
with open(log.parent / "filler", "wb", buffering=0) as f:  # the disk is full now
    try:
        f.write(bytes(shutil.disk_usage(log).free + 4096))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
try:
    for step in range(2, 200):  # the event file's last page takes a few records before it is full
        mon.scalars(step, {"train/loss": float(step), "val/rmse": 1.0})
        mon.text_config({"x": "y" * 1000})
    mon.flush()
except DataError as exc:
    print(exc)
mon.scalars(300, {"train/loss": 3.0})  # the writer is gone: later calls write nothing and raise nothing
mon.close()
'''


def test_tensorboard_on_a_full_disk_is_one_line_and_keeps_the_events_written(small_tmpfs):
    """SummaryWriter writes from a background thread: on a full disk that thread dies (Python's own
    threading.excepthook, which a subprocess has and pytest replaces, does not print its traceback) and the next
    call raises the one line; the events written before stay readable."""
    proc = subprocess.run([sys.executable, "-c", TENSORBOARD_ON_A_FULL_DISK, str(small_tmpfs)], capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                                          "")])})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    log = small_tmpfs / "tb"
    assert proc.stdout == (f"no space left in {log}: writing TensorBoard events does not fit in the 0 bytes that are "
                           "free; free some space or write elsewhere\n")
    assert read_scalars(log)["train/loss"][0] == (1, 1.0)


def test_projector_on_a_full_disk_removes_its_partial_files(small_tmpfs):
    log = small_tmpfs / "tb"
    mon = Monitor(log, enabled=True)
    labels = [{"title": f"movie {i}", "year": 2000} for i in range(2000)]
    mon.embeddings(torch.zeros(2000, 4), labels, tag="movies", step=0)
    mon.flush()
    config = (log / "projector_config.pbtxt").read_bytes()
    fill(small_tmpfs, leave=8192)
    with pytest.raises(DataError) as info:
        mon.embeddings(torch.randn(2000, 64), labels, tag="movies", step=1)
    assert str(info.value) == (f"no space left in {log}: writing the TensorBoard projector's files does not fit in "
                               "the 8,192 bytes that are free; free some space or write elsewhere")
    assert not (log / "00001").exists()
    assert (log / "projector_config.pbtxt").read_bytes() == config
    mon.close()


def test_a_full_disk_nobody_handled_is_still_one_line(tmp_path, capsys):
    """cli_entry's safety net for a write that no caller turned into errors.disk_full(): exit 2, one line."""
    @errors.cli_entry("prog")
    def main(exc: BaseException) -> int:
        raise exc

    target = tmp_path / "out" / "x.bin"
    target.parent.mkdir()
    for exc, line in [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)),
         rf"prog: error: no space left in {re.escape(str(target.parent))}: writing x\.bin does not fit in the "
         r"\d{1,3}(,\d{3})* bytes that are free; free some space or write elsewhere"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3776 vs 3696"),  # caused by:
         r"prog: error: no space left on device: a file could not be written; free some space or write elsewhere"),
    ]:
        exc.__context__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if isinstance(exc, RuntimeError) else None
        with pytest.raises(SystemExit) as info:
            main(exc)
        assert info.value.code == errors.EXIT_USAGE
        assert re.fullmatch(line, capsys.readouterr().err.strip())
    with pytest.raises(RuntimeError):  # a short write on a roomy disk, with no OSError behind it: a traceback
        main(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3776 vs 3696"))

"""Process-group lifecycle. Rank and world size come from torchrun's environment, never from globals."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1  # processes of this job on this host (torchrun's LOCAL_WORLD_SIZE)
    # Collectives this rank has joined, by kind (benchmarks and metrics.json: how many per epoch).
    collectives: Counter = field(default_factory=Counter, compare=False, repr=False)

    def count(self, kind: str, n: int = 1) -> None:
        """Record ``n`` collectives (or send/recv exchanges) of ``kind`` joined by this rank."""
        if self.world_size > 1:
            self.collectives[kind] += n

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer") from None


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but CUDA is not available")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init(device: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Join the process group torchrun describes (plain ``python`` runs as a world of one).

    NCCL on CUDA, gloo on CPU; both run the same collectives (see sync.py). The timeout turns a rank
    that died or hangs into an error on the others instead of a hang.
    """
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", 1)
    dev = pick_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        _record_peers(rank, world)
    return DistEnv(rank, world, local, dev, local_world)


# Every rank's host and pid, gathered once when the group is formed, so that a rank whose collective failed because
# a peer went away can name it (errors.cli_entry's one line; torchrun's summary lists pids).
_PEERS: list[tuple[str, int]] = []
_RANK: int | None = None


def _record_peers(rank: int, world: int) -> None:
    global _RANK
    mine = (socket.gethostname(), os.getpid())
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)  # one collective at start-up, not counted in DistEnv.collectives
    _PEERS[:] = [(str(host), int(pid)) for host, pid in everyone]
    _RANK = rank


def this_rank() -> int | None:
    """This process's rank in the last process group it joined through init(), None before."""
    return _RANK


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (a zombie, one that has exited, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True
    return stat[stat.rindex(")") + 2] not in "ZX"


def _named(rank: int) -> str:
    host, pid = _PEERS[rank]
    return f"rank {rank} (pid {pid} on {host})"


def describe_peer(address: str | None = None, wait_s: float = 0.5) -> str | None:
    """Which rank went away, as far as this process can tell, e.g. ``rank 1 (pid 4242 on node7)``; None if unknown.

    With two ranks it is the other one. With more: the ranks on this host whose process has ended (waiting up to
    ``wait_s`` for one to: a peer's sockets close a moment before its process is gone), else, for a loopback
    ``address``, the other ranks on this host as candidates. A peer on another host is named only by the address
    the backend gave.
    """
    if _RANK is None or len(_PEERS) < 2:
        return None
    others = [r for r in range(len(_PEERS)) if r != _RANK]
    if len(others) == 1:
        return _named(others[0])
    host = _PEERS[_RANK][0]
    local = [r for r in others if _PEERS[r][0] == host]
    deadline = time.monotonic() + wait_s
    while local:
        dead = [r for r in local if not _pid_alive(_PEERS[r][1])]
        if dead:
            return ", ".join(_named(r) for r in dead)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if address and local and (address.startswith("127.") or address == "::1"):
        return f"a rank on this host ({host}: one of ranks {', '.join(map(str, local))})"
    return None


def destroy() -> None:
    """Leave the process group; on a normal exit, only once every rank is done and this rank's threads are idle.

    Ranks other than 0 have nothing to write and used to go straight from their last collective into
    interpreter shutdown. Gloo's worker threads drop a finished collective's tensors a moment after the
    caller has woken up, and DDP keeps the process group (and so those threads) alive past
    destroy_process_group. A worker that dropped a tensor whose Python object was already gone took the GIL
    after finalization had begun; Python ended the thread inside a noexcept destructor and the process
    aborted ("terminate called without an active exception", SIGABRT: 2 of 40 two-process CPU jobs). So:
    a barrier (no rank leaves while another is still in a collective or writing), then wait, GIL released,
    until no other thread of this process is runnable, i.e. each has finished what it was doing. Skipped
    when an exception is propagating (called from a ``finally``): the other ranks may never get there.
    """
    if not dist.is_initialized():
        return
    clean_exit = sys.exc_info()[0] is None and dist.get_world_size() > 1
    if clean_exit:
        dist.barrier()  # a peer that went away after its last collective fails here: errors.cli_entry's one line
    try:
        dist.destroy_process_group()
    except Exception:
        if clean_exit:
            raise
        # An error is already on its way out (often a peer that went away): leaving a broken group must not add a
        # second traceback to that error's one line.
    if clean_exit:
        wait_for_idle_threads()


def _runnable_threads() -> int | None:
    """Threads of this process other than the calling one that are running or waiting for a CPU (Linux)."""
    me = str(threading.get_native_id())
    try:
        tids = [t for t in os.listdir("/proc/self/task") if t != me]
    except OSError:
        return None
    runnable = 0
    for tid in tids:
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        runnable += stat[stat.rindex(")") + 2] == "R"  # the state follows the parenthesised name
    return runnable


def wait_for_idle_threads(timeout_s: float = 5.0, poll_s: float = 0.01, quiet_polls: int = 3) -> bool:
    """Sleep until no other thread is runnable in quiet_polls polls in a row (at most timeout_s); False on timeout.

    A thread waiting for the GIL sleeps too, but each poll's sleep releases the GIL and wakes it, so it
    shows as runnable at a later poll unless it has finished. Where /proc is missing this only sleeps once.
    """
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        n = _runnable_threads()
        if n is None:
            return True
        quiet = quiet + 1 if n == 0 else 0
        if quiet == quiet_polls:
            return True
    return False


def all_reduce_sum(env: DistEnv, t: torch.Tensor) -> torch.Tensor:
    if env.distributed:
        env.count("all_reduce")
        dist.all_reduce(t)
    return t


def gather(env: DistEnv, mine: Any) -> list[Any]:
    """Every rank's value of ``mine`` (a picklable object), in rank order."""
    if not env.distributed:
        return [mine]
    out: list[Any] = [None] * env.world_size
    env.count("all_gather")
    dist.all_gather_object(out, mine)
    return out


def broadcast_object(env: DistEnv, obj: object) -> object:
    """Rank 0's value on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    env.count("broadcast")
    dist.broadcast_object_list(box, src=0)
    return box[0]


def synchronize(env: DistEnv) -> None:
    """Wait for this rank's device to finish its queued work (a no-op on a CPU), e.g. before reading a clock."""
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)


# Stop on a signal (SLURM's --signal=B:USR1@T, relayed by srun and torchrun; SIGTERM from scancel, a time
# limit or torchrun's own shutdown): the handler only records it; at the next sync point of the loop
# (TableLayout.sync_point: every 10th step with replicated tables, each sub-epoch's end with blocks, every step
# on one process) every rank agrees (StopSignal.requested), rank 0 checkpoints and the job exits 0 without
# metrics.json: a clean stop, not a failure, so torchrun does not restart workers that the scheduler is about
# to stop. The launcher (launch/slurm/train.sbatch) requeues, and the next run resumes from that checkpoint.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopSignal:
    """Records the first stop signal while installed; the handler does nothing else (async-signal safe)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum

    def install(self) -> None:
        # signal.signal only works in the main thread; elsewhere (tests, notebooks) stopping is not offered.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
            for s in STOP_SIGNALS:
                signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def requested(self, env: DistEnv) -> bool:
        """Whether any rank got a stop signal. A collective when distributed (call it where every rank does, at
        the same step), so all stop at the same step."""
        if not env.distributed:
            return self.signum != 0
        flag = torch.tensor([self.signum], dtype=torch.int32, device=env.device)
        env.count("all_reduce")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

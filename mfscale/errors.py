"""User-facing errors: one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

F = TypeVar("F", bound=Callable[..., int | None])

EXIT_USAGE = 2
# A peer rank went away or stopped answering during a collective: not bad input (2), and non-zero, so torchrun
# --max-restarts restarts the workers as for any failure.
EXIT_PEER = 3


class MfscaleError(Exception):
    """An error caused by the user's input or environment; its message is shown as one line."""


class DataError(MfscaleError):
    """Input data is missing, malformed or inconsistent."""


class DownloadError(MfscaleError):
    """A download failed or its checksum did not match."""


class ConfigError(MfscaleError):
    """A configuration value or flag is invalid."""


def one_line(msg: object) -> str:
    return " ".join(str(msg).split())


def _chain(exc: BaseException | None):
    """``exc`` and what caused it (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


# -- a full disk or quota --------------------------------------------------------------------------------------
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# What torch's zip writer (torch.save) says when a write came up short: to a path, without an errno
# ("unexpected pos 576 vs 534", caused by "basic_ios::clear: iostream error"); through a Python file object the
# OSError(ENOSPC) is its __context__ and is found as such. Also the reason for any other failed write.
_SHORT_WRITE = ("unexpected pos", "pytorchstreamwriter failed writing", "basic_ios::clear", "file write failed")
_NEARLY_FULL_BYTES = 1 << 20


def disk_full_errno(exc: BaseException, directory: str | os.PathLike | None = None) -> int | None:
    """ENOSPC or EDQUOT when ``exc`` (or what caused it) says the disk or the quota is full, else None.

    Python and pyarrow raise OSError with the errno; polars and torch's legacy writer only say it in words
    ("... No space left on device (os error 28)", "write(): fd 3 failed with No space left on device"). torch.save
    to a path says only that a write came up short (``[enforce fail at inline_container.cc:672] . unexpected pos
    576 vs 534``): that counts as ENOSPC when ``directory`` is given and has less than 1 MiB free, so ask before
    removing the partial file.
    """
    short_write = False
    for cur in _chain(exc):
        if isinstance(cur, OSError) and cur.errno in DISK_FULL_ERRNOS:
            return cur.errno
        text = str(cur)
        for code in DISK_FULL_ERRNOS:
            if f"(os error {code})" in text or os.strerror(code) in text:
                return code
        short_write = short_write or any(s in text.lower() for s in _SHORT_WRITE)
    if short_write and directory is not None:
        try:
            if shutil.disk_usage(directory).free < _NEARLY_FULL_BYTES:
                return errno.ENOSPC
        except OSError:
            pass
    return None


def is_disk_full(exc: BaseException, directory: str | os.PathLike | None = None) -> bool:
    """Whether ``exc`` says the disk or the quota is full (see ``disk_full_errno``)."""
    return disk_full_errno(exc, directory) is not None


def disk_full(directory: str | os.PathLike, needed_bytes: int | None, what: str, *,
              exc: BaseException | None = None, about: bool = False) -> DataError:
    """The one line for a full disk, as a DataError to raise (exit code 2)::

        no space left in DIR: writing metrics.json needs 2,345 bytes, 0 bytes are free; free some space or write
        elsewhere

    ``what`` is what did not fit ("writing metrics.json", "the checkpoint"); ``needed_bytes`` None when unknown
    ("... does not fit in the 0 bytes that are free"); ``about`` for an estimate ("needs about N bytes"). The free
    bytes are counted now: remove the partial file first, so they are what a new try has. "disk quota exceeded"
    instead of "no space left" when ``exc`` says EDQUOT.
    """
    try:
        free: int | None = shutil.disk_usage(directory).free
    except OSError:
        free = None
    code = disk_full_errno(exc) if exc is not None else None
    full = "disk quota exceeded" if code == errno.EDQUOT else "no space left"
    free_text = f"{free:,} bytes are free" if free is not None else "free space unknown"
    if needed_bytes is not None:
        needs = f"{what} needs {'about ' if about else ''}{needed_bytes:,} bytes, {free_text}"
    elif free is not None:
        needs = f"{what} does not fit in the {free:,} bytes that are free"
    else:
        needs = f"{what} does not fit, free space unknown"
    return DataError(f"{full} in {directory}: {needs}; free some space or write elsewhere")


# -- a peer rank that went away -----------------------------------------------------------------------------------
class PeerFailure(NamedTuple):
    kind: str  # "gone": a peer closed or reset its connection; "timeout": no answer within the timeout
    reason: str  # the backend's own words, shortened: "Connection closed by peer [127.0.0.1]:5355"
    address: str | None  # the peer's address when the backend names it: "127.0.0.1"


# What gloo, NCCL and the c10d store say, lower-cased. Gloo raises a plain RuntimeError ("[.../pair.cc:553]
# Connection closed by peer [127.0.0.1]:5355. This is typically caused by a remote worker crashing. ...", "Read
# error [127.0.0.1]:5355: Connection reset by peer", "[.../unbound_buffer.cc:78] Timed out waiting 20000ms for recv
# operation to complete", then "Application timeout caused pair closure"); NCCL and the store raise
# torch.distributed.DistError's subclasses (DistBackendError, DistNetworkError, DistStoreError).
_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "socket closed",
         "connection refused", "remote process exited", "communicator was aborted", "connection was likely closed",
         "remote peer crash", "no route to host", "network is unreachable")
_TIMEOUT = ("timed out", "timeout")
_BACKEND_WORDS = ("gloo", "nccl", "c10d", "pair closure", "tcpstore")
_SOURCE_LOCATION = re.compile(r"\[[^\]\s]*\.(?:cc|cpp|h|hpp):\d+\]\s*")
_PEER_ADDRESS = re.compile(r"\[([0-9A-Fa-f.:]+)\]:(\d+)")


def _from_torch_distributed(exc: BaseException) -> bool:
    if any(c.__name__ == "DistError" and c.__module__.startswith("torch") for c in type(exc).__mro__):
        return True
    tb = exc.__traceback__
    while tb is not None:
        if f"torch{os.sep}distributed{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return any(w in str(exc).lower() for w in _BACKEND_WORDS)


def _short_reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    marks = list(_SOURCE_LOCATION.finditer(text))  # "[.../pair.cc:553] ", maybe inside DDP's "Got the following
    if marks:  # error when running the callback: RuntimeError: [...]": the backend's own words follow the last one
        text = text[marks[-1].end():]
    text = text.split(". ")[0].rstrip(". ")  # gloo adds "This is typically caused by ... GLHF!"
    return one_line(text)[:300] or type(exc).__name__


def peer_failure(exc: BaseException) -> PeerFailure | None:
    """What ``exc`` (or what caused it) says when a collective failed because a peer rank closed its connection,
    reset it or did not answer in time; None for anything else (a bug's RuntimeError keeps its traceback)."""
    for cur in _chain(exc):
        if not isinstance(cur, RuntimeError) or not _from_torch_distributed(cur):
            continue
        text = str(cur).lower()
        kind = "gone" if any(w in text for w in _GONE) else "timeout" if any(w in text for w in _TIMEOUT) else None
        if kind is not None:
            m = _PEER_ADDRESS.search(str(cur))
            return PeerFailure(kind, _short_reason(cur), m.group(1) if m else None)
    return None


def _peer_line(failure: PeerFailure) -> str:
    """The sentence after ``prog: error:`` for a failed collective, naming the peer where this process knows it
    (mfscale.distributed records every rank's host and pid when it joins the group)."""
    dist_mod = sys.modules.get("mfscale.distributed")
    who, me = None, None
    if dist_mod is not None:
        try:
            who, me = dist_mod.describe_peer(failure.address), dist_mod.this_rank()
        except Exception:  # naming the peer is a courtesy: never a second traceback
            who = None
    seen = f" (seen by rank {me})" if me is not None else ""
    if failure.kind == "gone":
        peer = who or (f"a peer at {failure.address}" if failure.address else "a peer rank")
        return (f"{peer} went away during a collective: {failure.reason}{seen}; see that rank's own output or the "
                f"launcher's summary for why it stopped")
    peer = who or "a peer rank"
    return (f"a collective timed out: {failure.reason}{seen}; {peer} did not answer in time: stopped, stuck or "
            f"unreachable (the limit is --train.timeout_s)")


def _known_line(prog: str, exc: BaseException) -> tuple[str, int, bool] | None:
    """(the one line, the exit code, whether this process is a root cause) for an error shown without a
    traceback; None for anything else."""
    if isinstance(exc, MfscaleError):
        return f"{prog}: error: {one_line(exc)}", EXIT_USAGE, True
    if isinstance(exc, PermissionError | FileNotFoundError | IsADirectoryError | NotADirectoryError):
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        return f"{prog}: error: {exc.strerror or exc}{where}", EXIT_USAGE, True
    failure = peer_failure(exc)
    if failure is not None:
        return f"{prog}: error: {one_line(_peer_line(failure))}", EXIT_PEER, False
    code = disk_full_errno(exc) if isinstance(exc, OSError | RuntimeError) else None
    if code is not None:  # a write that no caller turned into disk_full(): still one line, and what is known
        name = next((c.filename for c in _chain(exc) if isinstance(c, OSError) and c.filename), None)
        if name:
            line = str(disk_full(Path(os.fsdecode(name)).parent, None, f"writing {Path(os.fsdecode(name)).name}",
                                 exc=exc))
        else:
            full = "disk quota exceeded" if code == errno.EDQUOT else "no space left on device"
            line = f"{full}: a file could not be written; free some space or write elsewhere"
        return f"{prog}: error: {one_line(line)}", EXIT_USAGE, True
    return None


def _write_launcher_error_file(line: str) -> None:
    """torchrun's summary shows a failed worker's error file ("traceback : ..."): put this process's one line
    there, in the format torch.distributed.elastic's own @record writes, instead of "To enable traceback see ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data))
    except OSError:
        pass


class _Reporter:
    """Prints a process's one line at most once, as soon as it is known, and keeps a launcher's SIGTERM from
    silencing it.

    torchrun stops the other workers with SIGTERM as soon as one exits. A rank that is itself on its way out with
    an error (say both ranks found the data directory missing, and rank 1 was quicker) would die between the
    training loop's ``finally`` (which restores the default SIGTERM action) and printing its line: its line was
    missing now and then under load. While this process is one rank of several, a SIGTERM that comes while an
    exception is on its way out prints that exception's line at once and lets the exit finish; a SIGTERM at any
    other time acts as it would without this handler.
    """

    def __init__(self, prog: str):
        self.prog = prog
        self.reported = False
        self._previous: object = None
        self._installed = False

    def emit(self, line: str, root_cause: bool) -> None:
        if self.reported:
            return
        self.reported = True
        if root_cause:
            _write_launcher_error_file(line)
        with contextlib.suppress(OSError, ValueError, RuntimeError):  # stderr closed or re-entered: nothing to do
            print(line, file=sys.stderr, flush=True)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        exc = sys.exc_info()[1]
        if self.reported and isinstance(exc, SystemExit):  # its line is out, its exit code on the way
            return
        if exc is None or isinstance(exc, SystemExit | KeyboardInterrupt):
            previous = self._previous
            if callable(previous):
                previous(signum, frame)
            elif previous != signal.SIG_IGN:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        known = _known_line(self.prog, exc)
        if known is not None and not os.environ.get("MFSCALE_TRACEBACK"):
            self.emit(known[0], known[2])
        # else: a traceback is on its way; let it print

    def install(self) -> None:
        try:
            several = int(os.environ.get("WORLD_SIZE", "1")) > 1
        except ValueError:
            several = False
        if several and threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True

    def restore(self) -> None:
        """Put the previous SIGTERM action back; once this process has printed its line and is exiting with its
        code, ignore SIGTERM instead, so a launcher stopping the other workers does not turn exit code 2 or 3 into
        "killed by SIGTERM" (-15) during interpreter shutdown."""
        if self._installed:
            previous = self._previous if self._previous is not None else signal.SIG_DFL
            signal.signal(signal.SIGTERM, signal.SIG_IGN if self.reported else previous)
            self._installed = False


def cli_entry(prog: str) -> Callable[[F], F]:
    """Wrap a ``main(argv)`` so user errors print ``prog: error: ...`` and exit non-zero.

    Bad input or environment (MfscaleError, a missing or unreadable file) exits 2; a collective that failed because
    a peer rank went away or did not answer in time exits 3 (EXIT_PEER) with a line naming the peer where known.
    Set MFSCALE_TRACEBACK=1 to see the full traceback when debugging.
    """

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            reporter = _Reporter(prog)
            reporter.install()
            try:
                return fn(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                raise SystemExit(130) from None
            except Exception as exc:
                known = _known_line(prog, exc)
                if known is None or os.environ.get("MFSCALE_TRACEBACK"):
                    raise
                reporter.emit(known[0], known[2])
                if known[1] == EXIT_PEER:
                    # The process group is broken: skip interpreter shutdown, where gloo's threads, still holding a
                    # dead peer's pairs, sometimes abort the process (SIGABRT, exit -6: 1 run in 8 here) after the
                    # line was printed.
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(EXIT_PEER)
                raise SystemExit(known[1]) from None
            finally:
                reporter.restore()

        return wrapper  # type: ignore[return-value]

    return deco

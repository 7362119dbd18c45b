"""The fused training step as one C++ op on the CPU (``mfscale/csrc/fused_step.cpp``).

Computes exactly what ``BiasedMF.closed_form_grads`` + ``LazyAdam`` compute (SparseAdam's update, in its operation
order), or, to rounding, ``+ RowRMSprop``, but visits each touched row once instead of making a dozen passes over
the batch and the rows; see the source for how. It applies where a rank's batch gradient is the whole gradient of
the rows it touches: one process, or the blocks layout (no gradient exchange between ranks).

The op is compiled on first use with torch's own extension builder (``torch.utils.cpp_extension``: a C++
compiler and ninja, which ``pip install -e .`` brings), cached under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) in a directory named by a digest of the source, the flags, the torch and Python
builds and the CPU, and loaded from there afterwards. It is built for the machine's own CPU
(``-march=native``), so nodes of a cluster sharing a home directory never load a binary built for another
CPU, and two environments never share a build.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "fused_step.cpp"
_LOADED: dict[str, bool] = {}  # per process: the op library is loaded once


class KernelUnavailable(RuntimeError):
    """The C++ op could not be built or loaded (no compiler, no ninja, a failed build)."""


def _cpu_key() -> str:
    """A short digest of what -march=native compiles for: the CPU's model name and feature flags."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        text += "".join(sorted(set(lines)))
    except OSError:
        text += platform.processor()
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _ninja_on_path() -> None:
    """Put the ninja of the ``ninja`` wheel on PATH when none is there (cpp_extension runs ``ninja``)."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # the PyPI wheel: a binary in its BIN_DIR
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]  # no errno check: sqrt vectorizes


def _build_name() -> str:
    """The op's cache directory name: one build per source, flags, torch/Python build and CPU."""
    # The source's path too: ninja's build file names it, so two checkouts sharing a build would rebuild in turn.
    key = "|".join([str(SOURCE.resolve()), SOURCE.read_text(encoding="utf-8"), " ".join(CFLAGS), torch.__version__,
                    str(torch.version.cuda),
                    platform.python_implementation(), platform.python_version(), _cpu_key()])
    return f"mfscale_fused_step_{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _load_locked(build: Path, verbose: bool) -> None:
    """cpp_extension.load under an OS file lock on ``build``.

    torch's builder lets one process build while the others wait for its lock file to go away, with no time
    limit, so a build killed mid-way (Ctrl-C, kill -9, a job's time limit) would make every later job wait
    forever. Holding an flock (released by the kernel when its holder dies) around the whole load means no
    live mfscale process can be building here, so a torch lock file found now is stale and removed.
    """
    from torch.utils import cpp_extension

    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock only
        fcntl = None
    with open(build / "mfscale.flock", "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
            stale = build / "lock"
            if stale.exists():
                log.warning("removing a build lock left by an interrupted build: %s", stale)
                stale.unlink(missing_ok=True)
        cpp_extension.load(name=build.name, sources=[str(SOURCE)], is_python_module=False, verbose=verbose,
                           build_directory=str(build), extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"])


def load(verbose: bool = False) -> None:
    """Build (first time on this machine) and load the op; raises KernelUnavailable with the reason."""
    if _LOADED.get("ok"):
        return
    from torch.utils import cpp_extension

    _ninja_on_path()
    try:
        root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
        build = root / _build_name()
        build.mkdir(parents=True, exist_ok=True)
        _load_locked(build, verbose)
    except Exception as exc:  # the builder raises many kinds (no compiler, no ninja, compile errors, OSError)
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        # the builder's message starts with the compile command: the compiler's first error says more
        errors = [ln for ln in lines if "error" in ln.lower()]
        why = (errors[1] if len(errors) > 1 and lines and errors[0] == lines[0] else (errors or lines or [""])[0])
        raise KernelUnavailable(f"{type(exc).__name__}: {why[:300]}") from exc
    for op in ("fused_step", "sgd_step", "time_target", "time_step"):
        if not hasattr(torch.ops.mfscale, op):
            raise KernelUnavailable(f"the built library does not define mfscale::{op}")
    _LOADED["ok"] = True


def fused_step(users: torch.Tensor, items: torch.Tensor, moments_u: tuple[torch.Tensor, torch.Tensor | None],
               moments_i: tuple[torch.Tensor, torch.Tensor | None], user: torch.Tensor, item: torch.Tensor,
               rating: torch.Tensor, global_bias: float, scale: float, col_weights: torch.Tensor,
               step_sizes: tuple[float, float], betas: tuple[float, float], eps: float,
               scratch: dict[str, torch.Tensor], *, max_norm: float = 0.0, biases: bool = True,
               row_wise: bool = False, days: tuple[torch.Tensor, torch.Tensor, float, float] | None = None,
               errors: torch.Tensor | None = None, user_prior: torch.Tensor | None = None) -> tuple[float, float]:
    """One step in place on both tables and their optimizer state; returns (sum of coef, sum of squared errors).

    coef = (prediction - rating) * ``scale``; the global bias's gradient is the first return value.
    ``user``, ``item`` and the day rows: int32 (the job's batches, used as they are) or int64 (narrowed in the op
    once checked in range). ``col_weights``: the L2 weight per column times ``scale``. ``scratch``: a dict kept by the
    caller between steps (per-table marks and the op's work memory, allocated once and grown when needed).
    ``max_norm`` > 0: the touched rows' factor vectors are first renormalized in place (``nn.Embedding(max_norm=...)``);
    ``biases`` False: the bias column gets a zero gradient (plain MF; the first return value is then unused).
    ``moments_*``: Adam's (exp_avg, exp_avg_sq); with ``row_wise``, RowRMSprop's (row_sq, None). ``days``: the user-day
    biases ``(DayBias.table, each rating's row, step size, 2 reg_day / G)``: the step fits rating - bias and then
    steps the biases from its errors (``DayBias.update``'s arithmetic), in the same op. ``errors``: a tensor of one
    value per rating (the tables' dtype) that receives each rating's error, prediction - target (the time-aware
    biases' gradient, ``mfscale.timebias``). ``user_prior``: (user rows, dim), what each user row's factor columns are
    pulled toward by their L2 instead of 0 (implicit feedback, ``mfscale.implicit``).
    """
    load()
    for name, table in (("users", users), ("items", items)):
        mark = scratch.get(f"mark_{name}")
        if mark is None or mark.numel() != table.shape[0]:
            scratch[f"mark_{name}"] = torch.zeros(table.shape[0], dtype=torch.int32)
    work = scratch.get("work")
    if work is None or work.dtype != users.dtype:
        work = scratch["work"] = torch.empty(0, dtype=users.dtype)  # the op grows it to what a step needs
    unused = scratch.get("unused")
    if unused is None or unused.dtype != users.dtype:
        unused = scratch["unused"] = torch.empty(0, dtype=users.dtype)
    out = torch.ops.mfscale.fused_step(
        users, items, moments_u[0], moments_u[1] if moments_u[1] is not None else unused, moments_i[0],
        moments_i[1] if moments_i[1] is not None else unused, user, item, rating, global_bias, scale, col_weights,
        step_sizes[0], step_sizes[1], betas[0], betas[1], eps, scratch["mark_users"], scratch["mark_items"], work,
        float(max_norm), bool(biases), bool(row_wise),
        *((days[0], days[1], float(days[2]), float(days[3])) if days is not None and user.numel() else
          (unused, unused.new_empty(0, dtype=torch.int64), 0.0, 0.0)),
        errors if errors is not None else unused, user_prior if user_prior is not None else unused)
    coef_sum, sse = out.tolist()
    return coef_sum, sse


def sgd_step(users: torch.Tensor, items: torch.Tensor, user: torch.Tensor, item: torch.Tensor, rating: torch.Tensor,
             global_bias: float, lr: float, reg_factor: float, reg_bias: float, *, biases: bool = True,
             days: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> tuple[float, float]:
    """``--optim.optimizer sgd``: one SGD update per rating of the batch, in place; returns (sum of errors, sum of
    squared errors), each error (prediction - rating) taken just before its rating's update.

    Per rating, e = prediction - rating: ``p_u -= lr (e q_i + reg_factor p_u)``, ``q_i -= lr (e p_u + reg_factor
    q_i)``, ``b -= lr (e + reg_bias b)`` for both biases (``biases``), and with ``days`` = ``(DayBias.table, each
    rating's row, reg_day)`` the user-day bias ``b -= lr (e + reg_day / n b)`` (n its key's training ratings). The
    threads share the batch without locks (Hogwild): only one thread repeats bit for bit (see the source).
    """
    load()
    table, rows, reg_day = days if days is not None and user.numel() else (
        users.new_empty(0), torch.empty(0, dtype=torch.int64), 0.0)
    out = torch.ops.mfscale.sgd_step(users, items, user, item, rating, float(global_bias), float(lr),
                                     float(reg_factor), float(reg_bias), bool(biases), table, rows, float(reg_day))
    e_sum, sse = out.tolist()
    return e_sum, sse


def loads() -> bool:
    """Whether the op builds and loads here (tried once per process; a failure is kept, not retried)."""
    if "failed" not in _LOADED:
        try:
            load()
            _LOADED["failed"] = False
        except KernelUnavailable:
            _LOADED["failed"] = True
    return not _LOADED["failed"]


def time_target(bins: torch.Tensor, users: torch.Tensor, user: torch.Tensor, item: torch.Tensor,
                time_bin: torch.Tensor, time_dev: torch.Tensor, rating: torch.Tensor, n_bins: int, drift: bool
                ) -> torch.Tensor:
    """``rating - b_{i,bin} - alpha_u dev`` per rating (``mfscale.timebias``: ``bins`` (movie rows, 4B) and ``users``
    (user rows, 4) of rows [value, state, 1 / n, scratch]; user and movie int64, time_bin int16, time_dev float32)."""
    load()
    return torch.ops.mfscale.time_target(bins, users, user, item, time_bin, time_dev, rating, int(n_bins), bool(drift))


def time_step(bins: torch.Tensor, users: torch.Tensor, user: torch.Tensor, item: torch.Tensor, time_bin: torch.Tensor,
              time_dev: torch.Tensor, err: torch.Tensor, n_bins: int, drift: bool, scale: float, step_size: float,
              l2: tuple[float, float], beta2: float, eps: float) -> None:
    """The time-aware biases' RMSprop step, in place, from a batch's errors: each touched bin row (and user row, times
    dev) gets ``err * scale`` per rating plus ``1 / n * l2 * value``, then ``s += (g^2 - s)(1 - beta2)``, ``value -=
    step_size g / (sqrt(s) + eps)`` (``l2``: the bins' and the drift's)."""
    load()
    if user.numel():
        torch.ops.mfscale.time_step(bins, users, user, item, time_bin, time_dev, err, int(n_bins), bool(drift),
                                    float(scale), float(step_size), float(l2[0]), float(l2[1]), float(beta2),
                                    float(eps))

"""The CUDA path: fused step against a CPU float64 reference, resident batches on the GPU, compiled kernels
that do not recompile, mixed precision, and NCCL running the collectives gloo runs. Marked ``cuda`` and
skipped where CUDA is absent (CI); ``benchmarks/gpu_check.sh`` runs them on a GPU machine with
``pytest -m cuda``. Every test uses the tiny ``small_data`` set: seconds each, compile time aside."""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from mfscale import config
from mfscale.daybias import DayBias, day_key
from mfscale.distributed import DistEnv
from mfscale.evaluate import evaluate
from mfscale.model import batch_errors
from mfscale.monitor import read_scalars
from mfscale.shards import Dataset
from mfscale.stream import COLUMNS, RatingStream
from mfscale.train import Trainer, run

from .test_train import job

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pytest -m cuda on a GPU)")]

CPU = torch.device("cpu")
# An explicit index: the trainer hands it to DDP's device_ids.
CUDA = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None

# float32 on the GPU against float64 on the CPU, after STEPS Adam steps, as ||got - ref|| / ||ref|| per tensor.
# The same comparison with float32 on the CPU measured 3e-7 .. 2.3e-6 (10-60 steps, lr 0.005-0.02, small_data);
# the GPU sums in other orders (cuSPARSE, segment_reduce, Triton reductions) but at the same precision, so it
# lands in the same range. 1e-4 leaves a 40x margin and stays far under float32's 1e-3 ceiling (device
# METHOD.md), while a wrong index, a lost row or a skipped update gives errors of order 1e-2 .. 1.
REL_TOL = 1e-4
STEPS, BATCH, LR = 20, 400, 0.02


def sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: finish them before reading results or failing
        torch.cuda.synchronize(device)


def first_batches(data: Path, batch: int, steps: int) -> list[dict[str, Any]]:
    """The first ``steps`` training batches of one process (epoch 0, then epoch 1), as CPU tensors, with each
    rating's user-day bias row (the rows of any one-rank trainer of ``data``: the same keys)."""
    train = Dataset(data).read_split("train")
    days = DayBias(day_key(train["user"], train["timestamp"]))
    stream = RatingStream(data, "train", batch_size=batch, seed=0, day_rows=days.rows)
    out: list[dict[str, Any]] = []
    for epoch in range(steps):
        stream.set_epoch(epoch)
        out += list(stream)
        if len(out) >= steps:
            return out[:steps]
    return out


def assert_close_rel(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], initial: dict[str, torch.Tensor],
                     tol: float = REL_TOL) -> None:
    for k, r in ref.items():
        g = got[k].detach().to(CPU, torch.float64)
        r = r.detach().to(CPU, torch.float64)
        assert torch.isfinite(g).all(), f"{k}: not finite"
        assert not torch.equal(r, initial[k].to(CPU, torch.float64)), f"{k} did not train"
        rel = float((g - r).norm() / r.norm())
        assert rel <= tol, f"{k}: ||got - ref|| / ||ref|| = {rel:.2e} > {tol:.0e}"


def float64_reference(cfg: config.JobConfig, initial: dict[str, torch.Tensor]) -> Trainer:
    """A float64 CPU trainer (eager fused step) starting from ``initial``."""
    torch.set_default_dtype(torch.float64)
    try:
        ref = Trainer(config.replace(cfg, train__device="cpu", train__compile="off"), DistEnv(0, 1, 0, CPU))
    finally:
        torch.set_default_dtype(torch.float32)
    ref.model.load_state_dict({k: v.to(CPU) for k, v in initial.items()})  # copy_ upcasts to float64
    return ref


def test_kernels_compiled_at_warm_up_serve_the_whole_epoch_on_cuda(small_data, tmp_path):
    """As tests/test_zz_compiled.py on CPU: after the trainer's warm-up, an epoch with real table sizes, both
    optimizer forms and resident batches compiles nothing more. First in this file: it resets dynamo's cache,
    and the compile-on test below then reuses these kernels."""
    torch._dynamo.reset()
    cfg = job(small_data, tmp_path, train__compile="on", train__batch_size=500, data__resident="on",
              train__device="cuda")
    tr = Trainer(cfg, DistEnv(0, 1, 0, CUDA))
    assert tr.layout.resident and tr.optims.tables.compile and tr.step_fn.errors is not batch_errors
    tr.step_fn.dense_min = (150, 100)  # users: dense when 150 of 300 rows are touched; movies: 100 of 200
    forms = set()
    tr.layout.stream.set_epoch(0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in tr.layout.stream:
            assert batch["user"].is_cuda
            forms.add((batch["user"].unique().numel() >= 150, batch["item"].unique().numel() >= 100))
            tr.train_step(batch)
        sync(CUDA)
    assert len(forms) >= 2


@pytest.mark.parametrize("compile_", ["off", "on"])
def test_fused_step_on_cuda_equals_cpu_float64_reference(small_data, tmp_path, compile_):
    """N fused steps on the GPU (eager, or Triton kernels with the whole-table sweep where a batch touches 30%
    of a table) give the parameters of the eager float64 fused step on the CPU, fed the same batches."""
    cfg = job(small_data, tmp_path, train__batch_size=BATCH, optim__lr=LR, train__compile=compile_,
              train__device="cuda")
    gpu = Trainer(cfg, DistEnv(0, 1, 0, CUDA))
    assert gpu.step_fn.kind != "autograd" and (gpu.step_fn.errors is not batch_errors) == (compile_ == "on")
    initial = {k: v.detach().cpu().clone() for k, v in gpu.model.state_dict().items()}
    ref = float64_reference(cfg, initial)
    for b in first_batches(small_data, BATCH, STEPS):
        gpu.train_step(b)
        ref.train_step(b)
    sync(CUDA)
    assert_close_rel(gpu.model.state_dict(), ref.model.state_dict(), initial)
    # the user-day biases (on by default): their torch-ops step on the GPU
    days = {"days": gpu.layout.day_bias.value}
    assert_close_rel(days, {"days": ref.layout.day_bias.value}, {"days": torch.zeros_like(days["days"])})


@pytest.mark.parametrize("step", ["fused", "autograd"])
def test_implicit_feedback_trains_on_cuda_as_on_the_cpu(small_data, tmp_path, step):
    """--model.implicit on the GPU (the users' pull toward z in the torch steps, the visits' sparse products with
    cuSPARSE): the same test RMSE as the CPU run (the C++ op) to 1e-3, and y moved."""
    from mfscale import checkpoint

    out = {}
    for device in ("cuda", "cpu"):
        cfg = job(small_data, tmp_path / device, train__device=device, train__epochs=3, model__implicit=True,
                  train__batch_size=512, optim__lr=0.02, train__step=step, train__ranking_k=0)
        out[device] = run(cfg)["test_rmse"]
    assert abs(out["cuda"] - out["cpu"]) < 1e-3, out
    y = checkpoint.implicit_rows(*reversed(checkpoint.load_latest(tmp_path / "cuda")))
    assert y is not None and abs(y).max() > 0


@pytest.mark.parametrize(("world", "rank", "batch"), [(1, 0, 512), (2, 1, 700)])
def test_resident_batches_on_cuda_equal_streamed_ones(small_data, world, rank, batch):
    kw = {"batch_size": batch, "rank": rank, "world_size": world, "seed": 3}
    resident = RatingStream(small_data, "train", resident=CUDA, **kw)
    streamed = RatingStream(small_data, "train", **kw)
    for epoch, start in ((0, 0), (1, 0), (2, 3)):  # rotation moves between epochs; (2, 3) is a resume
        for s in (resident, streamed):
            s.set_epoch(epoch, start)
        got, want = list(resident), list(streamed)
        assert len(got) == len(want) > 0
        for g, w in zip(got, want, strict=True):
            assert g["global_rows"] == w["global_rows"] and g["step"] == w["step"]
            for c in COLUMNS:
                assert g[c].is_cuda and g[c].dtype == w[c].dtype
                assert torch.equal(g[c].cpu(), w[c]), (epoch, g["step"], c)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(small_data, tmp_path, precision):
    """Autocast (bf16; fp16 with GradScaler) on the autograd step: finite losses, and the test RMSE falls well
    below the untrained model's (the global mean). fp32 with these settings on the CPU: 0.815 -> 0.427."""
    cfg = job(small_data, tmp_path / "run", train__precision=precision, train__device="cuda", train__epochs=8,
              optim__lr=LR, train__ranking_k=0)
    untrained = Trainer(cfg, DistEnv(0, 1, 0, CUDA))
    assert untrained.step_fn.kind == "autograd"  # mixed precision is a fused-step blocker
    initial = evaluate(untrained.layout, "test", batch_size=4096)["rmse"]
    del untrained
    metrics = run(cfg)
    losses = [v for _, v in read_scalars(tmp_path / "run" / "tb")["train/loss"]]
    assert losses and all(math.isfinite(v) for v in losses)
    assert math.isfinite(metrics["test_rmse"]) and metrics["test_rmse"] < 0.75 * initial, (metrics["test_rmse"],
                                                                                           initial)


# ---------------------------------------------------------------------------------------- NCCL, a world of one

class ForcedWorld(DistEnv):
    """A world of one that still takes the distributed code paths: DDP for the dense bias, the all_gather
    sync of the sparse rows, all_reduce of the mean's gradient and of evaluation sums. (distributed.init
    creates no process group for one process, so torchrun --nproc_per_node=1 would run no collective.)"""

    @property
    def distributed(self) -> bool:
        return True


# Every collective the code could call; which ones run is what the test compares between backends.
COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "all_to_all",
               "all_to_all_single", "broadcast", "broadcast_object_list", "reduce_scatter_tensor", "barrier",
               "gather", "scatter")


def _recording(fn: Callable[..., Any], name: str, calls: list[str]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return fn(*args, **kwargs)

    return wrapper


def world_of_one(backend: str, device: torch.device, cfg: config.JobConfig, batches: list[dict[str, Any]],
                 monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Train ``batches`` in a one-rank ``backend`` group with the distributed paths on; then one stop check
    and one validation pass (their all_reduces). Returns the collectives called, in order, and the weights."""
    calls: list[str] = []
    with monkeypatch.context() as m:
        for name in COLLECTIVES:
            if hasattr(dist, name):
                m.setattr(dist, name, _recording(getattr(dist, name), name, calls))
        # An in-process store: no port to pick. device_id makes NCCL create its communicator now.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60),
                                **({"device_id": device} if backend == "nccl" else {}))
        try:
            tr = Trainer(config.replace(cfg, train__device=device.type), ForcedWorld(0, 1, 0, device))
            for b in batches:
                tr.train_step(b)
            # global_step 0: a step on which ranks compare stop flags
            assert not tr.stop.requested(tr.env, tr.progress.global_step)
            val = evaluate(tr.layout, "val", batch_size=1000)
            assert val is not None and math.isfinite(val["rmse"])
            sync(device)
            state = {k: v.detach().cpu().clone() for k, v in tr.model.state_dict().items()}
        finally:
            dist.destroy_process_group()
    return calls, state


@pytest.mark.parametrize("tables", ["replicated", "blocks"])
@pytest.mark.parametrize("step", ["fused", "autograd"])
def test_nccl_world_of_one_runs_the_collectives_gloo_runs(small_data, tmp_path, monkeypatch, step, tables):
    """The same training steps in a one-rank NCCL group (CUDA) and a one-rank gloo group (CPU) call the same
    collectives in the same order and end with the same weights (float32 on both, REL_TOL)."""
    changes: dict[str, Any] = {"train__batch_size": BATCH, "optim__lr": LR, "train__step": step,
                               "train__compile": "off"}
    changes["train__tables"] = tables
    cfg = job(small_data, tmp_path, **changes)
    batches = first_batches(small_data, BATCH, 6)
    initial = Trainer(config.replace(cfg, train__device="cpu"), DistEnv(0, 1, 0, CPU)).model.state_dict()
    gloo_calls, gloo_state = world_of_one("gloo", CPU, cfg, batches, monkeypatch)
    nccl_calls, nccl_state = world_of_one("nccl", CUDA, cfg, batches, monkeypatch)
    assert "all_gather" in gloo_calls and "all_reduce" in gloo_calls, gloo_calls  # the sync really ran
    assert nccl_calls == gloo_calls
    assert_close_rel(nccl_state, gloo_state, initial)

"""Training throughput of mfscale: input pipeline, training step and end to end, against two baselines.

    # 1M synthetic ratings (prepared once into the cache, untimed), default sweep, 1 process:
    python benchmarks/throughput.py --synthetic-ratings 1000000

    # a prepared dataset, a sweep, 1 and 2 processes, results kept:
    python benchmarks/throughput.py --data data/ml-32m --modes e2e,step --batch-sizes 16384,65536 \\
        --dims 64,128 --variants fused,sparse_adam --nprocs 1,2 \\
        --out-jsonl bench.jsonl --out-md bench.md

    # GPU, mixed precision, bandwidth fraction (3350 GB/s assumed for an H100 SXM, 4800 for an H200):
    python benchmarks/throughput.py --data data/ml-32m --device cuda --precisions fp32,bf16

    # memory vs data size: 1M..100M synthetic ratings, each in a fresh process, e2e mode:
    python benchmarks/throughput.py --scaling --scaling-sizes 1000000,10000000

Modes (each timed for ``--steps`` steps after ``--warmup-steps`` untimed ones):

- ``input``: shards -> device only: ``RatingStream`` through ``make_loader``, tensors moved to the device,
  device synchronized. No model.
- ``step``: ``Trainer.train_step`` alone on a few batches already on the device, cycled.
- ``e2e``: stream + ``train_step``; ``data_wait_pct`` is the share of time blocked in ``next(loader)``.

``--nprocs 1`` runs in this process; ``--nprocs N`` (N > 1) launches ``torchrun --standalone`` running this
script in worker mode, each rank writing its numbers to a JSON file that the parent combines: global
ratings/s = sum of ratings over ranks / the slowest rank's wall time; a global step time = the slowest
rank's time for that step.

Baselines, measured in the same run on the same data and device, one process each:

- ``notebook``: the seed notebooks' approach: a per-sample ``torch.utils.data.Dataset``,
  ``DataLoader(batch_size=128, shuffle=True)``, dense ``nn.Embedding`` factors and biases,
  ``torch.optim.Adam``, MSE loss (``--baseline-steps`` timed steps).
- ``plain_sparse_adam``: ``nn.Embedding(sparse=True)`` + ``torch.optim.SparseAdam`` at the same batch size
  as each mfscale configuration, the data as in-memory tensors on the device, a plain loop.

Speed is measured, never asserted. Every configuration writes one JSON line (``--out-jsonl``) and the
script prints a markdown table (also to ``--out-md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mfscale import config, distributed
from mfscale.config import JobConfig
from mfscale.distributed import DistEnv
from mfscale.shards import Dataset
from mfscale.stream import COLUMNS, RatingStream, make_loader
from mfscale.synthetic import PRESETS
from mfscale.train import Trainer

MODES = ("input", "step", "e2e")
PRECISIONS = ("fp32", "bf16", "fp16")
# Peak HBM bandwidth in GB/s by device-name substring, first match wins (PCIe H100 before plain "H100").
BANDWIDTH_GBS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0))
PRELOAD_BATCHES = 8  # step mode cycles this many device-resident batches
NOTEBOOK_BATCH = 128
BYTES_FORMULA = ("bytes/rating = 4*(d+1)*(2 + 2 + 6*u): fp32 rows of d+1 columns (factors + bias); gather 2 rows, "
                 "write 2 gradient rows, read+write p, m, v once per unique row; u = unique (user + item) rows "
                 "per rating in a rank's batch (measured)")


@dataclasses.dataclass(frozen=True)
class Case:
    """One mfscale configuration of the sweep (the process count is handled outside)."""

    mode: str
    batch_size: int
    dim: int
    variant: str
    precision: str


# ---------------------------------------------------------------------------------------------- helpers

def _csv(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list of {kind.__name__}, got {text!r}") from None
    return parse


def sync(device: torch.device) -> None:
    # CUDA kernels are asynchronous: without this a timer measures the launch, not the work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def default_bandwidth(name: str) -> float | None:
    return next((bw for key, bw in BANDWIDTH_GBS if key.lower() in name.lower()), None)


# Training-step variants: the job-config overrides each stands for.
# The default optimizer (RowRMSprop since session 10; "fused" measured LazyAdam before) unless the name says.
VARIANTS: dict[str, dict[str, str]] = {
    "fused": {"optim__optimizer": "row_rmsprop", "train__step": "fused"},  # the default path (compile: auto)
    "fused-compiled": {"optim__optimizer": "row_rmsprop", "train__step": "fused", "train__compile": "on",
                       "train__cpu_kernel": "off"},
    "fused-eager": {"optim__optimizer": "row_rmsprop", "train__step": "fused", "train__compile": "off",
                    "train__cpu_kernel": "off"},
    # on a CPU: the C++ op (mfscale/csrc/fused_step.cpp) against the same math as torch ops
    "fused-kernel": {"optim__optimizer": "row_rmsprop", "train__step": "fused", "train__cpu_kernel": "on"},
    "fused-torch": {"optim__optimizer": "row_rmsprop", "train__step": "fused", "train__cpu_kernel": "off"},
    "autograd": {"optim__optimizer": "row_rmsprop", "train__step": "autograd"},  # backward() + RowRMSprop
    "sparse_adam": {"optim__optimizer": "sparse_adam", "train__step": "autograd"},  # the reference
    "fused-lazy_adam": {"optim__optimizer": "lazy_adam", "train__step": "fused"},  # the default path with Adam
    # table layouts (mfscale/layout/), the fused step: compare them at --nprocs 1,2
    "fused-replicated": {"optim__optimizer": "row_rmsprop", "train__step": "fused", "train__tables": "replicated"},
    "fused-blocks": {"optim__optimizer": "row_rmsprop", "train__step": "fused", "train__tables": "blocks"},
    # issue 24's model options on the default path: plain MF (no biases), nn.Embedding's max_norm 1
    "fused-plain": {"optim__optimizer": "row_rmsprop", "train__step": "fused", "model__biases": "off"},
    "fused-max_norm": {"optim__optimizer": "row_rmsprop", "train__step": "fused", "model__max_norm": "1"},
    # --optim.optimizer sgd: one SGD update per rating in its own C++ op (CPU: one process or blocks tables)
    "sgd": {"optim__optimizer": "sgd", "optim__lr": "0.03"},
}


def valid_variants(requested: list[str]) -> tuple[list[str], list[str]]:
    """Split into (known variants, notes for the rest)."""
    ok = [v for v in requested if v in VARIANTS]
    notes = [f"variant {v!r} skipped: unknown (choose from {', '.join(VARIANTS)})" for v in requested
             if v not in VARIANTS]
    return ok, notes


def endless(stream: RatingStream, loader: Iterable[dict]) -> Iterator[dict]:
    """Batches across epoch boundaries, as the trainer sees them (set_epoch before each pass)."""
    epoch = 0
    while True:
        stream.set_epoch(epoch)
        yield from loader
        epoch += 1


def endless_training(trainer: Trainer) -> Iterator[dict]:
    """The trainer's batches across epoch boundaries, from its table layout (blocks rotate inside)."""
    epoch = 0
    while True:
        yield from trainer.layout.batches(epoch, 0)
        epoch += 1


def unique_rows_per_rating(batches: list[dict]) -> float:
    n = sum(b["user"].numel() for b in batches)
    rows = sum(torch.unique(b["user"], sorted=False).numel() + torch.unique(b["item"], sorted=False).numel()
               for b in batches)
    return rows / max(n, 1)


def timed_loop(env: DistEnv, warmup: int, steps: int, step: Callable[[], tuple[int, float]]) -> dict[str, Any]:
    """Run step() warmup times untimed, then steps times timed; step returns (ratings, seconds waiting for data)."""
    for _ in range(warmup):
        step()
    sync(env.device)
    if env.distributed:  # ranks start the timed region together
        torch.distributed.barrier()
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    step_s, ratings, wait = [], 0, 0.0
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        n, w = step()
        sync(env.device)
        step_s.append(time.perf_counter() - t0)
        ratings += n
        wait += w
    wall = time.perf_counter() - start
    # Page faults per step: nonzero means the step's memory is mapped afresh each time (see step.keep_step_memory).
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / max(steps, 1)
    return {"rank": env.rank, "ratings": ratings, "wall_s": wall, "step_ms": [s * 1e3 for s in step_s],
            "wait_s": wait, "page_faults_per_step": faults}


# ---------------------------------------------------------------------------------------------- mfscale

def job_config(args: argparse.Namespace, case: Case) -> JobConfig:
    """The real training config for a case: library defaults except what the sweep sets."""
    return config.replace(
        JobConfig(), run_dir=str(Path(tempfile.gettempdir()) / "mfscale-bench-unused"),
        data__path=str(args.data), data__workers=args.workers, data__resident=args.resident, model__dim=case.dim,
        train__batch_size=case.batch_size, train__precision=case.precision, train__device=args.device,
        checkpoint__resume="never", **VARIANTS[case.variant],
    ).validate()


def measure(args: argparse.Namespace, case: Case, env: DistEnv) -> dict[str, Any]:
    """This rank's numbers for one case."""
    dev, pin = env.device, env.device.type == "cuda"
    unique = None
    if case.mode == "input":
        resident = args.resident == "on"
        stream = RatingStream(Dataset(args.data), "train", batch_size=case.batch_size, rank=env.rank,
                              world_size=env.world_size, seed=0, resident=dev if resident else None)
        it = endless(stream, stream if resident else make_loader(stream, num_workers=args.workers, pin_memory=pin))

        def step() -> tuple[int, float]:
            b = next(it)
            for c in COLUMNS:
                b[c].to(dev, non_blocking=True)
            return b["user"].numel(), 0.0
    else:
        trainer = Trainer(job_config(args, case), env)
        it = endless_training(trainer)
        if case.mode == "step":
            host = list(itertools.islice(it, min(PRELOAD_BATCHES, max(args.steps, 1))))
            unique = unique_rows_per_rating(host)
            preloaded = itertools.cycle([{k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()}
                                         for b in host])

            def step() -> tuple[int, float]:
                b = next(preloaded)
                trainer.train_step(b)
                return b["user"].numel(), 0.0
        else:
            first = next(it)
            unique = unique_rows_per_rating([first])
            it = itertools.chain([first], it)

            def step() -> tuple[int, float]:
                t0 = time.perf_counter()
                b = next(it)
                wait = time.perf_counter() - t0
                trainer.train_step(b)
                return b["user"].numel(), wait
    res = timed_loop(env, args.warmup_steps, args.steps, step)
    if case.mode != "input":
        # step: what mfscale.step.build chose for the variant's config (cpp, compiled, eager or autograd)
        res.update(tables=trainer.layout.name, table_bytes_sent=trainer.layout.bytes_sent,
                   steps_per_epoch=trainer.layout.steps_per_epoch, step=trainer.step_fn.kind)
    res.update(unique_rows_per_rating=unique, peak_rss_mib=peak_rss_mib(),
               cuda_max_allocated_mib=torch.cuda.max_memory_allocated(dev) / 2**20 if pin else None)
    return res


def run_cases(args: argparse.Namespace, cases: list[Case], env: DistEnv) -> list[dict[str, Any]]:
    out = []
    for case in cases:
        res = measure(args, case, env)
        res["case"] = dataclasses.asdict(case)
        out.append(res)
        gc.collect()  # drop the previous case's model and optimizer state before the next
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def run_multiprocess(args: argparse.Namespace, cases: list[Case], nprocs: int) -> list[list[dict[str, Any]]]:
    """Per case, per rank results from ``torchrun --standalone`` running this script in worker mode."""
    with tempfile.TemporaryDirectory(prefix="mfscale-bench-") as tmp:
        spec = Path(tmp) / "cases.json"
        spec.write_text(json.dumps([dataclasses.asdict(c) for c in cases]))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}",
               str(Path(__file__).resolve()), "--worker-cases", str(spec), "--worker-out", tmp,
               "--data", str(args.data), "--device", args.device, "--workers", str(args.workers),
               "--resident", args.resident,
               "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps)]
        # Known torchrun issue on some hosts (pytorch/pytorch#135712); harmless elsewhere.
        env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        log(args, f"launching: {shlex.join(cmd)}")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun with {nprocs} processes failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(nprocs)]
    return [[ranks[r][i] for r in range(nprocs)] for i in range(len(cases))]


def worker_main(args: argparse.Namespace) -> None:
    env = distributed.init(args.device)
    try:
        torch.manual_seed(0)
        cases = [Case(**c) for c in json.loads(Path(args.worker_cases).read_text())]
        results = run_cases(args, cases, env)
        (Path(args.worker_out) / f"rank{env.rank}.json").write_text(json.dumps(results))
    finally:
        distributed.destroy()


def combine(per_rank: list[dict[str, Any]], case: Case, bandwidth_gbs: float | None) -> dict[str, Any]:
    """One record from the ranks' numbers for one case."""
    walls = [r["wall_s"] for r in per_rank]
    total = sum(r["ratings"] for r in per_rank)
    step_ms = np.max(np.array([r["step_ms"] for r in per_rank]), axis=0)  # a step lasts as long as its slowest rank
    uniques = [r["unique_rows_per_rating"] for r in per_rank if r["unique_rows_per_rating"] is not None]
    rec: dict[str, Any] = {
        "ratings_per_s": total / max(walls),
        "ratings_per_s_per_rank": [r["ratings"] / r["wall_s"] for r in per_rank],
        "p50_step_ms": float(np.percentile(step_ms, 50)),
        "p90_step_ms": float(np.percentile(step_ms, 90)),
        "data_wait_pct": (float(np.mean([100 * r["wait_s"] / r["wall_s"] for r in per_rank]))
                          if case.mode == "e2e" else None),
        "timed_ratings": total,
        "wall_s": max(walls),
        "page_faults_per_step": float(np.mean([r["page_faults_per_step"] for r in per_rank])),
        "unique_rows_per_rating": float(np.mean(uniques)) if uniques else None,
        "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in per_rank],
        "cuda_max_allocated_mib_per_rank": [r["cuda_max_allocated_mib"] for r in per_rank],
    }
    if bandwidth_gbs and case.mode != "input" and uniques:
        bpr = 4 * (case.dim + 1) * (4 + 6 * rec["unique_rows_per_rating"])
        # Each GPU moves its own ratings' bytes, so compare per-rank rates with one device's bandwidth.
        achieved = float(np.mean(rec["ratings_per_s_per_rank"])) * bpr / 1e9
        rec.update(bytes_per_rating=bpr, achieved_gbs_per_device=achieved, bandwidth_gbs=bandwidth_gbs,
                   bandwidth_fraction=achieved / bandwidth_gbs, bytes_formula=BYTES_FORMULA)
    return rec


# ---------------------------------------------------------------------------------------------- baselines

class NotebookRatings(torch.utils.data.Dataset):
    """The seed notebooks' dataset: one (user, item, rating) per __getitem__, collated by the DataLoader."""

    def __init__(self, user: np.ndarray, item: np.ndarray, rating: np.ndarray):
        self.user, self.item, self.rating = user.astype(np.int64), item.astype(np.int64), rating

    def __len__(self) -> int:
        return len(self.rating)

    def __getitem__(self, i: int) -> tuple[np.int64, np.int64, np.float32]:
        return self.user[i], self.item[i], self.rating[i]


class PlainMF(nn.Module):
    """Separate factor and bias embeddings, as usually written; sparse=True for the SparseAdam baseline."""

    def __init__(self, n_users: int, n_items: int, dim: int, mean: float, sparse: bool):
        super().__init__()
        self.p, self.q = nn.Embedding(n_users, dim, sparse=sparse), nn.Embedding(n_items, dim, sparse=sparse)
        self.bu, self.bi = nn.Embedding(n_users, 1, sparse=sparse), nn.Embedding(n_items, 1, sparse=sparse)
        for e in (self.p, self.q):
            nn.init.normal_(e.weight, 0.0, 0.01)
        for e in (self.bu, self.bi):
            nn.init.zeros_(e.weight)
        # SparseAdam takes sparse gradients only, so the sparse variant keeps the mean fixed.
        self.mean = nn.Parameter(torch.tensor(mean), requires_grad=not sparse)

    def forward(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return (self.p(u) * self.q(i)).sum(1) + self.bu(u).squeeze(1) + self.bi(i).squeeze(1) + self.mean


def baseline_notebook(data: Dataset, dim: int, steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    train = data.read_split("train")
    ds = NotebookRatings(train["user"], train["item"], train["rating"])
    loader = torch.utils.data.DataLoader(ds, batch_size=NOTEBOOK_BATCH, shuffle=True)
    model = PlainMF(data.n_users, data.n_items, dim, float(train["rating"].mean()), sparse=False).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.005)
    loss_fn = nn.MSELoss()
    batches = itertools.chain.from_iterable(iter(loader) for _ in itertools.count())  # epochs back to back

    def step() -> tuple[int, float]:
        u, i, r = next(batches)
        u, i, r = u.to(device), i.to(device), r.to(device)
        loss = loss_fn(model(u, i), r)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return r.numel(), 0.0

    env = DistEnv(0, 1, 0, device)
    return timed_loop(env, warmup, steps, step)


def baseline_sparse_adam(data: Dataset, batch_size: int, dim: int, steps: int, warmup: int,
                         device: torch.device) -> dict[str, Any]:
    train = data.read_split("train")
    user = torch.from_numpy(train["user"].astype(np.int64)).to(device)
    item = torch.from_numpy(train["item"].astype(np.int64)).to(device)
    rating = torch.from_numpy(train["rating"]).to(device)
    n = rating.numel()
    model = PlainMF(data.n_users, data.n_items, dim, float(rating.mean()), sparse=True).to(device)
    opt = torch.optim.SparseAdam([p for p in model.parameters() if p.requires_grad], lr=0.005)
    loss_fn = nn.MSELoss()
    state = {"perm": torch.randperm(n, device=device), "pos": 0}

    def step() -> tuple[int, float]:
        if state["pos"] >= n:
            state["perm"], state["pos"] = torch.randperm(n, device=device), 0
        idx = state["perm"][state["pos"]: state["pos"] + batch_size]
        state["pos"] += batch_size
        loss = loss_fn(model(user[idx], item[idx]), rating[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return idx.numel(), 0.0

    env = DistEnv(0, 1, 0, device)
    return timed_loop(env, warmup, steps, step)


def baseline_record(name: str, res: dict[str, Any], **cfg: Any) -> dict[str, Any]:
    ms = np.array(res["step_ms"])
    rate = res["ratings"] / res["wall_s"]
    return {"kind": "baseline", "baseline": name, "ratings_per_s": rate, "ratings_per_s_per_rank": [rate],
            "data_wait_pct": None, "p50_step_ms": float(np.percentile(ms, 50)),
            "p90_step_ms": float(np.percentile(ms, 90)),
            "timed_ratings": res["ratings"], "wall_s": res["wall_s"], "config": cfg}


# ---------------------------------------------------------------------------------------------- data

def synthetic_shape(n_ratings: int, users: int | None, items: int | None) -> tuple[int, int]:
    """Users and items in ML-32M's proportions unless given (at least 100 each)."""
    ref = PRESETS["ml-32m"]
    u = users or max(100, round(n_ratings * ref.n_users / ref.n_ratings))
    i = items or max(100, round(n_ratings * ref.n_items / ref.n_ratings))
    return u, i


def prepare_synthetic(args: argparse.Namespace, n_ratings: int, users: int, items: int) -> Path:
    """A cached synthetic dataset (prepared once in a subprocess; never timed)."""
    out = args.cache_dir / f"synthetic-r{n_ratings}-u{users}-i{items}-s{args.seed}"
    if (out / "manifest.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mfscale.prepare", "--synthetic", "custom", "--users", str(users), "--items",
           str(items), "--ratings", str(n_ratings), "--seed", str(args.seed), "--out", str(out), "--overwrite",
           "--quiet"]
    log(args, f"preparing synthetic data (not timed): {shlex.join(cmd)}")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    log(args, f"prepared {out} in {time.perf_counter() - t0:.1f} s")
    return out


# ---------------------------------------------------------------------------------------------- output

def log(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(f"[throughput] {msg}", file=sys.stderr, flush=True)


def _num(v: float | None, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(header: dict[str, Any], records: list[dict[str, Any]], baselines: list[dict[str, Any]],
             notes: list[str]) -> str:
    cuda = any("bandwidth_fraction" in r for r in records)
    lines = [f"### mfscale throughput, {header['date']}", "",
             f"device: {header['device']}; torch {header['torch']}; commit {header['git_commit']}; "
             f"data: {header['data']} ({header['n_train']:,} training ratings)", "",
             f"command: `{header['command']}`", ""]
    cols = ["mode", "procs", "batch/rank", "dim", "variant", "precision", "ratings/s", "per rank", "p50 ms",
            "p90 ms", "data wait", "vs notebook", "vs plain SparseAdam"]
    if cuda:
        cols += ["GB/s per GPU", "of peak BW"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        c = r["config"]["bench"]
        variant = c["variant"] + (f" ({r['step']})" if r.get("step") else "")  # the step build() chose
        row = [c["mode"], str(c["nprocs"]), f"{c['batch_size']:,}", str(c["dim"]), variant, c["precision"],
               _num(r["ratings_per_s"]), " / ".join(_num(x) for x in r["ratings_per_s_per_rank"]),
               _num(r["p50_step_ms"], ".1f"), _num(r["p90_step_ms"], ".1f"),
               "-" if r["data_wait_pct"] is None else f"{r['data_wait_pct']:.1f}%",
               "-" if r.get("speedup_vs_notebook") is None else f"{r['speedup_vs_notebook']:.1f}x",
               "-" if r.get("speedup_vs_plain_sparse_adam") is None else f"{r['speedup_vs_plain_sparse_adam']:.2f}x"]
        if cuda:
            row += [_num(r.get("achieved_gbs_per_device"), ".0f"),
                    "-" if r.get("bandwidth_fraction") is None else f"{100 * r['bandwidth_fraction']:.1f}%"]
        lines.append("| " + " | ".join(row) + " |")
    if baselines:
        lines += ["", "Baselines (same run, same data and device, 1 process):", "",
                  "| baseline | batch | dim | ratings/s | p50 ms | p90 ms |", "|---|---|---|---|---|---|"]
        for b in baselines:
            lines.append(f"| {b['baseline']} | {b['config']['batch_size']:,} | {b['config']['dim']} | "
                         f"{_num(b['ratings_per_s'])} | {b['p50_step_ms']:.1f} | {b['p90_step_ms']:.1f} |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def scaling_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| ratings | users | items | train ratings | ratings/s (e2e) | peak RSS MiB | CUDA max alloc MiB | "
             "model + Adam state MiB | decoded train data MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cuda = r["cuda_max_allocated_mib_per_rank"][0]
        lines.append(f"| {r['n_ratings']:,} | {r['n_users']:,} | {r['n_items']:,} | {r['n_train']:,} | "
                     f"{_num(r['ratings_per_s'])} | {r['peak_rss_mib_per_rank'][0]:,.0f} | {_num(cuda)} | "
                     f"{r['model_state_mib']:,.0f} | {r['train_data_mib']:,.0f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- drivers

def run_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    data = Dataset(args.data)
    device = distributed.pick_device(args.device, 0)
    notes = ["CPU timings are noisy when other processes share the cores; compare rows of one run only."
             if device.type == "cpu" else "GPU timings include a device synchronize after every step."]
    variants, skipped = valid_variants(args.variants)
    notes += skipped
    precisions = []
    for p in args.precisions:
        if p not in PRECISIONS:
            notes.append(f"precision {p!r} skipped: unknown (choose from {', '.join(PRECISIONS)})")
        elif p != "fp32" and device.type != "cuda":
            notes.append(f"precision {p} skipped: mixed precision needs CUDA")
        else:
            precisions.append(p)
    modes = [m for m in args.modes if m in MODES]
    notes += [f"mode {m!r} skipped: unknown (choose from {', '.join(MODES)})" for m in args.modes if m not in MODES]
    bandwidth = None
    if device.type == "cuda":
        bandwidth = args.bandwidth_gbs or default_bandwidth(torch.cuda.get_device_name(device))
        if bandwidth is None:
            raise SystemExit(f"--bandwidth-gbs is required for {torch.cuda.get_device_name(device)!r}")
        notes.append(BYTES_FORMULA + f"; peak bandwidth taken as {bandwidth:,.0f} GB/s")
    # Input mode has no variant or precision: one case per batch size (and dim is irrelevant too).
    cases: list[Case] = []
    for mode in modes:
        if mode == "input":
            cases += [Case(mode, b, args.dims[0], "-", "-") for b in args.batch_sizes]
        else:
            cases += [Case(mode, b, d, o, p) for b in args.batch_sizes for d in args.dims for o in variants
                      for p in precisions]
    header = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device_name(device),
              "torch": torch.__version__, "git_commit": git_commit(), "data": str(args.data),
              "n_train": data.split_rows("train"), "command": shlex.join([sys.argv[0], *sys.argv[1:]])}

    records: list[dict[str, Any]] = []
    for nprocs in args.nprocs:
        log(args, f"{len(cases)} configuration(s) on {nprocs} process(es)")
        if nprocs == 1:
            env = distributed.init(args.device)
            per_case = [[r] for r in run_cases(args, cases, env)]
        else:
            per_case = run_multiprocess(args, cases, nprocs)
        for case, per_rank in zip(cases, per_case, strict=True):
            rec = {"kind": "mfscale", **combine(per_rank, case, bandwidth if device.type == "cuda" else None)}
            cfg = job_config(args, case).to_dict() if case.mode != "input" else None
            rec["config"] = {"bench": {**dataclasses.asdict(case), "nprocs": nprocs, "steps": args.steps,
                                       "warmup_steps": args.warmup_steps, "workers": args.workers,
                                       "device": str(device)}, "job": cfg}
            records.append(rec)

    baselines: list[dict[str, Any]] = []
    if not args.no_baselines:
        train_modes = [c for c in cases if c.mode != "input"]
        for dim in sorted({c.dim for c in train_modes}):
            log(args, f"baseline notebook, dim {dim}")
            res = baseline_notebook(data, dim, args.baseline_steps, args.baseline_warmup_steps, device)
            baselines.append(baseline_record("notebook", res, batch_size=NOTEBOOK_BATCH, dim=dim,
                                             steps=args.baseline_steps, optimizer="torch.optim.Adam (dense)",
                                             loader="per-sample Dataset, DataLoader(shuffle=True)"))
        for b, dim in sorted({(c.batch_size, c.dim) for c in train_modes}):
            log(args, f"baseline plain SparseAdam, batch {b}, dim {dim}")
            res = baseline_sparse_adam(data, b, dim, args.steps, args.warmup_steps, device)
            baselines.append(baseline_record("plain_sparse_adam", res, batch_size=b, dim=dim, steps=args.steps,
                                             optimizer="torch.optim.SparseAdam", loader="in-memory tensors"))
            gc.collect()
        notes.append("speedups compare global ratings/s (all processes) with the one-process baselines; "
                     "input rows have none (no training)")
    by_dim = {b["config"]["dim"]: b["ratings_per_s"] for b in baselines if b["baseline"] == "notebook"}
    by_bd = {(b["config"]["batch_size"], b["config"]["dim"]): b["ratings_per_s"] for b in baselines
             if b["baseline"] == "plain_sparse_adam"}
    for rec in records:
        c = rec["config"]["bench"]
        if c["mode"] != "input":
            nb, sa = by_dim.get(c["dim"]), by_bd.get((c["batch_size"], c["dim"]))
            rec["speedup_vs_notebook"] = rec["ratings_per_s"] / nb if nb else None
            rec["speedup_vs_plain_sparse_adam"] = rec["ratings_per_s"] / sa if sa else None

    common = {k: header[k] for k in ("date", "device", "torch", "git_commit", "data", "n_train")}
    lines = [{**common, **r} for r in records + baselines]
    table = markdown(header, records, baselines, notes)
    emit(args, lines, table)
    return lines


def run_scaling(args: argparse.Namespace) -> list[dict[str, Any]]:
    """e2e at several data sizes, each in a fresh process so peak RSS is that size's alone."""
    rows = []
    users, items = args.synthetic_users or PRESETS["ml-32m"].n_users, args.synthetic_items or PRESETS["ml-32m"].n_items
    for n in args.scaling_sizes:
        # Fixed users and items: the model stays the same size, only the data grows.
        path = prepare_synthetic(args, n, min(users, n), min(items, n))
        data = Dataset(path)
        steps = -(-data.split_rows("train") // args.batch_sizes[0]) if args.scaling_full_epoch else args.steps
        with tempfile.TemporaryDirectory(prefix="mfscale-scaling-") as tmp:
            out = Path(tmp) / "r.jsonl"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--data", str(path), "--modes", "e2e",
                   "--batch-sizes", str(args.batch_sizes[0]), "--dims", str(args.dims[0]),
                   "--variants", args.variants[0], "--precisions", args.precisions[0], "--nprocs", "1",
                   "--steps", str(steps), "--warmup-steps", str(args.warmup_steps), "--device", args.device,
                   "--workers", str(args.workers), "--resident", args.resident, "--no-baselines", "--quiet",
                   "--out-jsonl", str(out)]
            log(args, f"scaling {n:,} ratings: {shlex.join(cmd)}")
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            rec = json.loads(out.read_text().splitlines()[0])
        dim = args.dims[0]
        rec.update(kind="scaling", n_ratings=n, n_users=data.n_users, n_items=data.n_items,
                   # table + RowRMSprop's two floats per row (the default; Adam's m + v: 3 (dim + 1) in all)
                   model_state_mib=4 * (dim + 3) * (data.n_users + data.n_items) / 2**20,
                   train_data_mib=16 * data.split_rows("train") / 2**20)  # 4 int32/float32 columns per row
        rows.append(rec)
    table = ("### mfscale memory vs data size (e2e, 1 process, fixed users/items)\n\n" + scaling_markdown(rows)
             + "\nPeak RSS is ru_maxrss of a fresh process per size (includes torch itself); it should track "
               "model + Adam state + stream buffers, not the data size.\n")
    emit(args, rows, table)
    return rows


def emit(args: argparse.Namespace, lines: list[dict[str, Any]], table: str) -> None:
    if args.out_jsonl:
        with open(args.out_jsonl, "a") as f:  # append: one file can collect several runs
            for line in lines:
                f.write(json.dumps(line) + "\n")
    if args.out_md:
        with open(args.out_md, "a") as f:
            f.write(table + "\n")
    print(table)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", type=Path, help="a prepared dataset (python -m mfscale.prepare --out ...)")
    src.add_argument("--synthetic-ratings", type=int, metavar="N",
                     help="prepare N synthetic ratings into --cache-dir first (untimed, reused)")
    p.add_argument("--synthetic-users", type=int, help="synthetic users (default: ML-32M's ratio)")
    p.add_argument("--synthetic-items", type=int, help="synthetic movies (default: ML-32M's ratio)")
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    p.add_argument("--cache-dir", type=Path,
                   default=Path(os.environ.get("MFSCALE_CACHE", Path.home() / ".cache" / "mfscale")) / "bench")
    p.add_argument("--modes", type=_csv(str), default=list(MODES), help="input,step,e2e (default all)")
    p.add_argument("--batch-sizes", type=_csv(int), default=[65536], help="ratings per rank per step")
    p.add_argument("--dims", type=_csv(int), default=[64])
    p.add_argument("--variants", type=_csv(str), default=["fused", "sparse_adam"],
                   help="training-step variants: fused (the default path), fused-kernel (CPU: the C++ op), "
                        "fused-torch (CPU: torch ops), fused-compiled, fused-eager, autograd (backward + "
                        "RowRMSprop), fused-lazy_adam, sparse_adam (backward + torch.optim.SparseAdam, the "
                        "reference), fused-replicated, fused-blocks, fused-plain (--model.biases off), "
                        "fused-max_norm (--model.max_norm 1), sgd (--optim.optimizer sgd --optim.lr 0.03)")
    p.add_argument("--resident", choices=["auto", "on", "off"], default="auto",
                   help="data.resident for training modes; input mode measures the resident stream only with on")
    p.add_argument("--precisions", type=_csv(str), default=["fp32"], help="fp32,bf16,fp16 (mixed: CUDA only)")
    p.add_argument("--nprocs", type=_csv(int), default=[1], help="1 = in this process; N > 1 = torchrun")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank (data.workers)")
    p.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first")
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--baseline-steps", type=int, default=200, help="timed steps of the notebook baseline")
    p.add_argument("--baseline-warmup-steps", type=int, default=20)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--bandwidth-gbs", type=float,
                   help="device memory bandwidth, GB/s (default from the name: H100 SXM 3350, H200 4800)")
    p.add_argument("--scaling", action="store_true", help="only the memory-vs-data-size sweep")
    p.add_argument("--scaling-sizes", type=_csv(int), default=[1_000_000, 10_000_000, 32_000_000, 100_000_000])
    p.add_argument("--scaling-full-epoch", action="store_true", help="time one full epoch per size")
    p.add_argument("--out-jsonl", type=Path)
    p.add_argument("--out-md", type=Path)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--worker-cases", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker_cases:
        worker_main(args)
        return
    if min(args.steps, args.warmup_steps, args.baseline_steps, args.baseline_warmup_steps) < 0 or args.steps < 1:
        raise SystemExit("--steps must be >= 1 and the warm-up counts >= 0")
    if args.scaling:
        run_scaling(args)
        return
    if args.synthetic_ratings:
        users, items = synthetic_shape(args.synthetic_ratings, args.synthetic_users, args.synthetic_items)
        args.data = prepare_synthetic(args, args.synthetic_ratings, users, items)
    if args.data is None:
        raise SystemExit("give --data DIR, --synthetic-ratings N or --scaling")
    run_sweep(args)


if __name__ == "__main__":
    main()

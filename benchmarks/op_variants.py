"""The C++ step against edited copies of itself, interleaved in one process: which change to the op pays?

    python benchmarks/op_variants.py --data data/ml-10m /tmp/fewer_prefetches.cpp /tmp/ahead8.cpp

Each variant is a copy of ``mfscale/csrc/fused_step.cpp`` with an edit. With ``--extra "--optim.optimizer sgd
--optim.lr 0.03"`` the job runs the file's sgd op instead, and that is what the variants are timed on. The job's own
op (this checkout's source) is the baseline and always runs first. Every variant is built under an op namespace of its
own, so all of them load in one process, and the job's step (``Trainer.train_step``: the op with the job's Python
around it) runs them in turn, pass by pass: ``--passes`` rounds, and in each round every variant steps the same
``--batches`` batches of epoch 0. All of them step the same tables, since only the op's speed is measured here, not
its result (the tests check results). Prints the median and best ratings/s per variant, and the median against the
baseline.

Why interleave: on a shared 2-core machine one process's ratings/s moves by ±20% from one minute to the next,
and by about ±3% across variants interleaved this way (session 12, benchmarks/RESULTS.md). A variant that beats
the baseline by less than that has not shown anything. Every other round runs the variants in reverse order, and the
last column pairs each round's variant with that round's baseline (the median of their ratios): where the machine
switches speed for seconds at a time, a median of each variant's own times can put a duplicate of the baseline 4%
apart from it (session 18). Builds are cached by content under ``--build-dir``.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mfscale import config, cpu_step
from mfscale.distributed import DistEnv
from mfscale.train import Trainer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="*", type=Path,
                   help="edited copies of mfscale/csrc/fused_step.cpp (none: the baseline alone)")
    p.add_argument("--data", type=Path, required=True, help="a prepared dataset (python -m mfscale.prepare)")
    p.add_argument("--batches", type=int, default=60, help="batches of epoch 0 each pass steps (default 60)")
    p.add_argument("--passes", type=int, default=8, help="rounds over all variants (default 8)")
    p.add_argument("--warmup", type=int, default=10, help="steps of the baseline before timing (default 10)")
    p.add_argument("--build-dir", type=Path, default=Path.home() / ".cache" / "mfscale-op-variants")
    p.add_argument("--extra", default="", help="more mfscale.train flags for the job (e.g. '--model.day_bias off')")
    return p


def load_variant(source: Path, index: int, build_dir: Path) -> str:
    """Build and load ``source`` under the op namespace ``mfv<index>``; returns the namespace."""
    from torch.utils import cpp_extension

    text = source.read_text(encoding="utf-8")
    ns = f"mfv{index}"
    text = text.replace("TORCH_LIBRARY(mfscale,", f"TORCH_LIBRARY({ns},")
    digest = hashlib.sha256((text + " ".join(cpu_step.CFLAGS) + torch.__version__).encode()).hexdigest()[:12]
    name = f"{ns}_{digest}"
    build = build_dir / name
    build.mkdir(parents=True, exist_ok=True)
    src = build / f"{name}.cpp"
    src.write_text(text, encoding="utf-8")
    cpp_extension.load(name=name, sources=[str(src)], is_python_module=False, build_directory=str(build),
                       extra_cflags=cpu_step.CFLAGS, extra_ldflags=["-fopenmp"])
    return ns


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    for v in a.variants:  # before the job's start-up, which takes seconds
        if not v.is_file():
            raise SystemExit(f"op_variants.py: no such file: {v}")
        if "TORCH_LIBRARY(mfscale," not in v.read_text(encoding="utf-8", errors="replace"):
            raise SystemExit(f"op_variants.py: {v} is not a copy of mfscale/csrc/fused_step.cpp (it defines no "
                             "TORCH_LIBRARY(mfscale, m))")
    names = ["baseline (this checkout)", *(str(v) for v in a.variants)]
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = config.from_args(["--data", str(a.data), "--run-dir", run_dir, "--checkpoint.resume", "never",
                                *a.extra.split()])
        trainer = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
        if trainer.step_fn.kind not in ("cpp", "sgd"):  # the default op, or with --optim.optimizer sgd its sgd op
            raise SystemExit(f"op_variants.py: this job runs the {trainer.step_fn.kind!r} step, not a C++ op")
        ops = torch.ops
        job_op = ops.mfscale  # the baseline: the job's own op, built and loaded by the Trainer
        libs = [job_op, *(getattr(ops, load_variant(v, k, a.build_dir)) for k, v in enumerate(a.variants, 1))]
        batches = [b for _, b in zip(range(a.batches), trainer.layout.batches(0, 0), strict=False)]
        ratings = sum(int(b["global_rows"]) for b in batches)
        seconds: list[list[float]] = [[] for _ in libs]
        try:
            for b in batches[: a.warmup]:
                trainer.train_step(b)
            for rnd in range(a.passes):
                # every other round in reverse order: no variant always runs right after the same one
                for k in range(len(libs)) if rnd % 2 == 0 else reversed(range(len(libs))):
                    ops.mfscale = libs[k]  # cpu_step calls torch.ops.mfscale.fused_step (sgd_step)
                    t0 = time.perf_counter()
                    for b in batches:
                        trainer.train_step(b)
                    seconds[k].append(time.perf_counter() - t0)
        finally:
            ops.mfscale = job_op
    base = statistics.median(seconds[0])
    print(f"### The C++ step's variants: {a.data}, {len(batches)} batches ({ratings:,} ratings) x {a.passes} passes, "
          f"{torch.get_num_threads()} threads\n")
    print("| variant | ratings/s, median | best | vs baseline (median) | vs baseline (median of the rounds' ratios) |\n"
          "|---|---|---|---|---|")
    for name, times in zip(names, seconds, strict=True):
        med = statistics.median(times)
        # paired by round: the machine's speed moves between rounds more than within one
        paired = statistics.median(b / t for b, t in zip(seconds[0], times, strict=True))
        print(f"| {name} | {ratings / med / 1e6:.2f}M | {ratings / min(times) / 1e6:.2f}M | {base / med:.3f}x | "
              f"{paired:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

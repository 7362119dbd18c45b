"""Where a training step's time goes: a torch profiler summary of a few ``Trainer.train_step`` calls.

    python benchmarks/profile_step.py --data data/ml-32m --device cuda --out profile.txt

The job config is the library default (fused step; kernels compiled from 1M training ratings) except what the
flags set; batches are cut before profiling and cycled (as throughput.py's ``step`` mode), and the warm-up
steps (compilation included) are not profiled. Prints one table, sorted by time spent in each operator
itself: GPU time on CUDA, CPU time on the CPU.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from mfscale import config, distributed
from mfscale.config import JobConfig
from mfscale.train import Trainer

PRELOAD_BATCHES = 8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="a prepared dataset (python -m mfscale.prepare)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch-size", type=int, default=0, help="ratings per step (0 = the trainer's auto batch)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--warmup-steps", type=int, default=10, help="unprofiled steps first (compilation, caches)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps")
    p.add_argument("--rows", type=int, default=30, help="operators in the table")
    p.add_argument("--out", type=Path, help="also write the table here")
    p.add_argument("--trace", type=Path, help="also write a Chrome trace (.json or .json.gz)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0:
        raise SystemExit("--steps must be >= 1 and --warmup-steps >= 0")
    env = distributed.init(args.device)
    cfg = config.replace(JobConfig(), run_dir=str(Path(tempfile.gettempdir()) / "mfscale-profile-unused"),
                         data__path=str(args.data), model__dim=args.dim, train__batch_size=args.batch_size,
                         train__precision=args.precision, train__device=args.device,
                         checkpoint__resume="never").validate()
    trainer = Trainer(cfg, env)
    trainer.layout.stream.set_epoch(0)
    dev = env.device
    batches = [{k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()}
               for b in itertools.islice(trainer.layout.stream, PRELOAD_BATCHES)]
    cycle = itertools.cycle(batches)
    for _ in range(args.warmup_steps):
        trainer.train_step(next(cycle))
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            with record_function("train_step"):
                trainer.train_step(next(cycle))
            if cuda:
                torch.cuda.synchronize(dev)  # each step's kernels inside its own record_function range
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=sort_by, row_limit=args.rows)
    except (AttributeError, KeyError):  # a torch older than the device_* names (2.4) calls it cuda
        sort_by = "self_cuda_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=args.rows)
    header = (f"profile: {args.steps} steps after {args.warmup_steps} warm-up, device {dev}"
              f"{' (' + torch.cuda.get_device_name(dev) + ')' if cuda else ''}, torch {torch.__version__}, "
              f"data {args.data} ({trainer.layout.data.split_rows('train'):,} training ratings), "
              f"batch {trainer.layout.batch_size:,}, dim {args.dim}, precision {args.precision}, "
              f"step {trainer.step_fn.kind}; "
              f"sorted by {sort_by}")
    text = header + "\n" + table + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    distributed.destroy()


if __name__ == "__main__":
    main()

"""Step against step: several job configs in one process, their training steps interleaved one by one.

    python benchmarks/step_ab.py --data DIR [--steps 120] [--warmup 10] [--variant NAME="FLAGS" ...]

Each variant is a ``Trainer`` of ``python -m mfscale.train --data DIR`` plus its flags (the first is the baseline;
default: the defaults against ``--model.time_bins 30 --model.user_drift on`` and each alone). Step k of every
variant runs back to back, each on its own epoch-0 batch k, and the median step time over the steps after a warm-up
gives its ratings/s and its ratio to the baseline's. The work before each variant's first step (once per epoch: with
``--model.implicit`` the implicit rows' visit) is timed on its own and added to its steps for an epoch's time. On
a machine whose speed moves from minute to minute (a shared 2-core CPU: the same job 1.3-7M ratings/s within an
hour) the ratio stays put where whole runs in turn do not.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

from mfscale import config, distributed
from mfscale.train import Trainer

DEFAULT_VARIANTS = {"defaults": "", "time_both": "--model.time_bins 30 --model.user_drift on",
                    "time_bins": "--model.time_bins 30", "user_drift": "--model.user_drift on"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the medians")
    p.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                   help="a config to time (repeat; the first is the baseline)")
    p.add_argument("--workdir", default="/tmp/mfscale-step-ab")
    args = p.parse_args(argv)
    variants = dict(v.split("=", 1) for v in args.variant) if args.variant else DEFAULT_VARIANTS
    env = distributed.init("cpu", 600)
    try:
        trainers = {name: Trainer(config.from_args(["--data", args.data, "--run-dir", f"{args.workdir}/{name}",
                                                    "--checkpoint.resume", "never", *shlex.split(flags)]), env)
                    for name, flags in variants.items()}
        batches = {name: iter(t.layout.batches(0, 0)) for name, t in trainers.items()}
        times: dict[str, list[float]] = {name: [] for name in trainers}
        sizes: list[int] = []
        start: dict[str, float] = {}  # each variant's work before its epoch's first step (implicit's visit)
        first: dict[str, dict] = {}
        for name, it in batches.items():
            t0 = time.perf_counter()
            first[name] = next(it)
            start[name] = time.perf_counter() - t0
        for k in range(args.steps):
            try:
                step = first if k == 0 else {name: next(it) for name, it in batches.items()}
            except StopIteration:  # the epoch ended
                break
            sizes.append(len(next(iter(step.values()))["user"]))
            for name, t in trainers.items():
                t0 = time.perf_counter()
                t.train_step(step[name])
                times[name].append(time.perf_counter() - t0)
    finally:
        distributed.destroy()
    warm = args.warmup
    if len(sizes) <= warm:
        raise SystemExit(f"only {len(sizes)} steps: use a larger --steps or a larger dataset")
    ratings = statistics.median(sizes[warm:])
    median = {name: statistics.median(v[warm:]) for name, v in times.items()}
    base = next(iter(median.values()))
    # An epoch: its steps at the median plus the work before its first step (the same batch cutting for every
    # variant; --model.implicit's visit of every rating), once
    epoch = {name: m * trainers[name].layout.steps_per_epoch + start[name] for name, m in median.items()}
    base_epoch = next(iter(epoch.values()))
    print(f"| variant | median step (ms) | ratings/s | vs {next(iter(median))} | before the first step (s) | "
          f"an epoch (s) | epoch vs {next(iter(median))} |")
    print("|---|---|---|---|---|---|---|")
    for name, m in median.items():
        print(f"| {name} | {m * 1e3:.2f} | {ratings / m / 1e6:.2f}M | {base / m:.2f}x | {start[name]:.3f} | "
              f"{epoch[name]:.2f} | {base_epoch / epoch[name]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

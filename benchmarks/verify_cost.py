"""What the shard checks (``--data.verify``, issue 21) cost beside one training epoch, in the same run.

    python -m mfscale.prepare --synthetic ml-10m --out data/ml10m
    python benchmarks/verify_cost.py --data data/ml10m

The epoch is the default job's on one process (``Trainer.train_step`` over every batch of epoch 0, after one
untimed epoch); it is the baseline the checks are a fraction of. The checks, each timed ``--reps`` times on
a fresh ``Dataset`` over the splits a job reads whole (train, val, test), best time kept:

- ``sizes+footers``: what every job checks (``--data.verify auto``, a split streamed rather than read whole);
- ``sha256, first run``: the hash of every shard (``shards.VERIFIED`` removed first): what the first job on a
  prepared dataset pays, in a background thread while the shards are read (``Dataset.reading``);
- ``sha256, shared by N``: the same, as each of N processes on one host hashes its share (``hash_share``);
- ``auto, verified before``: every later job: the stat of each shard against ``shards.VERIFIED``.

Speed is measured, never asserted; the table is printed, and written as one JSON line to ``--out-jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mfscale import config, distributed, shards
from mfscale.shards import Dataset
from mfscale.train import Trainer

SPLITS = ("train", "val", "test")


def epoch_seconds(data: Path, run_dir: Path) -> tuple[float, int]:
    cfg = config.from_args(["--data", str(data), "--run-dir", str(run_dir), "--data.verify", "off"])
    tr = Trainer(cfg, distributed.init("cpu"))
    best, rows = float("inf"), 0
    for epoch in range(2):  # the first is a warm-up (page cache, allocator, C++ op)
        t0 = time.perf_counter()
        rows = 0
        for batch in tr.layout.batches(epoch, 0):
            tr.train_step(batch)
            rows += len(batch["rating"])
        tr.step_fn.reconcile()
        if epoch:
            best = time.perf_counter() - t0
    return best, rows


def best_of(reps: int, fn) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a prepared dataset (python -m mfscale.prepare)")
    p.add_argument("--run-dir", type=Path, default=Path("/tmp/mfscale-verify-cost"))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--shares", type=int, default=2, help="N for the 'shared by N' row")
    p.add_argument("--out-jsonl", type=Path)
    args = p.parse_args()
    verdicts = args.data / shards.VERIFIED

    def hashed(share: tuple[int, int]) -> None:
        verdicts.unlink(missing_ok=True)
        Dataset(args.data, hash_share=share).verify(SPLITS, "auto")

    epoch, rows = epoch_seconds(args.data, args.run_dir)
    total = sum(e.get("bytes", 0) for s in SPLITS for e in Dataset(args.data).manifest["shards"].get(s, []))
    checks = {
        "sizes+footers": best_of(args.reps, lambda: Dataset(args.data).verify(SPLITS, "auto", whole=False)),
        "sha256, first run": best_of(args.reps, lambda: hashed((0, 1))),
        # the slowest share is what a host waits for
        f"sha256, shared by {args.shares}": max(best_of(args.reps, lambda i=i: hashed((i, args.shares)))
                                                for i in range(args.shares)),
    }
    hashed((0, 1))
    checks["auto, verified before"] = best_of(args.reps, lambda: Dataset(args.data).verify(SPLITS, "auto"))
    print(f"one epoch: {epoch:.3f} s ({rows / epoch:,.0f} ratings/s, {rows:,} ratings); "
          f"shards read whole: {total / 1e6:.1f} MB")
    print("| check | seconds | of one epoch |\n|---|---|---|")
    for name, s in checks.items():
        print(f"| {name} | {s:.4f} | {100 * s / epoch:.2f}% |")
    if args.out_jsonl:
        with open(args.out_jsonl, "a") as f:
            f.write(json.dumps({"data": str(args.data), "epoch_s": epoch, "ratings": rows, "bytes": total,
                                "checks_s": checks}) + "\n")


if __name__ == "__main__":
    main()

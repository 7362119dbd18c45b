"""Table layouts side by side: the real training job on 1 process, then on N processes per layout.

    python benchmarks/layouts.py --data data/ml-10m --epochs 3 --nprocs 2
    python benchmarks/layouts.py --data data/big --epochs 1 --nprocs 2,3 --layouts blocks   # memory per rank
    python benchmarks/layouts.py --data data/ml-10m --layouts blocks --block-pieces 1,2,4 --one-thread --rounds 2

Each row is one ``python -m mfscale.train`` (1 process, the baseline, default threads; with ``--one-thread``
also one with OMP_NUM_THREADS=1, what one rank of two gets) or ``torchrun --standalone --nproc_per_node=N -m
mfscale.train --train.tables LAYOUT`` run (cores / N threads per rank; with ``--block-pieces`` one blocks row
per ``--train.block_pieces`` value) with all defaults except what the flags set, into a fresh run directory.
``--rounds`` repeats the whole plan, so the configurations alternate in time on a noisy machine. From each run's
metrics.json: ``train_ratings_per_s`` (training only, no evaluation), test RMSE, the peak RSS of every rank, the
bytes rank 0 sent for the tables per epoch and the collectives per epoch. The ratio columns divide by the
one-process rows of the same round: ``vs 1 process`` by the default-threads one, ``per rank vs 1 thread`` (a
rank's share of the ratings/s) by the one-thread one. Speed is measured here, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str], threads: int) -> tuple[dict, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    run_dir = Path(cmd[cmd.index("--run-dir") + 1])
    return json.loads((run_dir / "metrics.json").read_text()), wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a prepared dataset")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--nprocs", default="2", help="comma list of process counts (besides the 1-process baseline)")
    p.add_argument("--layouts", default="replicated,blocks", help="comma list of --train.tables values")
    p.add_argument("--block-pieces", default="", help="comma list of --train.block_pieces values: one blocks run "
                   "per value (default: the trainer's)")
    p.add_argument("--one-thread", action="store_true", help="also a 1-process run with OMP_NUM_THREADS=1")
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole plan, alternating (default 1)")
    p.add_argument("--extra", default="", help="more flags for mfscale.train, one string")
    p.add_argument("--out-jsonl", type=Path)
    a = p.parse_args(argv)
    cores = os.cpu_count() or 1
    common = ["--data", str(a.data), "--epochs", str(a.epochs), "--train.ranking_k", "0", *shlex.split(a.extra)]
    pieces = [int(x) for x in a.block_pieces.split(",") if x.strip()] or [None]
    # (processes, tables, threads per process, block pieces)
    plan: list[tuple[int, str, int, int | None]] = [(1, "replicated", cores, None)]
    if a.one_thread:
        plan.append((1, "replicated", 1, None))
    for n in (int(x) for x in a.nprocs.split(",")):
        for lay in a.layouts.split(","):
            for piece in (pieces if lay == "blocks" else [None]):
                # torchrun gives each worker OMP_NUM_THREADS=1 unless set: share the cores between the ranks
                plan.append((n, lay, max(1, cores // n), piece))
    # Build the C++ step op first: the trainer loads it at its first step, inside the timed loop of the first run.
    subprocess.run([sys.executable, "-c", "from mfscale import cpu_step\ntry:\n    cpu_step.load()\n"
                    "except cpu_step.KernelUnavailable:\n    pass"], capture_output=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mfscale-layouts-") as tmp:
        for round_ in range(1, a.rounds + 1):
            for k, (n, lay, threads, piece) in enumerate(plan):
                run_dir = str(Path(tmp) / f"r{round_}-{k}-{lay}-{n}")
                flags = [] if piece is None else ["--train.block_pieces", str(piece)]
                if n == 1:
                    cmd = [sys.executable, "-m", "mfscale.train", *common, "--run-dir", run_dir]
                else:
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           "-m", "mfscale.train", *common, "--run-dir", run_dir, "--train.tables", lay, *flags]
                metrics, wall = run(cmd, threads)
                rows.append({"round": round_, "nprocs": n, "threads": threads, "tables": metrics["tables"],
                             "block_pieces": piece, "train_ratings_per_s": metrics["train_ratings_per_s"],
                             "test_rmse": metrics["test_rmse"], "wall_s": wall, "epochs": metrics["epochs"],
                             "steps": metrics["steps"], "collectives_per_epoch": metrics["collectives_per_epoch"],
                             "peak_rss_mib_per_rank": metrics["peak_rss_mib_per_rank"],
                             "table_mb_sent_per_epoch_rank0": metrics["table_bytes_sent"] / metrics["epochs"] / 1e6,
                             "batch_size": metrics["batch_size"], "command": shlex.join(cmd)})
                print(f"done: round {round_}, {n} process(es) x {threads} thread(s), {metrics['tables']}"
                      f"{'' if piece is None else f' P={piece}'}: {metrics['train_ratings_per_s']:,.0f} ratings/s",
                      file=sys.stderr)
    print(f"### Table layouts: {a.data}, {a.epochs} epochs, {platform.processor() or platform.machine()} "
          f"({cores} cores), {time.strftime('%Y-%m-%d')}\n")
    print("| round | processes x threads | tables | block pieces | train ratings/s | vs 1 process | "
          "per rank vs 1 thread | test RMSE | collectives per epoch | peak RSS per rank (MiB) | "
          "table MB sent per epoch (rank 0) | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = [x for x in rows if x["round"] == r["round"] and x["nprocs"] == 1]
        base = same[0]["train_ratings_per_s"]
        one = [x["train_ratings_per_s"] for x in same if x["threads"] == 1]
        per_rank = f"{r['train_ratings_per_s'] / r['nprocs'] / one[0]:.2f}x" if one else ""
        rss = ", ".join(f"{x:,.0f}" for x in r["peak_rss_mib_per_rank"])
        print(f"| {r['round']} | {r['nprocs']} x {r['threads']} | {r['tables']} | {r['block_pieces'] or ''} | "
              f"{r['train_ratings_per_s']:,.0f} | {r['train_ratings_per_s'] / base:.2f}x | {per_rank} | "
              f"{r['test_rmse']:.4f} | {r['collectives_per_epoch']} | {rss} | "
              f"{r['table_mb_sent_per_epoch_rank0']:,.1f} | {r['wall_s']:.0f} |")
    if a.out_jsonl:
        with open(a.out_jsonl, "a") as f:
            for r in rows:
                f.write(json.dumps({"data": str(a.data), **r}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

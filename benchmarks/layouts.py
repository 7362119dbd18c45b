"""Table layouts side by side: the real training job on 1 process, then on N processes per layout.

    python benchmarks/layouts.py --data data/ml-10m --epochs 3 --nprocs 2
    python benchmarks/layouts.py --data data/big --epochs 1 --nprocs 2,3 --layouts blocks   # memory per rank

Each row is one ``python -m mfscale.train`` (1 process, the baseline) or ``torchrun --standalone
--nproc_per_node=N -m mfscale.train --train.tables LAYOUT`` run with all defaults except what the flags
set, into a fresh run directory. From each run's metrics.json: ``train_ratings_per_s`` (training only, no
evaluation), test RMSE, the peak RSS of every rank, and the bytes rank 0 sent for the tables per epoch.
The ratio column divides by the one-process row of the same run. Speed is measured here, never asserted.
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
    p.add_argument("--extra", default="", help="more flags for mfscale.train, one string")
    p.add_argument("--out-jsonl", type=Path)
    a = p.parse_args(argv)
    cores = os.cpu_count() or 1
    common = ["--data", str(a.data), "--epochs", str(a.epochs), "--train.ranking_k", "0", *shlex.split(a.extra)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mfscale-layouts-") as tmp:
        plan = [(1, "replicated")] + [(int(n), lay) for n in a.nprocs.split(",") for lay in a.layouts.split(",")]
        for n, lay in plan:
            run_dir = str(Path(tmp) / f"{lay}-{n}")
            if n == 1:
                cmd = [sys.executable, "-m", "mfscale.train", *common, "--run-dir", run_dir]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                       "-m", "mfscale.train", *common, "--run-dir", run_dir, "--train.tables", lay]
            # torchrun gives each worker OMP_NUM_THREADS=1 unless set: share the cores between the ranks
            metrics, wall = run(cmd, max(1, cores // n))
            rows.append({"nprocs": n, "tables": metrics["tables"],
                         "train_ratings_per_s": metrics["train_ratings_per_s"],
                         "test_rmse": metrics["test_rmse"], "wall_s": wall, "epochs": metrics["epochs"],
                         "peak_rss_mib_per_rank": metrics["peak_rss_mib_per_rank"],
                         "table_mb_sent_per_epoch_rank0": metrics["table_bytes_sent"] / metrics["epochs"] / 1e6,
                         "batch_size": metrics["batch_size"], "command": shlex.join(cmd)})
            print(f"done: {n} process(es), {metrics['tables']}: {metrics['train_ratings_per_s']:,.0f} ratings/s",
                  file=sys.stderr)
    base = rows[0]["train_ratings_per_s"]
    print(f"### Table layouts: {a.data}, {a.epochs} epochs, {platform.processor() or platform.machine()} "
          f"({cores} cores), {time.strftime('%Y-%m-%d')}\n")
    print("| processes | tables | train ratings/s | vs 1 process | test RMSE | peak RSS per rank (MiB) | "
          "table MB sent per epoch (rank 0) | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rss = ", ".join(f"{x:,.0f}" for x in r["peak_rss_mib_per_rank"])
        print(f"| {r['nprocs']} | {r['tables']} | {r['train_ratings_per_s']:,.0f} | "
              f"{r['train_ratings_per_s'] / base:.2f}x | {r['test_rmse']:.4f} | {rss} | "
              f"{r['table_mb_sent_per_epoch_rank0']:,.1f} | {r['wall_s']:.0f} |")
    if a.out_jsonl:
        with open(a.out_jsonl, "a") as f:
            for r in rows:
                f.write(json.dumps({"data": str(a.data), **r}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

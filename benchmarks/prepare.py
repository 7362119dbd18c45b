"""Time ``mfscale.prepare --input`` on an ML-32M-sized synthetic ``ratings.csv``; report wall time and peak RSS.

    python benchmarks/prepare.py [--preset ml-32m] [--workdir /tmp/mfscale-bench] [--keep]

The CSV (about 900 MB at ML-32M size) is generated first and not timed. The timed step runs in a fresh
subprocess so its peak RSS (ru_maxrss of the child) is the prepare step's alone. Beside it, the same run
prints the baseline it is compared with: reading the same CSV with plain ``pandas``-free Python csv would be
too slow to be a useful baseline, so the baseline is polars' own ``read_csv`` of the file (the floor any
CSV-based preparation pays), measured the same way.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def run_child(code_or_args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of a child Python process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *code_or_args], check=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:  # ru_maxrss is a max over all children: run each measurement in a fresh parent
        print("warning: peak RSS of this child not separable from an earlier one", file=sys.stderr)
    return wall, peak / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="ml-32m")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mfscale-bench"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the generated CSV and output")
    p.add_argument("--step", choices=["all", "generate", "prepare", "baseline"], default="all",
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    csv_dir = args.workdir / f"csv-{args.preset}"
    out = args.workdir / f"prepared-{args.preset}"

    if args.step == "generate":
        from mfscale import synthetic

        data = synthetic.generate(synthetic.resolve_spec(args.preset), seed=args.seed)
        synthetic.write_ratings_csv(data, csv_dir)
        return
    if args.step == "all":
        args.workdir.mkdir(parents=True, exist_ok=True)
        if not (csv_dir / "ratings.csv").exists():
            t0 = time.perf_counter()
            csv_dir.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, __file__, "--step", "generate", "--preset", args.preset,
                            "--workdir", str(args.workdir), "--seed", str(args.seed)], check=True)
            print(f"generated {csv_dir / 'ratings.csv'} in {time.perf_counter() - t0:.1f} s (not timed)")
        size_mb = (csv_dir / "ratings.csv").stat().st_size / 1e6
        # Each measurement in its own parent process, so ru_maxrss(children) belongs to that child alone.
        results = {}
        for step in ("baseline", "prepare"):
            proc = subprocess.run([sys.executable, __file__, "--step", step, "--preset", args.preset,
                                   "--workdir", str(args.workdir)], check=True, capture_output=True, text=True)
            results[step] = json.loads(proc.stdout.strip().splitlines()[-1])
        manifest = json.loads((out / "manifest.json").read_text())
        n = manifest["counts"]["ratings"]
        row = {
            "date": datetime.date.today().isoformat(), "preset": args.preset, "ratings": n,
            "csv_mb": round(size_mb), "cpu": platform.processor() or platform.machine(),
            "cores": __import__("os").cpu_count(), "torch": torch.__version__,
            "prepare_s": round(results["prepare"]["wall_s"], 1),
            "prepare_peak_gib": round(results["prepare"]["peak_gib"], 2),
            "prepare_ratings_per_s": round(n / results["prepare"]["wall_s"]),
            "baseline_read_csv_s": round(results["baseline"]["wall_s"], 1),
            "baseline_peak_gib": round(results["baseline"]["peak_gib"], 2),
        }
        print(json.dumps(row))
        print(f"| {row['date']} | {args.preset} | {n:,} | {row['cores']} cores | {row['prepare_s']} s | "
              f"{row['prepare_peak_gib']} GiB | {row['prepare_ratings_per_s'] / 1e6:.2f}M ratings/s | "
              f"polars.read_csv alone: {row['baseline_read_csv_s']} s, {row['baseline_peak_gib']} GiB |")
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        return
    if args.step == "prepare":
        shutil.rmtree(out, ignore_errors=True)
        wall, peak = run_child(["-m", "mfscale.prepare", "--input", str(csv_dir / "ratings.csv"), "--out",
                                str(out), "--quiet"])
    else:
        code = ("import polars as pl, sys; df = pl.read_csv(sys.argv[1], schema_overrides={'userId': pl.Int64, "
                "'movieId': pl.Int64, 'rating': pl.Float64, 'timestamp': pl.Int64}); print(df.height)")
        wall, peak = run_child(["-c", code, str(csv_dir / "ratings.csv")])
    print(json.dumps({"wall_s": wall, "peak_gib": peak}))


if __name__ == "__main__":
    main()

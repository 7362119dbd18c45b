"""Issue 24's model options beside the defaults: test RMSE of plain MF (``--model.biases off``) and of
``--model.max_norm`` against biased MF with L2 alone, over several training seeds; issue 23's time-aware biases too
(``time_bins``, ``user_drift``, ``time_both``).

    python benchmarks/model_options.py --data DIR [--seeds 0,1,2] [--variants defaults,plain,...]
        [--workdir /tmp/mfscale-options] [--extra "--epochs 20"] [--out-jsonl FILE]

Each (variant, seed) is one real job, ``python -m mfscale.train`` in a fresh process with the defaults plus the
variant's flags (``VARIANTS``), run one after another. Its metrics.json gives the test RMSE (clipped to the rating
scale), NDCG@10, the best epoch and the training speed; the saved model (``mfscale.runs.load_run``: vectors as the
run predicts with them) gives the share of movie vectors at norm >= 0.99 (at the bound where max_norm is 1; for
the others: how often a bound of 1 would bind). Prints a markdown table: per variant the mean and the per-seed
test RMSE, and the change against ``defaults``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "defaults": ("biased MF, L2 (all defaults)", []),
    "plain": ("plain MF: no biases, L2", ["--model.biases", "off"]),
    "plain_60": ("plain MF, L2, up to 60 epochs (converged)", ["--model.biases", "off", "--epochs", "60"]),
    "plain_no_l2": ("plain MF, no L2 (a notebook's MSE alone)", ["--model.biases", "off", "--optim.reg_factor", "0"]),
    "max_norm": ("biased MF, L2 and max_norm 1", ["--model.max_norm", "1"]),
    "max_norm_no_l2": ("biased MF, max_norm 1 instead of L2 on the factors",
                       ["--model.max_norm", "1", "--optim.reg_factor", "0"]),
    "max_norm_2": ("biased MF, L2 and max_norm 2", ["--model.max_norm", "2"]),
    "max_norm_2_no_l2": ("biased MF, max_norm 2 instead of L2 on the factors",
                         ["--model.max_norm", "2", "--optim.reg_factor", "0"]),
    "plain_max_norm_no_l2": ("plain MF, max_norm 1, no L2 (a notebook with max_norm=1)",
                             ["--model.biases", "off", "--model.max_norm", "1", "--optim.reg_factor", "0"]),
    # issue 23's time-aware biases (benchmarks/RESULTS.md, session 14)
    "time_bins": ("+ an item bias per time bin (30 bins)", ["--model.time_bins", "30"]),
    "user_drift": ("+ each user's drift alpha_u dev_u(t)", ["--model.user_drift", "on"]),
    "time_both": ("+ time bins and user drift", ["--model.time_bins", "30", "--model.user_drift", "on"]),
}


def run_one(data: str, run_dir: Path, seed: int, flags: list[str], extra: list[str]) -> dict:
    """One training job; its metrics plus the movie vectors' norms and the wall time."""
    cmd = [sys.executable, "-m", "mfscale.train", "--data", data, "--run-dir", str(run_dir), "--seed", str(seed),
           "--checkpoint.resume", "never", *flags, *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    from mfscale.runs import load_run

    model_run = load_run(run_dir)
    trained = torch.from_numpy(model_run.movies["n_train"].to_numpy() > 0)
    norms = model_run.model.factors()[2].detach()[trained].norm(dim=1)
    return {"test_rmse": metrics["test_rmse"], "ndcg@10": metrics.get("ndcg@10"), "best_epoch": metrics["best_epoch"],
            "epochs": metrics["epochs"], "train_ratings_per_s": metrics["train_ratings_per_s"], "wall_s": wall,
            "movie_norm_median": float(norms.median()), "movie_norm_ge_099": float((norms >= 0.99).double().mean()),
            "command": shlex.join(cmd[1:])}


def table(rows: list[dict], variants: list[str], seeds: list[int]) -> str:
    by = {(r["variant"], r["seed"]): r for r in rows}
    base = [by[("defaults", s)]["test_rmse"] for s in seeds if ("defaults", s) in by]
    base_mean = statistics.mean(base) if base else None
    head = ("| variant | flags | test RMSE, mean | vs defaults | per seed | NDCG@10 | best epoch | movie vectors "
            "norm >= 0.99 | median norm | train ratings/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for v in variants:
        rs = [by[(v, s)] for s in seeds if (v, s) in by]
        if not rs:
            continue
        rmse = statistics.mean(r["test_rmse"] for r in rs)
        delta = f"{rmse - base_mean:+.4f}" if base_mean is not None and v != "defaults" else ""
        ndcg = [r["ndcg@10"] for r in rs if r["ndcg@10"] is not None]
        cells = [VARIANTS[v][0], f"`{' '.join(VARIANTS[v][1]) or '(none)'}`", f"{rmse:.4f}", delta,
                 ", ".join(f"{r['test_rmse']:.4f}" for r in rs), f"{statistics.mean(ndcg):.4f}" if ndcg else "",
                 ", ".join(str(r["best_epoch"]) for r in rs),
                 f"{100 * statistics.mean(r['movie_norm_ge_099'] for r in rs):.1f}%",
                 f"{statistics.mean(r['movie_norm_median'] for r in rs):.3f}",
                 f"{statistics.mean(r['train_ratings_per_s'] for r in rs) / 1e6:.2f}M"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated (default 0,1,2)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--workdir", default="/tmp/mfscale-options", help="run directories go here")
    p.add_argument("--extra", default="", help="more mfscale.train flags for every run, one string")
    p.add_argument("--out-jsonl", help="one JSON line per run (appended)")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing: print the table of the runs in --out-jsonl (the last run of each variant/seed)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if args.table_only:
        if not args.out_jsonl:
            raise SystemExit("--table-only reads --out-jsonl")
        print(table([json.loads(line) for line in Path(args.out_jsonl).read_text().splitlines()], variants, seeds))
        return
    rows = []
    for seed in seeds:
        for v in variants:
            row = {"variant": v, "seed": seed, **run_one(args.data, Path(args.workdir) / f"{v}-s{seed}", seed,
                                                         VARIANTS[v][1], shlex.split(args.extra))}
            rows.append(row)
            print(f"{v} seed {seed}: test RMSE {row['test_rmse']:.4f} (best epoch {row['best_epoch']}, "
                  f"{row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
            if args.out_jsonl:
                with open(args.out_jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(table(rows, variants, seeds))


if __name__ == "__main__":
    main()

"""Fold-in of new users against training them in (issue 23): RMSE on their held-out ratings, and its time.

    python benchmarks/foldin.py --input path/to/ml-latest-small/ratings.csv --work /tmp/foldin
    python benchmarks/foldin.py --synthetic ml-1m --work /tmp/foldin-ml1m

A seeded ``--frac`` of the users is held out. Each held-out user's ratings are split in half at random: the
fold-in half and the evaluation half. Two datasets are prepared with the evaluation halves as their test set
(``prepare --test-input``), and the job trains on each with its defaults:

- ``without``: the other users only. Then the held-out users are folded in from their fold-in halves
  (``recommend.fold_in``, the run fixed, at the run's calibrated prior or ``--prior``) and their evaluation
  halves predicted (``predict_folded``);
- ``with``: the other users plus the fold-in halves: the baseline, a run that trained on them.

Both report RMSE on the same evaluation halves, predictions clipped to the rating scale. The ``with`` run's
validation split is a random 5% of its input (prepare's default ``--val-frac``), fold-in halves included, so it
trains on ~95% of them while the fold-in uses all: a small edge for the fold-in, stated beside the numbers.
Times: the fold-in and prediction of every held-out user (the run already loaded), and one user's fold-in plus
top 10 (``recommend --ratings``'s work after loading). Speed is measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]


def sh(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH")) if x)}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"foldin.py: {' '.join(args[:3])} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path, help="a MovieLens ratings file")
    src.add_argument("--synthetic", metavar="PRESET", help="a synthetic preset (mfscale.synthetic), as a CSV")
    p.add_argument("--work", type=Path, required=True, help="working directory (datasets, runs)")
    p.add_argument("--frac", type=float, default=0.1, help="share of users held out (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-args", default="", help="extra flags for both training runs")
    p.add_argument("--prior", type=float, help="fold-in prior (default: the run's calibrated one; 0: the training "
                   "objective exactly)")
    p.add_argument("--out-jsonl", type=Path)
    a = p.parse_args()

    from mfscale import formats, synthetic
    from mfscale.recommend import Recommender, fold_in, fold_in_prior
    from mfscale.runs import load_run

    a.work.mkdir(parents=True, exist_ok=True)
    source = a.input
    if a.synthetic:
        source = synthetic.write_ratings_csv(synthetic.generate(synthetic.resolve_spec(a.synthetic), seed=a.seed),
                                             a.work / "synthetic")
    df = formats.read_ratings(source)
    rng = np.random.default_rng(a.seed)
    users = np.unique(df["user_id"].to_numpy())
    held = rng.choice(users, max(1, round(a.frac * len(users))), replace=False)
    is_held = df["user_id"].is_in(held.tolist())
    held_df = df.filter(is_held).with_columns(half=pl.Series(rng.random(int(is_held.sum())) < 0.5))
    fold, evaluate = held_df.filter(pl.col("half")).drop("half"), held_df.filter(~pl.col("half")).drop("half")
    header = {"user_id": "userId", "movie_id": "movieId", "rating": "rating", "timestamp": "timestamp"}
    files = {"without": df.filter(~is_held), "with": pl.concat([df.filter(~is_held), fold]), "eval": evaluate,
             "fold": fold}
    for name, frame in files.items():
        frame.rename(header).write_csv(a.work / f"{name}.csv")
    rmse, runs = {}, {}
    for name in ("without", "with"):
        data, run_dir = a.work / f"data-{name}", a.work / f"run-{name}"
        sh("-m", "mfscale.prepare", "--input", str(a.work / f"{name}.csv"), "--test-input",
           str(a.work / "eval.csv"), "--out", str(data), "--seed", str(a.seed), "--overwrite", "--quiet")
        sh("-m", "mfscale.train", "--data", str(data), "--run-dir", str(run_dir), "--seed", str(a.seed),
           "--train.ranking_k", "0", "--checkpoint.resume", "never", *a.train_args.split())
        runs[name] = load_run(run_dir)
    # Movies rated only by held-out users are not in the "without" dataset: those ratings are left out of the
    # fold-in and of the evaluation (for both runs, so both are scored on the same ratings).
    known = runs["without"].movies["movie_id"].to_list()
    dropped = (fold.height - fold.filter(pl.col("movie_id").is_in(known)).height,
               evaluate.height - evaluate.filter(pl.col("movie_id").is_in(known)).height)
    fold, evaluate = fold.filter(pl.col("movie_id").is_in(known)), evaluate.filter(pl.col("movie_id").is_in(known))
    lo, hi = runs["with"].rating_range
    truth = evaluate["rating"].to_numpy()

    # trained in: the model's own prediction of the evaluation halves
    run = runs["with"]
    urow = np.searchsorted(run.users["user_id"].to_numpy(), evaluate["user_id"].to_numpy())
    irow = np.searchsorted(run.movies["movie_id"].to_numpy(), evaluate["movie_id"].to_numpy())
    import torch

    pred = run.model.predict(torch.from_numpy(urow), torch.from_numpy(irow)).clamp(lo, hi).numpy()
    rmse["trained in"] = float(np.sqrt(np.mean((pred - truth) ** 2)))

    run = runs["without"]
    rec = Recommender(run)
    t0 = time.perf_counter()
    calibration = fold_in_prior(run)  # once per run (then kept in RUN/foldin.json): timed on its own
    calibrate_seconds = time.perf_counter() - t0
    prior = calibration["prior"] if a.prior is None else a.prior
    t0 = time.perf_counter()
    folded = fold_in(run, fold, prior=prior)
    pred = rec.predict_folded(folded, evaluate.select("user_id", "movie_id"))
    fold_seconds = time.perf_counter() - t0
    rmse["folded in"] = float(np.sqrt(np.mean((pred - truth) ** 2)))
    one = fold.filter(pl.col("user_id") == int(held[0]))
    t0 = time.perf_counter()
    rec.top_k(np.array([0]), 10, fold_in(run, one, prior=prior))
    one_seconds = time.perf_counter() - t0

    print(f"{len(held):,} of {len(users):,} users held out ({a.frac:.0%}, seed {a.seed}); fold-in halves "
          f"{fold.height:,} ratings, evaluation halves {evaluate.height:,} (left out, their movies unknown without "
          f"the held-out users: {dropped[0]} and {dropped[1]})")
    print("| held-out users | RMSE on their evaluation halves |\n|---|---|")
    for name, value in rmse.items():
        print(f"| {name} | {value:.4f} |")
    print(f"fold-in minus trained-in: {rmse['folded in'] - rmse['trained in']:+.4f} (fold-in prior {prior:g}"
          f"{'' if a.prior is not None else ', calibrated on the run without them'})")
    print(f"time: fold-in + predictions of all {len(held):,} users {fold_seconds:.3f} s; one user's fold-in + "
          f"top 10 {one_seconds * 1000:.1f} ms ({one.height} ratings; the run already loaded); the prior's calibration "
          f"(once per run) {calibrate_seconds:.3f} s on {calibration['users']:,} training users")
    if a.out_jsonl:
        with open(a.out_jsonl, "a") as f:
            f.write(json.dumps({"source": str(a.input or a.synthetic), "seed": a.seed, "frac": a.frac,
                                "held_users": len(held), "rmse": rmse, "fold_seconds": fold_seconds, "prior": prior,
                                "calibration": calibration, "calibrate_seconds": calibrate_seconds,
                                "one_user_seconds": one_seconds}) + "\n")


if __name__ == "__main__":
    main()

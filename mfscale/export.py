"""``python -m mfscale.export --run DIR --out DIR``: a trained model as plain Parquet and NumPy files.

The export needs neither mfscale nor torch to use: ``users.parquet``/``movies.parquet`` carry the ids,
biases and factors (a fixed-size list column) beside the movie metadata, and the same numbers are in
``.npy`` arrays aligned row by row with ``user_ids.npy``/``movie_ids.npy``; a run with user-day biases adds them
(``user_day_*.npy`` and ``user_day_bias.parquet``: user, day, bias). ``meta.json`` and ``README.txt`` say how to
predict. The directory is assembled under a temporary name and renamed into
place, so a reader never sees a partial export; an existing one is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .daybias import DAY_BITS
from .errors import ConfigError, DataError, cli_entry
from .recommend import fold_in_prior
from .runs import Run, load_run
from .shards import install_dir, staging_dir
from .timebias import DRIFT_POWER

PROG = "mfscale.export"
EXPORT_FORMAT = 1

README = """\
mfscale model export (format {fmt})
==================================

{model}

Files (row r of every user file is the same user, row r of every movie file the same movie):
  user_ids.npy      int64 (n_users,)       original MovieLens userId of each row
  movie_ids.npy     int64 (n_movies,)      original MovieLens movieId of each row
  user_factors.npy  float32 (n_users, {dim})
  item_factors.npy  float32 (n_movies, {dim})
  user_bias.npy     float32 (n_users,)
  item_bias.npy     float32 (n_movies,)
  global_mean.npy   float32 ()             the global bias
  users.parquet     user_id, n_train, bias, factors (fixed-size list of {dim} float32)
  movies.parquet    movie_id, title, year, genres, n_train, bias, factors
  meta.json         dimensions, rating scale, source run and checkpoint
{day_files}
n_train is the number of training ratings; rows with n_train = 0 were never trained (their factors are
the random initialization), so predictions for them are close to the global mean plus any known bias.

Predict with NumPy only:

    import numpy as np
    d = "path/to/this/directory"
    P, Q = np.load(f"{{d}}/user_factors.npy"), np.load(f"{{d}}/item_factors.npy")
    bu, bi = np.load(f"{{d}}/user_bias.npy"), np.load(f"{{d}}/item_bias.npy")
    mu = np.load(f"{{d}}/global_mean.npy")
    urow = {{int(u): r for r, u in enumerate(np.load(f"{{d}}/user_ids.npy"))}}
    mrow = {{int(m): r for r, m in enumerate(np.load(f"{{d}}/movie_ids.npy"))}}
    u, i = urow[USER_ID], mrow[MOVIE_ID]
    rating = np.clip(mu + bu[u] + bi[i] + P[u] @ Q[i], {lo:g}, {hi:g})
    all_movies_for_u = np.clip(mu + bu[u] + bi + Q @ P[u], {lo:g}, {hi:g})
{day_note}{time_note}
With pyarrow: pyarrow.parquet.read_table(f"{{d}}/movies.parquet"); the factors column converts with
np.stack(table["factors"].to_numpy(zero_copy_only=False)).

Fold in a new user (not in training) from their ratings, without retraining: the training objective with
the movies fixed and the L2 of "prior" more ratings than the user gave, a ridge regression (mfscale.recommend
--ratings does exactly this). reg_factor, reg_bias and prior are in meta.json ("fold_in"; the prior was
calibrated on the run's validation split: a user with fewer ratings than dimensions is otherwise almost
unregularized); movies with n_train = 0 are best left out (their factors are untrained):

    import json
    meta = json.load(open(f"{{d}}/meta.json"))
    lam_f, lam_b = meta["fold_in"]["reg_factor"], meta["fold_in"]["reg_bias"]
    prior = meta["fold_in"]["prior"]
    rows = np.array([mrow[m] for m in NEW_USER_MOVIE_IDS])       # the movies they rated
    r = np.array(NEW_USER_RATINGS, dtype=np.float64)
    X = np.hstack([Q[rows], np.ones((len(rows), 1))])            # [q_i, 1]
    y = r - mu - bi[rows]
    lam = np.r_[np.full(Q.shape[1], lam_f), lam_b] * (len(rows) + prior)   # per-rating L2: n ratings + prior
    z = np.zeros(Q.shape[1])                                      # what the L2 pulls p toward:
    if meta["implicit"]:                                          # --model.implicit: the rated movies' y rows
        z = np.load(f"{{d}}/item_implicit.npy")[rows].sum(0) / np.sqrt(len(rows))
    w = np.linalg.solve(X.T @ X + np.diag(lam), X.T @ y + lam * np.r_[z, 0])
    p_new, b_new = w[:-1], w[-1]
    scores = np.clip(mu + b_new + bi + Q @ p_new, {lo:g}, {hi:g})
{fold_in_note}"""
_NO_BIASES = ("This model has no biases: drop the ones column, lam_b and the 0 after z (X = Q[rows], y = r, "
              "lam * z), and b_new = 0.\n")
_CAPPED = "This model caps factor vectors at norm {max_norm:g}: scale p_new down to that norm if it is longer.\n"
FOLD_IN_NOTES = {(True, False): "", (False, False): "\n" + _NO_BIASES, (True, True): "\n" + _CAPPED,
                 (False, True): "\n" + _NO_BIASES + _CAPPED}


DAY_FILES = """\
  user_day_user_ids.npy  int64 (n_days,)  the user (original userId) of each user-day bias
  user_day_days.npy      int32 (n_days,)  its day: unix time // 86400 (UTC)
  user_day_bias.npy      float32 (n_days,)
  user_day_bias.parquet  user_id, day, bias: the same rows, sorted by user and day
"""
DAY_NOTE = """
This model was trained with user-day biases (--model.day_bias): a rating made on a day (UTC) on which the same user
has training ratings adds that day's bias (a user's day bias moves all of their predictions of that day alike: it
never reorders a top-N list; without a time, or on a day without training ratings, it is 0):

    day_bias = dict(zip(zip(np.load(f"{{d}}/user_day_user_ids.npy").tolist(),
                            np.load(f"{{d}}/user_day_days.npy").tolist()), np.load(f"{{d}}/user_day_bias.npy")))
    rating = np.clip(mu + bu[u] + bi[i] + day_bias.get((USER_ID, TIMESTAMP // 86400), 0.0) + P[u] @ Q[i],
                     {lo:g}, {hi:g})
"""


TIME_FILES = """\
  item_time_bias.npy     float32 (n_movies, {bins})  each movie's bias per time bin (--model.time_bins; 0 without)
  user_drift.npy         float32 (n_users,)  alpha_u, each user's drift (--model.user_drift; 0 without)
  user_mean_day.npy      float32 (n_users,)  t_u, the mean day of the user's training ratings
"""
IMPLICIT_FILES = """\
  item_implicit.npy      float32 (n_movies, dim)  y_j, each movie's implicit row (--model.implicit, SVD++): the user
                         factors already hold their implicit part; a new user's fold-in is pulled toward it (below)
"""
TIME_NOTE = """
This model was trained with time-aware biases (--model.time_bins {bins}, --model.user_drift {drift}): a rating
made at TIMESTAMP adds its movie's bias for the time bin of its day and the user's drift (both inside the clip;
first_day and last_day, the training ratings' first and last day, are in meta.json "time_bias"):

    t = meta["time_bias"]                      # meta = json.load(open(f"{{d}}/meta.json"))
    day = TIMESTAMP // 86400
    b = min(max((day - t["first_day"]) * t["bins"] // (t["last_day"] - t["first_day"] + 1), 0), t["bins"] - 1)
    x = day - np.load(f"{{d}}/user_mean_day.npy")[u]
    dev = np.sign(x) * abs(x) ** 0.4
    rating += np.load(f"{{d}}/item_time_bias.npy")[i, b] + np.load(f"{{d}}/user_drift.npy")[u] * dev

Without a time (mfscale's recommend: top-N lists, fold-in, --predict), use the last bin, b = bins - 1 (the movie's
most recent popularity), and leave the drift out (it moves all of a user's predictions alike, and extrapolated past
the training ratings it grows without bound).
"""


MODEL_TEXT = {
    True: "Model: biased matrix factorization, rating(u, i) ~ global_mean + user_bias[u] + item_bias[i]\n"
          "       + dot(user_factors[u], item_factors[i]), clipped to the rating scale [{lo:g}, {hi:g}].",
    # plain MF (--model.biases off): the bias files are kept, all zeros, so one reader serves both kinds
    False: "Model: plain matrix factorization (trained without biases), rating(u, i) ~ dot(user_factors[u],\n"
           "       item_factors[i]), clipped to the rating scale [{lo:g}, {hi:g}]. user_bias, item_bias and\n"
           "       global_mean are all 0, so the formulas below give the same numbers.",
}
MAX_NORM_TEXT = ("\nThe factor vectors are the ones the model predicts with: trained with\n"
                 "--model.max_norm {max_norm:g} (nn.Embedding(max_norm=...)), each is already renormalized to norm\n"
                 "<= {max_norm:g}.\n")


def _fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def write_export(run: Run, directory: Path) -> dict:
    """Write every export file into the (existing, empty) ``directory``; return the meta record."""
    p, bu, q, bi = (t.detach().numpy().astype(np.float32) for t in run.model.factors())
    p, q = np.ascontiguousarray(p), np.ascontiguousarray(q)
    user_ids = run.users["user_id"].to_numpy().astype(np.int64)
    movie_ids = run.movies["movie_id"].to_numpy().astype(np.int64)
    mean = np.float32(run.model.global_bias.detach().item())
    arrays = {"user_factors": p, "item_factors": q, "user_bias": bu, "item_bias": bi, "user_ids": user_ids,
              "movie_ids": movie_ids, "global_mean": np.array(mean, dtype=np.float32)}
    for name, arr in arrays.items():
        np.save(directory / f"{name}.npy", arr)

    users = pa.table({"user_id": user_ids, "n_train": run.users["n_train"].to_arrow(), "bias": bu,
                      "factors": _fixed_list(p)})
    m = run.movies
    movies = pa.table({"movie_id": movie_ids, "title": m["title"].to_arrow(), "year": m["year"].to_arrow(),
                       "genres": m["genres"].to_arrow(), "n_train": m["n_train"].to_arrow(), "bias": bi,
                       "factors": _fixed_list(q)})
    pq.write_table(users, directory / "users.parquet")
    pq.write_table(movies, directory / "movies.parquet")
    files = [f"{n}.npy" for n in arrays] + ["users.parquet", "movies.parquet", "README.txt"]
    days = run.day_biases()
    if days is not None:  # --model.day_bias: keyed by (global user index << DAY_BITS) + day
        keys, values = days
        day_arrays = {"user_day_user_ids": user_ids[keys >> DAY_BITS],
                      "user_day_days": (keys & ((1 << DAY_BITS) - 1)).astype(np.int32),
                      "user_day_bias": values.astype(np.float32)}
        for name, arr in day_arrays.items():
            np.save(directory / f"{name}.npy", arr)
        pq.write_table(pa.table({"user_id": day_arrays["user_day_user_ids"], "day": day_arrays["user_day_days"],
                                 "bias": day_arrays["user_day_bias"]}), directory / "user_day_bias.parquet")
        files += [f"{n}.npy" for n in day_arrays] + ["user_day_bias.parquet"]
    time = run.time_biases()
    if time is not None:  # --model.time_bins / user_drift: rows aligned with the movie and user files
        time_arrays = {"item_time_bias": time["bins"].astype(np.float32),
                       "user_drift": time["alpha"].astype(np.float32),
                       "user_mean_day": time["mean_day"].astype(np.float32)}
        for name, arr in time_arrays.items():
            np.save(directory / f"{name}.npy", arr)
        files += [f"{n}.npy" for n in time_arrays]

    implicit = run.implicit_rows()
    if implicit is not None:  # --model.implicit: y by movie row, for fold-in
        np.save(directory / "item_implicit.npy", implicit.astype(np.float32))
        files.append("item_implicit.npy")

    lo, hi = run.rating_range
    dim = p.shape[1]
    biases = run.model.biases
    meta = {
        "format": "mfscale-export", "format_version": EXPORT_FORMAT,
        "model": "biased matrix factorization" if biases else "matrix factorization without biases",
        "prediction": ("clip(global_mean + user_bias[u] + item_bias[i] + dot(user_factors[u], item_factors[i]), "
                       "rating_min, rating_max)" if biases else
                       "clip(dot(user_factors[u], item_factors[i]), rating_min, rating_max)"),
        "biases": biases, "max_norm": run.max_norm or None,
        # the user-day biases' term, added inside the clip (README.txt); absent from top-N lists
        "day_bias": (None if days is None else
                     {"n": len(days[0]), "term": "user_day_bias[(user_id, timestamp // 86400)], 0 when absent"}),
        # the time-aware biases' terms, added inside the clip (README.txt); absent from top-N lists
        "time_bias": (None if time is None else
                      {"bins": int(time["bins"].shape[1]), "first_day": time["first"], "last_day": time["last"],
                       "drift_power": DRIFT_POWER,
                       "term": "item_time_bias[i, bin(day)] + user_drift[u] * dev_u(day), day = timestamp // 86400"}),
        # the training objective's per-rating L2 weights and the calibrated prior (recommend.fold_in_prior): what a
        # fold-in of a new user solves with (README.txt)
        "fold_in": {"reg_factor": run.reg_factor, "reg_bias": run.reg_bias if biases else 0.0,
                    "prior": fold_in_prior(run)["prior"]},
        # --model.implicit (SVD++): the users' factors already include their implicit part; a new user's fold-in is
        # pulled toward n^-1/2 times the sum of item_implicit.npy's rows of the movies they rated (README.txt)
        "implicit": implicit is not None,
        "dim": dim, "n_users": len(user_ids), "n_movies": len(movie_ids),
        "global_mean": float(mean), "rating_min": lo, "rating_max": hi,
        "run_dir": str(run.run_dir.resolve()), "checkpoint": str(run.checkpoint_path.resolve()), "step": run.step,
        "data": str(run.data.root.resolve()), "data_fingerprint": run.data.fingerprint,
        "files": sorted(files),
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    model = MODEL_TEXT[biases].format(lo=lo, hi=hi) + (MAX_NORM_TEXT.format(max_norm=run.max_norm)
                                                       if run.max_norm else "")
    note = FOLD_IN_NOTES[(biases, bool(run.max_norm))].format(max_norm=run.max_norm)
    (directory / "README.txt").write_text(README.format(
        fmt=EXPORT_FORMAT, lo=lo, hi=hi, dim=dim, model=model, fold_in_note=note,
        day_files=("" if days is None else DAY_FILES) + ("" if time is None else
                                                          TIME_FILES.format(bins=time["bins"].shape[1]))
        + ("" if implicit is None else IMPLICIT_FILES),
        day_note="" if days is None else DAY_NOTE.format(lo=lo, hi=hi),
        time_note="" if time is None else TIME_NOTE.format(bins=time["bins"].shape[1],
                                                           drift="on" if time["drift"] else "off")))
    return meta


def export(run: Run, out: Path, *, overwrite: bool = False) -> dict:
    """Export ``run`` to ``out`` atomically: built in a temporary sibling directory, then renamed."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"output directory {out} exists (use --overwrite to replace it)")
    if not out.parent.is_dir():
        raise DataError(f"output directory's parent not found: {out.parent}")
    tmp = staging_dir(out)
    try:
        meta = write_export(run, tmp)
        install_dir(tmp, out)  # swap, then delete: the old export stays whole until the new one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Export a trained mfscale model as Parquet + NumPy files.")
    p.add_argument("--run", required=True, type=Path, metavar="DIR", help="run directory (from mfscale.train)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory (must not exist)")
    p.add_argument("--data", type=Path, metavar="DIR", help="prepared dataset (default: the run's config)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p


@cli_entry(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out.exists() and not args.overwrite:  # fail before the (possibly slow) model load
        raise ConfigError(f"output directory {args.out} exists (use --overwrite to replace it)")
    run = load_run(args.run, args.data)
    meta = export(run, args.out, overwrite=args.overwrite)
    print(f"exported {meta['n_users']:,} users and {meta['n_movies']:,} movies (dim {meta['dim']}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

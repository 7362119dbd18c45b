"""``python -m mfscale.recommend``: top-N movies for a user, similar movies, or top-N for every user.

* ``--user ID``: the movies with the highest predicted rating that the user did not rate in training.
* ``--similar-to MOVIE``: the nearest movies by cosine similarity of the item factor vectors.
* ``--all-users --out FILE.parquet``: top-N for every user, scored a batch of users at a time (never the
  whole users x movies matrix), written as ``user_id, rank, movie_id, score``.
* ``--ratings FILE``: users who were not in training, from their ratings (``ratings.csv`` format, the
  timestamp optional), folded in without retraining (``fold_in``), then their top-N; with
  ``--predict PAIRS.csv`` (``userId,movieId``) their predicted ratings instead, as CSV (``--out`` or stdout).

A run with ``--model.time_bins`` predicts with each movie's latest bin (``Run.at_latest_time``); the user-day
biases and the user drift move all of a user's predictions alike and are left out (no time is given).

Ids are the original MovieLens ids. Scores are predicted ratings clipped to the rating scale; ranking uses
the unclipped prediction, so order among clipped ties still follows the model. Movies without a single
training rating are never recommended: their factors are the random initialization, not learned.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .errors import ConfigError, DataError, cli_entry
from .formats import read_pairs, read_ratings
from .runs import Run, load_run, movie_label
from .shards import find_sorted, write_text_atomic

PROG = "mfscale.recommend"
SCORE_BUDGET = 1 << 25  # floats in one batch's score matrix (128 MiB): bounds memory whatever the catalog size
MAX_CANDIDATES = 5  # titles listed in an ambiguity error


@dataclass
class Recommendations:
    """Top-N per user: ``items``/``scores`` are (n_users, k) with -1 / NaN padding when fewer remain."""

    items: np.ndarray
    scores: np.ndarray


@dataclass
class FoldIn:
    """New users' rows, solved against the run's fixed movie side (``fold_in``); row r is ``user_ids[r]``."""

    user_ids: np.ndarray  # original ids, ascending
    p: torch.Tensor  # (n, dim) factors
    bu: torch.Tensor  # (n,) biases (0 for a run without biases)
    indptr: np.ndarray  # CSR over the rows: the movie rows each user rated in the file (excluded from top-N)
    seen: np.ndarray
    skipped: int  # ratings of movies without training ratings (untrained factors): not used in the solve


# Fold-in's prior: a new user's L2 counts as ``prior`` more ratings than they gave (below). The calibration tries these
# values (0: the training objective exactly) and keeps the one that predicts the run's validation ratings best.
FOLD_IN_PRIORS = (0, 4, 16, 32, 64, 128, 256, 512)
CALIBRATION_USERS = 2000  # training users folded in by the calibration (a sample: seconds at ML-32M scale)
CALIBRATION_FILE = "foldin.json"  # in the run directory: the calibrated prior, for the checkpoint it was found with
_SOLVE_USERS = 4096  # users' normal equations solved at once (4096 x 65 x 65 float64: 138 MB)


def fold_in(run: Run, ratings: pl.DataFrame, where: str = "ratings", prior: float | None = None) -> FoldIn:
    """Factors and a bias for each user in ``ratings`` (``user_id, movie_id, rating``), none of whom was in
    training, by the training objective with every movie row fixed and the L2 of ``prior`` more ratings: for user
    u with n rated movies,

        min over p, b:  sum_i (r_ui - mean - b_i - b - p . q_i)^2 + (n + prior) (reg_factor |p - z|^2 + reg_bias b^2)

    (z = 0; with --model.implicit, SVD++, z = n^-1/2 sum_i y_i over the rated movies' implicit rows, as in training)

    (mfscale's per-rating L2: each rating adds reg x |row|^2 for the rows it touches). That is a ridge
    regression on x_i = [q_i, 1]: w = [p, b] = (X^T X + (n + prior) diag(reg_factor, ..., reg_bias))^-1 X^T y with
    y_i = r_ui - mean - b_i. With prior = 0 it is the training objective's exact minimum; but training never reaches
    that minimum for a user (early stopping, from small vectors), and a user with fewer ratings than dimensions gets
    an almost unregularized solve (a vector of norm 5 where trained users have ~1.4; benchmarks/RESULTS.md). So
    ``prior`` None takes the run's calibrated value (``fold_in_prior``). A run without biases drops the bias
    column and the mean (y_i = r_ui); a run with --model.max_norm caps |p| afterwards as nn.Embedding does. Movies
    with no training ratings are left out (their factors are untrained); a user left with none gets p = 0, b = 0.
    Raises DataError for a user who has training ratings or a movie the dataset does not have.
    """
    # A user the dataset lists without training ratings (seen only in its val/test splits) has untrained
    # factors: fold-in is for them too.
    ids = run.users.filter(pl.col("n_train") > 0)["user_id"].to_numpy()
    known = np.isin(ratings["user_id"].to_numpy(), ids)
    if known.any():
        uid = int(ratings["user_id"].to_numpy()[known][0])
        raise DataError(f"{where}: user {uid} is in the training data already (use --user {uid}); fold-in is "
                        "for users the model has not seen")
    movie_ids = run.movies["movie_id"].to_numpy()
    mid = ratings["movie_id"].to_numpy()
    pos, found = find_sorted(movie_ids, mid)
    unknown = ~found
    if unknown.any():
        raise DataError(f"{where}: movie {int(mid[unknown][0])} is not in {run.data.root} "
                        f"({len(movie_ids):,} movies)")
    return _fold_in_at(run, _fold_in_systems(run, ratings, pos),
                       fold_in_prior(run)["prior"] if prior is None else prior)


def _fold_in_systems(run: Run, ratings: pl.DataFrame, pos: np.ndarray) -> dict:
    """The new users of ``ratings`` (movie rows ``pos``) grouped, and their ridge systems (``_normal_equations``)."""
    new_ids, row = np.unique(ratings["user_id"].to_numpy(), return_inverse=True)
    order = np.argsort(row, kind="stable")
    bounds = np.searchsorted(row[order], np.arange(len(new_ids) + 1))
    trained = run.movies["n_train"].to_numpy()[pos] > 0
    systems = _normal_equations(run, pos, ratings["rating"].to_numpy().astype(np.float64), order, bounds, trained)
    return {"new_ids": new_ids, "bounds": bounds, "seen": pos[order], "skipped": int((~trained).sum()),
            "systems": systems}


def _fold_in_at(run: Run, users: dict, prior: float) -> FoldIn:
    p, bu = _solve(run, users["systems"], prior)
    dtype = run.model.factors()[2].dtype  # the model's own (float32, or float64 in tests)
    return FoldIn(user_ids=users["new_ids"], p=torch.from_numpy(p).to(dtype), bu=torch.from_numpy(bu).to(dtype),
                  indptr=users["bounds"].astype(np.int64), seen=users["seen"].astype(np.int64),
                  skipped=users["skipped"])


def _normal_equations(run: Run, movie_rows: np.ndarray, rating: np.ndarray, order: np.ndarray, bounds: np.ndarray,
                      use: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each user's ridge system without its L2: X^T X, X^T y, n (ratings used) and the implicit vector the L2 pulls
    p toward (``--model.implicit``: n^-1/2 sum of the rated movies' y rows; else 0), users' ratings at
    ``order[bounds[r]:bounds[r + 1]]`` (``use``: the ratings of trained movies)."""
    _, _, q, bi = (t.detach().to(torch.float64).numpy() for t in run.model.factors())
    mean = float(run.model.global_bias.detach())
    biases = run.model.biases
    width = q.shape[1] + 1 if biases else q.shape[1]
    n_users = len(bounds) - 1
    xtx, xty, n = np.zeros((n_users, width, width)), np.zeros((n_users, width)), np.zeros(n_users)
    y_rows = run.implicit_rows()
    z = np.zeros((n_users, q.shape[1]))
    for r in range(n_users):
        take = order[bounds[r]:bounds[r + 1]]
        take = take[use[take]]
        if not len(take):
            continue
        x = q[movie_rows[take]]
        y = rating[take]
        if biases:
            x = np.hstack([x, np.ones((len(take), 1))])
            y = y - mean - bi[movie_rows[take]]
        xtx[r], xty[r], n[r] = x.T @ x, x.T @ y, len(take)
        if y_rows is not None:
            z[r] = y_rows[movie_rows[take]].sum(0) / np.sqrt(len(take))
    return xtx, xty, n, z


def _solve(run: Run, systems: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], prior: float
           ) -> tuple[np.ndarray, np.ndarray]:
    """Every user's [p, b] from their normal equations with (n + prior) x the per-rating L2, which pulls p toward
    the user's implicit vector z (0 without --model.implicit); a user without ratings (n = 0) gets zeros."""
    xtx, xty, n, z = systems
    d = run.model.dim
    width = xtx.shape[1]
    reg = np.full(width, run.reg_factor)
    if run.model.biases:
        reg[-1] = run.reg_bias
    w = np.zeros((len(n), width))
    for lo in range(0, len(n), _SOLVE_USERS):
        sl = slice(lo, lo + _SOLVE_USERS)
        has = n[sl] > 0
        lam = (n[sl][has] + prior)[:, None] * reg  # (users, width): each one's L2 weights
        target = np.zeros_like(lam)
        target[:, :d] = z[sl][has]
        a = xtx[sl][has] + lam[:, :, None] * np.eye(width)
        w[sl][has] = np.linalg.solve(a, (xty[sl][has] + lam * target)[:, :, None])[:, :, 0]
    p = w[:, :d]
    if run.max_norm:
        norm = np.linalg.norm(p, axis=1, keepdims=True)
        p = np.where(norm > run.max_norm, p * (run.max_norm / (norm + 1e-7)), p)
    bu = w[:, d] if run.model.biases else np.zeros(len(n))
    return p, bu


def calibration_sample(run: Run, users: int = CALIBRATION_USERS, seed: int = 0
                       ) -> tuple[pl.DataFrame, pl.DataFrame, np.ndarray] | None:
    """What ``calibrate_prior`` folds in and predicts, from the training and validation splits alone: up to ``users``
    training users who have validation ratings, under new ids (above every id the run knows), with a random half of
    their training ratings (a new user brings fewer ratings than a trained one) as ``ratings``, and their validation
    ratings as ``pairs`` (``user_id, movie_id``) and ``truth``. None where no user has both."""
    data = run.data
    if not data.split_rows("val"):
        return None
    val = data.read_split("val", ("user", "item", "rating"))
    train = data.read_split("train", ("user", "item", "rating"))
    candidates = np.intersect1d(np.unique(val["user"]), np.unique(train["user"]))
    if not len(candidates):
        return None
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(candidates, min(users, len(candidates)), replace=False))
    first_new = int(run.users["user_id"].max()) + 1
    movie_ids = run.movies["movie_id"].to_numpy()
    mine = np.isin(train["user"], sample)
    half = rng.random(int(mine.sum())) < 0.5
    user, item, rating = (train[k][mine][half] for k in ("user", "item", "rating"))
    ratings = pl.DataFrame({"user_id": first_new + np.searchsorted(sample, user), "movie_id": movie_ids[item],
                            "rating": rating.astype(np.float64)})
    mine = np.isin(val["user"], sample)
    # a user whose half came out empty has nothing to fold in from: left out of the pairs too
    keep = np.isin(np.searchsorted(sample, val["user"][mine]), np.searchsorted(sample, user))
    vuser, vitem = val["user"][mine][keep], val["item"][mine][keep]
    pairs = pl.DataFrame({"user_id": first_new + np.searchsorted(sample, vuser), "movie_id": movie_ids[vitem]})
    return ratings, pairs, val["rating"][mine][keep].astype(np.float64)


def calibrate_prior(run: Run, users: int = CALIBRATION_USERS, seed: int = 0) -> dict:
    """The fold-in prior that predicts the run's validation split best, never reading the test split: the users of
    ``calibration_sample`` are folded in (``fold_in``) at each of ``FOLD_IN_PRIORS`` and their validation ratings
    predicted as ``recommend --ratings --predict`` would. Returns ``{"prior", "users", "val_rmse": {prior: rmse}}``;
    prior 0 (the training objective) where there is nothing to calibrate on."""
    sample = calibration_sample(run, users, seed)
    if sample is None:
        return {"prior": 0.0, "users": 0, "val_rmse": {}}
    ratings, pairs, truth = sample
    rec = Recommender(run)
    users = _fold_in_systems(run, ratings, find_sorted(run.movies["movie_id"].to_numpy(),
                                                       ratings["movie_id"].to_numpy())[0])
    scores = {}
    for prior in FOLD_IN_PRIORS:  # fold_in's solve at each prior (the systems built once)
        pred = rec.predict_folded(_fold_in_at(run, users, float(prior)), pairs)
        scores[prior] = float(np.sqrt(np.mean((pred - truth) ** 2)))
    best = min(scores, key=lambda k: (scores[k], k))
    return {"prior": float(best), "users": int(ratings["user_id"].n_unique()),
            "val_rmse": {str(k): v for k, v in scores.items()}}


def fold_in_prior(run: Run) -> dict:
    """The run's calibrated fold-in prior (``calibrate_prior``), found once per checkpoint and kept in
    ``RUN/foldin.json`` (recomputed when the run's checkpoint changes; not kept where the run directory is
    read-only)."""
    st = run.checkpoint_path.stat()
    key = {"checkpoint": run.checkpoint_path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
           "data": run.data.fingerprint, "priors": list(FOLD_IN_PRIORS), "users": CALIBRATION_USERS}
    path = run.run_dir / CALIBRATION_FILE
    try:
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["calibration"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # none yet, or unreadable: calibrate
    calibration = calibrate_prior(run)
    with contextlib.suppress(OSError):  # a read-only run directory: calibrate again next time
        write_text_atomic(path, json.dumps({"key": key, "calibration": calibration}, indent=1) + "\n")
    return calibration


class Recommender:
    """Scores users against the catalog with the run's model; excludes each user's training movies."""

    def __init__(self, run: Run):
        self.run = run
        p, bu, q, bi = run.model.factors()
        self.p, self.bu, self.q = p.detach(), bu.detach(), q.detach()
        # Item bias plus global bias once, and -inf for movies never trained, so they can never be picked.
        # A run trained without biases (--model.biases off) scores <p_u, q_i> alone.
        offset = bi.detach() + run.model.global_bias.detach()
        if not run.model.biases:
            self.bu, offset = torch.zeros_like(self.bu), torch.zeros_like(offset)
        trained = torch.from_numpy(run.movies["n_train"].to_numpy() > 0)
        self.item_offset = torch.where(trained, offset, -torch.inf)
        self.lo, self.hi = run.rating_range

    @functools.cached_property
    def _train_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        return self.run.train_pairs()  # reads the training split: only when a trained user is scored

    @property
    def indptr(self) -> np.ndarray:
        return self._train_pairs[0]

    @property
    def seen(self) -> np.ndarray:
        return self._train_pairs[1]

    def batch_size(self) -> int:
        return max(1, min(4096, SCORE_BUDGET // max(1, self.q.shape[0])))

    def top_k(self, users: np.ndarray, k: int, folded: FoldIn | None = None) -> Recommendations:
        """Top ``k`` unseen movies for the user rows ``users`` (one batch: caller bounds its size); rows of
        ``folded`` (its movies from the file unseen) instead of the model's users when given."""
        users = np.asarray(users, dtype=np.int64)
        u = torch.from_numpy(users)
        p, bu, indptr, seen = ((self.p, self.bu, self.indptr, self.seen) if folded is None else
                               (folded.p, folded.bu, folded.indptr, folded.seen))
        if not self.run.model.biases:
            bu = torch.zeros_like(bu)
        scores = p[u].to(self.q.dtype) @ self.q.T + bu[u, None].to(self.q.dtype) + self.item_offset[None, :]
        # Mask the training movies of these users: CSR slices concatenated, with their row in the batch.
        starts, stops = indptr[users], indptr[users + 1]
        counts = stops - starts
        rows = np.repeat(np.arange(len(users)), counts)
        cols = seen[np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())]
        scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -torch.inf
        k = min(k, scores.shape[1])
        top, idx = torch.topk(scores, k, dim=1)  # sorted descending
        finite = torch.isfinite(top)
        items = torch.where(finite, idx, -1).numpy()
        clipped = torch.where(finite, top.clamp(self.lo, self.hi), torch.nan).numpy()
        return Recommendations(items=items, scores=clipped)

    def for_user(self, user_id: int, k: int) -> pl.DataFrame:
        """One user's top ``k`` as a table: rank, movie_id, score, year, title, genres."""
        rec = self.top_k(np.array([self.run.user_index(user_id)]), k)
        keep = rec.items[0] >= 0
        return _with_movies(self.run, rec.items[0][keep], {"score": rec.scores[0][keep]})

    def predict_folded(self, folded: FoldIn, pairs: pl.DataFrame, where: str = "pairs") -> np.ndarray:
        """Predicted ratings (clipped to the scale) of ``pairs`` (``user_id, movie_id``) for folded-in users."""
        uid, mid = pairs["user_id"].to_numpy(), pairs["movie_id"].to_numpy()
        urow, found = find_sorted(folded.user_ids, uid)
        if not found.all():
            bad = int(uid[~found][0])
            raise DataError(f"{where}: user {bad} has no ratings in the --ratings file")
        movie_ids = self.run.movies["movie_id"].to_numpy()
        irow, found = find_sorted(movie_ids, mid)
        if not found.all():
            bad = int(mid[~found][0])
            raise DataError(f"{where}: movie {bad} is not in {self.run.data.root} ({len(movie_ids):,} movies)")
        p, bu = folded.p.to(self.q.dtype), folded.bu.to(self.q.dtype)
        u, i = torch.from_numpy(urow), torch.from_numpy(irow)
        pred = (p[u] * self.q[i]).sum(1)
        if self.run.model.biases:  # untrained movies too: the model's own prediction, as evaluation makes it
            _, _, _, bi = self.run.model.factors()
            pred = pred + bu[u] + bi.detach()[i] + self.run.model.global_bias.detach()
        return pred.clamp(self.lo, self.hi).numpy()

    def write_all(self, out: Path, k: int, batch_users: int = 0) -> int:
        """Top ``k`` for every user into ``out`` (Parquet, one row group per batch); returns rows written."""
        n_users = self.p.shape[0]
        batch = batch_users or self.batch_size()
        user_ids = self.run.users["user_id"].to_numpy().astype(np.int64)
        movie_ids = self.run.movies["movie_id"].to_numpy().astype(np.int64)
        schema = pa.schema([("user_id", pa.int64()), ("rank", pa.int32()), ("movie_id", pa.int64()),
                            ("score", pa.float32())])
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        rows = 0
        try:
            with pq.ParquetWriter(tmp, schema) as writer:
                for start in range(0, n_users, batch):
                    users = np.arange(start, min(start + batch, n_users))
                    rec = self.top_k(users, k)
                    valid = rec.items >= 0
                    r, c = np.nonzero(valid)
                    table = pa.table([user_ids[users[r]], (c + 1).astype(np.int32), movie_ids[rec.items[valid]],
                                      rec.scores[valid].astype(np.float32)], schema=schema)
                    writer.write_table(table)
                    rows += table.num_rows
            os.replace(tmp, out)  # readers never see a half-written file under the final name
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return rows


def find_movie(run: Run, query: str) -> int:
    """Table row of a movie given by id or by (case-insensitive substring of) its title.

    An exact title match wins over other substring matches, so "Heat (1995)" is not ambiguous with
    "White Heat (1949)". Raises DataError for no match or an ambiguous one (listing a few candidates).
    """
    movies = run.movies
    text = query.strip()
    if text.lstrip("-").isdigit():
        hit = movies.filter(pl.col("movie_id") == int(text))
        if hit.height:
            return int(hit["item_idx"][0])
    low = text.lower()
    titles = pl.col("title").str.to_lowercase()
    matches = movies.filter(titles.str.contains(low, literal=True))
    if matches.height > 1:
        exact = matches.filter(titles == low)
        if exact.height == 1:
            matches = exact
    if matches.height == 0:
        raise DataError(f"unknown movie {query!r}: no movie id or title matches")
    if matches.height > 1:
        top = matches.sort("n_train", descending=True).head(MAX_CANDIDATES)
        listed = "; ".join(f"{movie_label(r)} [id {r['movie_id']}]" for r in top.iter_rows(named=True))
        more = f" and {matches.height - top.height} more" if matches.height > top.height else ""
        raise DataError(f"ambiguous movie {query!r} matches {matches.height} titles: {listed}{more}; "
                        "use the movie id or more of the title")
    return int(matches["item_idx"][0])


def similar_movies(run: Run, item: int, k: int) -> pl.DataFrame:
    """The ``k`` movies whose factor vectors have the highest cosine similarity to movie row ``item``."""
    q = run.model.factors()[2].detach()
    if int(run.movies["n_train"][item]) == 0:
        raise DataError(f"movie {run.movies['movie_id'][item]} has no training ratings: its factors are untrained")
    unit = torch.nn.functional.normalize(q, dim=1)
    cos = unit @ unit[item]
    cos[item] = -torch.inf
    cos[torch.from_numpy(run.movies["n_train"].to_numpy() == 0)] = -torch.inf  # untrained: meaningless vectors
    top, idx = torch.topk(cos, min(k, len(cos)))
    keep = torch.isfinite(top)
    return _with_movies(run, idx[keep].numpy(), {"cosine": top[keep].numpy()})


def _with_movies(run: Run, items: np.ndarray, values: dict[str, np.ndarray]) -> pl.DataFrame:
    info = run.movies[items.tolist()] if len(items) else run.movies.clear()
    return pl.DataFrame({"rank": np.arange(1, len(items) + 1, dtype=np.int32), **values}).hstack(
        info.select("movie_id", "year", "title", "genres"))


def format_table(df: pl.DataFrame, value: str) -> str:
    """Plain aligned text, one movie a line: rank, value, movie id, title (year), genres."""
    lines = []
    for r in df.iter_rows(named=True):
        year = f" ({r['year']})" if r["year"] is not None and f"({r['year']})" not in (r["title"] or "") else ""
        genres = (r["genres"] or "").replace("|", ", ")
        lines.append(f"{r['rank']:>3}. {r[value]:6.3f}  [{r['movie_id']}] {movie_label(r)}{year}  {genres}".rstrip())
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Recommend movies with a trained mfscale run.")
    p.add_argument("--run", required=True, type=Path, metavar="DIR", help="run directory (from mfscale.train)")
    p.add_argument("--data", type=Path, metavar="DIR", help="prepared dataset (default: the run's config)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--user", type=int, metavar="ID", help="MovieLens user id to recommend for")
    what.add_argument("--similar-to", metavar="MOVIE", help="movie id or title text: list its nearest movies")
    what.add_argument("--all-users", action="store_true", help="top-N for every user into --out")
    what.add_argument("--ratings", type=Path, metavar="FILE",
                      help="new users' ratings (ratings.csv format: userId,movieId,rating[,timestamp]): fold them "
                           "in without retraining, then their top-N (or --predict)")
    p.add_argument("--predict", type=Path, metavar="PAIRS.csv",
                   help="--ratings: predicted ratings of these userId,movieId pairs instead of top-N, as CSV "
                        "userId,movieId,rating to --out (default: stdout)")
    p.add_argument("--fold-in-prior", type=float, metavar="N",
                   help="--ratings: a new user's L2 counts as N more ratings than they gave (default: calibrated on "
                        "the run's validation split and kept in RUN/foldin.json; 0: the training objective exactly)")
    p.add_argument("-k", "--top", type=int, default=10, dest="k", help="movies per list (default 10)")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="--all-users: output Parquet file; --predict: output CSV file")
    p.add_argument("--batch-users", type=int, default=0,
                   help="--all-users: users scored at once (default: auto, about 128 MiB of scores)")
    return p


@cli_entry(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.k < 1:
        raise ConfigError(f"-k must be >= 1, got {args.k}")
    if args.batch_users < 0:
        raise ConfigError(f"--batch-users must be >= 0, got {args.batch_users}")
    if args.fold_in_prior is not None and (args.ratings is None or not args.fold_in_prior >= 0):
        raise ConfigError("--fold-in-prior goes with --ratings and must be >= 0, got "
                          f"{args.fold_in_prior:g}")
    if args.predict is not None and args.ratings is None:
        raise ConfigError("--predict PAIRS.csv goes with --ratings FILE (the new users to predict for)")
    if args.all_users and args.out is None:
        raise ConfigError("--all-users needs --out FILE.parquet")
    if args.out is not None and not (args.all_users or args.predict is not None):
        raise ConfigError("--out goes with --all-users (Parquet) or --predict (CSV)")
    if args.out is not None and not args.out.parent.is_dir():
        raise DataError(f"output directory not found: {args.out.parent}")
    if args.ratings is not None:  # read before the model: a bad file is one line at once
        ratings = read_ratings(args.ratings, timestamp_optional=True)
        pairs = read_pairs(args.predict) if args.predict is not None else None
    run = load_run(args.run, args.data).at_latest_time()  # --model.time_bins: the movies' latest popularity
    if args.ratings is not None:
        return _fold_in_cli(run, args, ratings, pairs)
    if args.similar_to is not None:
        item = find_movie(run, args.similar_to)
        row = run.movies.row(item, named=True)
        print(f"Movies most similar to [{row['movie_id']}] {movie_label(row)} (cosine of item factors):")
        print(format_table(similar_movies(run, item, args.k), "cosine"))
        return 0
    rec = Recommender(run)
    if args.all_users:
        rows = rec.write_all(args.out, args.k, args.batch_users)
        print(f"wrote {rows:,} recommendations for {run.users.height:,} users to {args.out}")
        return 0
    table = rec.for_user(args.user, args.k)
    n_seen = int(rec.indptr[run.user_index(args.user) + 1] - rec.indptr[run.user_index(args.user)])
    print(f"Top {table.height} for user {args.user} ({n_seen} movies rated in training excluded), "
          f"predicted rating on a {rec.lo:g}-{rec.hi:g} scale:")
    print(format_table(table, "score"))
    return 0


def _fold_in_cli(run: Run, args: argparse.Namespace, ratings: pl.DataFrame, pairs: pl.DataFrame | None) -> int:
    t0 = time.perf_counter()
    folded = fold_in(run, ratings, str(args.ratings), prior=args.fold_in_prior)
    rec = Recommender(run)
    if folded.skipped:
        print(f"{PROG}: note: {folded.skipped} rating(s) of movies without training ratings left out of the "
              "fold-in (their factors are untrained)", file=sys.stderr)
    if pairs is not None:
        pred = rec.predict_folded(folded, pairs, str(args.predict))
        out = pl.DataFrame({"userId": pairs["user_id"], "movieId": pairs["movie_id"],
                            "rating": pred.astype(np.float64)})
        if args.out is None:
            sys.stdout.write(out.write_csv())
        else:
            write_text_atomic(args.out, out.write_csv())
            print(f"wrote {out.height:,} predictions for {len(folded.user_ids):,} folded-in users to {args.out}")
        return 0
    rows = np.arange(len(folded.user_ids))
    rec_all = rec.top_k(rows, args.k, folded)
    seconds = time.perf_counter() - t0
    for r, uid in enumerate(folded.user_ids):
        keep = rec_all.items[r] >= 0
        table = _with_movies(run, rec_all.items[r][keep], {"score": rec_all.scores[r][keep]})
        n_seen = int(folded.indptr[r + 1] - folded.indptr[r])
        print(f"Top {table.height} for new user {uid} (folded in from {n_seen} ratings, which are excluded), "
              f"predicted rating on a {rec.lo:g}-{rec.hi:g} scale:")
        print(format_table(table, "score"))
    print(f"({len(folded.user_ids)} user(s) folded in and scored in {seconds:.3f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m mfscale.recommend``: top-N movies for a user, similar movies, or top-N for every user.

* ``--user ID``: the movies with the highest predicted rating that the user did not rate in training.
* ``--similar-to MOVIE``: the nearest movies by cosine similarity of the item factor vectors.
* ``--all-users --out FILE.parquet``: top-N for every user, scored a batch of users at a time (never the
  whole users x movies matrix), written as ``user_id, rank, movie_id, score``.

Ids are the original MovieLens ids. Scores are predicted ratings clipped to the rating scale; ranking uses
the unclipped prediction, so order among clipped ties still follows the model. Movies without a single
training rating are never recommended: their factors are the random initialization, not learned.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .errors import ConfigError, DataError, cli_entry
from .runs import Run, load_run, movie_label

PROG = "mfscale.recommend"
SCORE_BUDGET = 1 << 25  # floats in one batch's score matrix (128 MiB): bounds memory whatever the catalog size
MAX_CANDIDATES = 5  # titles listed in an ambiguity error


@dataclass
class Recommendations:
    """Top-N per user: ``items``/``scores`` are (n_users, k) with -1 / NaN padding when fewer remain."""

    items: np.ndarray
    scores: np.ndarray


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
        self.indptr, self.seen = run.train_pairs()
        self.lo, self.hi = run.rating_range

    def batch_size(self) -> int:
        return max(1, min(4096, SCORE_BUDGET // max(1, self.q.shape[0])))

    def top_k(self, users: np.ndarray, k: int) -> Recommendations:
        """Top ``k`` unseen movies for the user rows ``users`` (one batch: caller bounds its size)."""
        users = np.asarray(users, dtype=np.int64)
        u = torch.from_numpy(users)
        scores = self.p[u] @ self.q.T + self.bu[u, None] + self.item_offset[None, :]
        # Mask the training movies of these users: CSR slices concatenated, with their row in the batch.
        starts, stops = self.indptr[users], self.indptr[users + 1]
        counts = stops - starts
        rows = np.repeat(np.arange(len(users)), counts)
        cols = self.seen[np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())]
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
    p.add_argument("-k", "--top", type=int, default=10, dest="k", help="movies per list (default 10)")
    p.add_argument("--out", type=Path, metavar="FILE.parquet", help="--all-users: output file")
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
    if args.all_users != (args.out is not None):
        raise ConfigError("--out FILE.parquet goes with --all-users (and --all-users needs it)")
    if args.out is not None and not args.out.parent.is_dir():
        raise DataError(f"output directory not found: {args.out.parent}")
    run = load_run(args.run, args.data)
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


if __name__ == "__main__":
    sys.exit(main())

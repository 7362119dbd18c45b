"""``python -m mfscale.analyze clusters``: what the model learned about movies, as clusters of item factors.

KMeans (scikit-learn) on the item factor vectors of movies with at least ``--min-ratings`` training
ratings (rarely rated movies keep vectors near their random initialization and would only add noise).
Each cluster is printed as its most-rated titles, its dominant genres and a genre purity: the share of
the cluster's movies whose genres include the cluster's top genre. The labels are also written to
``RUN/clusters.parquet`` (atomically) and to the run's TensorBoard projector (tag ``clusters``, with a
``cluster`` metadata column beside title, year and genres) so the clusters can be browsed visually.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch

from .errors import ConfigError, DataError, cli_entry
from .monitor import Monitor
from .runs import Run, load_run, movie_label

PROG = "mfscale.analyze"
NO_GENRES = {"", "(no genres listed)"}
PROJECTOR_TAG = "clusters"


@dataclass
class Cluster:
    label: int
    size: int
    top_genre: str | None
    purity: float  # share of the cluster's movies whose genres include top_genre (0 without genre data)
    genre_shares: list[tuple[str, float]]  # genres by share of the cluster's movies, most common first
    titles: list[str] = field(default_factory=list)  # most-rated first


@dataclass
class ClusterResult:
    movies: pl.DataFrame  # the clustered movies: item_idx, movie_id, title, year, genres, n_train, cluster
    clusters: list[Cluster]

    @property
    def purity(self) -> float:
        """Size-weighted mean purity over the clusters."""
        total = sum(c.size for c in self.clusters)
        return sum(c.purity * c.size for c in self.clusters) / total if total else 0.0


def split_genres(genres: str | None) -> list[str]:
    """MovieLens genre strings are ``|``-separated; "(no genres listed)" means none."""
    return [g for g in (genres or "").split("|") if g not in NO_GENRES]


def cluster_movies(run: Run, k: int = 10, *, seed: int = 0, min_ratings: int = 5, top_titles: int = 5
                   ) -> ClusterResult:
    """KMeans on the item factors of movies with >= ``min_ratings`` training ratings."""
    from sklearn.cluster import KMeans

    movies = run.movies.filter(pl.col("n_train") >= min_ratings)
    if movies.height < k:
        raise DataError(f"only {movies.height} movies have >= {min_ratings} training ratings, fewer than "
                        f"-k {k} clusters; lower --min-ratings or -k")
    vectors = run.item_factors()[movies["item_idx"].to_numpy()]
    # n_init=10: several k-means++ starts and the best inertia, so the result barely depends on the seed.
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(vectors.astype(np.float64))
    movies = movies.with_columns(cluster=pl.Series(labels, dtype=pl.Int32))
    clusters = []
    for c in range(k):
        members = movies.filter(pl.col("cluster") == c).sort("n_train", descending=True)
        genre_lists = [split_genres(g) for g in members["genres"].to_list()]
        counts = Counter(g for gs in genre_lists for g in gs)
        size = members.height
        top = counts.most_common(1)[0][0] if counts else None
        purity = sum(top in gs for gs in genre_lists) / size if top is not None and size else 0.0
        clusters.append(Cluster(
            label=c, size=size, top_genre=top, purity=purity,
            genre_shares=[(g, n / size) for g, n in counts.most_common()],
            titles=[movie_label(r) for r in members.head(top_titles).iter_rows(named=True)],
        ))
    return ClusterResult(movies=movies.select("item_idx", "movie_id", "title", "year", "genres", "n_train",
                                              "cluster"), clusters=clusters)


def write_clusters_parquet(result: ClusterResult, path: Path) -> None:
    """Write the labels to ``path`` via a temporary file and ``os.replace``: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        result.movies.drop("item_idx").write_parquet(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_projector(run: Run, result: ClusterResult) -> Path:
    """Add the clustered movies' vectors with a ``cluster`` column to the run's TensorBoard projector."""
    log_dir = run.run_dir / "tb"
    vectors = torch.from_numpy(run.item_factors()[result.movies["item_idx"].to_numpy()])
    labels = [{"title": movie_label(r), "year": r["year"], "genres": r["genres"], "cluster": r["cluster"],
               "movie_id": r["movie_id"], "ratings": r["n_train"]} for r in result.movies.iter_rows(named=True)]
    with Monitor(log_dir, enabled=True) as monitor:
        monitor.embeddings(vectors, labels, tag=PROJECTOR_TAG, step=run.step)
    return log_dir


def format_clusters(result: ClusterResult, genres_shown: int = 3) -> str:
    lines = []
    for c in sorted(result.clusters, key=lambda c: -c.size):
        shares = ", ".join(f"{g} {s:.0%}" for g, s in c.genre_shares[:genres_shown]) or "no genre data"
        top = f"top genre {c.top_genre}, purity {c.purity:.2f}" if c.top_genre else "no genre data"
        lines.append(f"cluster {c.label}: {c.size} movies; {top}; genres: {shares}")
        lines.extend(f"    {t}" for t in c.titles)
    lines.append(f"overall genre purity (size-weighted): {result.purity:.3f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Analyze a trained mfscale run.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("clusters", help="KMeans clusters of the movie factor vectors")
    c.add_argument("--run", required=True, type=Path, metavar="DIR", help="run directory (from mfscale.train)")
    c.add_argument("--data", type=Path, metavar="DIR", help="prepared dataset (default: the run's config)")
    c.add_argument("-k", "--clusters", type=int, default=10, dest="k", help="number of clusters (default 10)")
    c.add_argument("--seed", type=int, default=0, help="KMeans seed (default 0)")
    c.add_argument("--min-ratings", type=int, default=5,
                   help="cluster only movies with at least this many training ratings (default 5)")
    c.add_argument("--titles", type=int, default=5, help="most-rated titles shown per cluster (default 5)")
    c.add_argument("--no-projector", action="store_true", help="do not write the TensorBoard projector")
    return p


@cli_entry(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.k < 2:
        raise ConfigError(f"-k must be >= 2, got {args.k}")
    if args.min_ratings < 0 or args.titles < 0:
        raise ConfigError("--min-ratings and --titles must be >= 0")
    run = load_run(args.run, args.data)
    result = cluster_movies(run, args.k, seed=args.seed, min_ratings=args.min_ratings, top_titles=args.titles)
    print(format_clusters(result))
    out = run.run_dir / "clusters.parquet"
    write_clusters_parquet(result, out)
    print(f"wrote {out}")
    if not args.no_projector:
        print(f"projector: tensorboard --logdir {write_projector(run, result)} (tag {PROJECTOR_TAG!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

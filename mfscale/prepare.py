"""``python -m mfscale.prepare``: MovieLens (any release), a local file, or synthetic data -> shards.

The output directory is built under a temporary name next to it and renamed into place, so it exists
complete or not at all; an existing one is only replaced with ``--overwrite`` (the old one is removed
after the new one is in place). A full disk (or quota) is one line naming the directory, the bytes the
dataset needs (an estimate) and the bytes free; the partial output is removed and an existing one is kept.

Rules that shape the data:
- Duplicate (user, movie) pairs keep the rating with the latest timestamp (the last one in the file on a
  tie); the number dropped is recorded as ``counts.duplicates_dropped``.
- Ids are encoded over all splits, sorted by original id, so every rated user and movie has an index.
  Users or movies seen only in val/test are counted under ``cold_start``; the trainer never updates
  their rows, so their predictions fall back to the global mean plus the biases that are known.
- Training rows are written in a seeded random order so every row group is a random sample.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import polars as pl

from . import download, formats, split
from .errors import ConfigError, DataError, cli_entry, disk_full, is_disk_full
from .shards import (
    FORMAT_VERSION,
    MANIFEST,
    MIN_GROUPS,
    ROW_GROUP_ROWS,
    SPLITS,
    auto_buckets,
    deal_rows,
    file_digest,
    group_rows,
    install_dir,
    record_written,
    staging_dir,
    write_json_atomic,
    write_split,
)

PROG = "mfscale.prepare"


def estimate_bytes(n_ratings: int, n_users: int, n_items: int, bucket_groups: int = 0) -> int:
    """About how many bytes a prepared dataset takes: 16 per rating in the shards (plain, uncompressed), ~128
    per row group (page headers, footer) and ~384 per row group of the bucketed training split (``bucket_groups``:
    stripes x buckets; more column metadata per row), ~48 per user and movie (users.parquet, movies.parquet),
    16 KiB more."""
    groups = len(SPLITS) * MIN_GROUPS + n_ratings // ROW_GROUP_ROWS
    return 16 * n_ratings + 128 * groups + 384 * bucket_groups + 48 * (n_users + n_items) + (16 << 10)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mfscale.prepare",
        description="Turn MovieLens (or synthetic MovieLens-shaped data) into training-ready Parquet shards.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", metavar="RELEASE",
                     help="download an official release: ml-32m, ml-25m, ml-20m, ml-10m, ml-1m, ml-100k, "
                          "ml-latest-small, ml-latest")
    src.add_argument("--input", metavar="PATH", type=Path,
                     help="a local MovieLens zip, extracted directory, or ratings file (ratings.csv, "
                          "ratings.dat, u.data, u1.base ...)")
    src.add_argument("--synthetic", metavar="PRESET",
                     help="generate MovieLens-shaped data: a preset (tiny, small, ml-100k, ml-1m, ml-10m, "
                          "ml-25m, ml-32m) or 'custom' with --users/--items/--ratings")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--split", choices=["random", "temporal", "time"], default="random",
                   help="random: by fractions; temporal: each user's last ratings held out; "
                        "time: a global time cutoff by fractions (default: random)")
    p.add_argument("--val-frac", type=float, default=0.05, help="validation fraction (default 0.05)")
    p.add_argument("--test-frac", type=float, default=0.1, help="test fraction (default 0.1)")
    p.add_argument("--val-k", type=int, default=1, help="temporal split: ratings per user held out for val")
    p.add_argument("--test-k", type=int, default=1, help="temporal split: ratings per user held out for test")
    p.add_argument("--seed", type=int, default=0, help="seed for splitting, shuffling and synthetic data")
    p.add_argument("--test-input", type=Path, metavar="PATH",
                   help="predefined test ratings (e.g. ml-100k u1.test with --input u1.base); "
                        "val is then a random --val-frac of the input")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--cache-dir", type=Path, help="download cache (default $MFSCALE_CACHE or ~/.cache/mfscale)")
    p.add_argument("--base-url", help="mirror to download releases from (default: files.grouplens.org)")
    p.add_argument("--users", type=int, help="synthetic: number of users (overrides the preset)")
    p.add_argument("--items", type=int, help="synthetic: number of movies (overrides the preset)")
    p.add_argument("--ratings", type=int, help="synthetic: number of ratings (overrides the preset)")
    p.add_argument("--user-buckets", type=int, default=0, metavar="N",
                   help="user buckets of the training split: a blocks rank reads only its buckets' ratings, about "
                        "1/W of them, where W <= N (default 0 = auto: 240, fewer on small data)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for name in ("val_frac", "test_frac"):
        v = getattr(args, name)
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {v}")
    if args.val_frac + args.test_frac >= 1.0:
        raise ConfigError("--val-frac plus --test-frac must be below 1")
    if args.user_buckets < 0:
        raise ConfigError(f"--user-buckets must be >= 0 (0 = auto), got {args.user_buckets}")
    if args.val_k < 0 or args.test_k < 0:
        raise ConfigError("--val-k and --test-k must be >= 0")
    if args.test_input is not None and args.split != "random":
        raise ConfigError("--test-input defines the test set; it cannot be combined with --split " + args.split)
    if args.out.exists() and not args.overwrite:
        raise ConfigError(f"output directory {args.out} already exists (use --overwrite to replace it)")
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"output path {args.out} exists and is not a directory")


def _log(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(f"[prepare] {msg}", file=sys.stderr, flush=True)


def _resolve_ratings_path(path: Path, scratch: Path) -> tuple[Path, Path | None]:
    """Ratings file and movies file (if any) for a zip, a directory or a ratings file."""
    if not path.exists():
        raise DataError(f"input not found: {path}")
    if path.is_file() and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                for member in zf.namelist():
                    if download.unsafe_member(member):
                        raise DataError(f"{path}: unsafe path {member!r} in zip")
                try:
                    zf.extractall(scratch)
                except OSError as exc:
                    if not is_disk_full(exc):
                        raise
                    shutil.rmtree(scratch, ignore_errors=True)  # the partial extraction: count free space
                    scratch.mkdir(exist_ok=True)  # without it (the temporary directory removes itself later)
                    raise disk_full(scratch.parent, sum(i.file_size for i in zf.infolist()), f"extracting {path.name}",
                                    exc=exc, about=True) from None
        except zipfile.BadZipFile as exc:
            raise DataError(f"{path}: bad zip file: {exc}") from None
        path = scratch
    if path.is_dir():
        ratings = formats.find_ratings_file(path)
        return ratings, formats.find_movies_file(ratings.parent)
    if path.suffix == ".zip":
        raise DataError(f"{path}: not a valid zip file")
    return path, formats.find_movies_file(path.parent) if path.parent.is_dir() else None


def load_source(args: argparse.Namespace, scratch: Path) -> tuple[pl.DataFrame, pl.DataFrame | None, dict]:
    """Ratings frame, movies frame (or None) and the manifest's ``source`` entry."""
    if args.synthetic is not None:
        from . import synthetic

        preset = None if args.synthetic == "custom" else args.synthetic
        spec = synthetic.resolve_spec(preset, n_users=args.users, n_items=args.items, n_ratings=args.ratings)
        _log(args, f"generating synthetic data: {spec.n_ratings:,} ratings, {spec.n_users:,} users, "
                   f"{spec.n_items:,} movies")
        data = synthetic.generate(spec, seed=args.seed)
        return data.ratings, data.movies, {"kind": "synthetic", "preset": args.synthetic, "params": data.params}
    if any(v is not None for v in (args.users, args.items, args.ratings)):
        raise ConfigError("--users/--items/--ratings only apply to --synthetic")
    if args.source is not None:
        release_dir = download.fetch_release(args.source, args.cache_dir, base_url=args.base_url,
                                             progress=not args.quiet)
        ratings_path = formats.find_ratings_file(release_dir)
        movies_path = formats.find_movies_file(release_dir)
        markers = [d / ".mfscale-complete" for d in (release_dir, *release_dir.parents)]
        marker = next((m for m in markers if m.is_file()), None)
        entry = {"kind": "download", "release": args.source,
                 "md5": marker.read_text().strip() if marker else None}
    else:
        ratings_path, movies_path = _resolve_ratings_path(args.input, scratch)
        entry = {"kind": "file", "path": str(args.input.resolve()), "ratings_file": ratings_path.name}
        if args.input.is_file():
            entry["md5"] = file_digest(args.input, "md5")
    _log(args, f"reading {ratings_path}")
    ratings = formats.read_ratings(ratings_path)
    movies = formats.read_movies(movies_path) if movies_path is not None else None
    return ratings, movies, entry


def _dedupe_and_sort(df: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Canonical (user, movie) order; duplicate pairs keep the latest rating (last in file on ties)."""
    df = df.sort(["user_id", "movie_id", "timestamp"], maintain_order=True)
    u = df.get_column("user_id").to_numpy()
    m = df.get_column("movie_id").to_numpy()
    last = np.ones(len(u), dtype=bool)
    last[:-1] = (u[1:] != u[:-1]) | (m[1:] != m[:-1])
    dropped = int(len(u) - last.sum())
    if dropped:
        df = df.filter(pl.Series(last))
    return df, dropped


def _histogram(rating: np.ndarray) -> dict[str, int]:
    """Counts per half-star (ratings that are not on the half-star grid are binned to the nearest)."""
    bins = np.bincount(np.rint(rating.astype(np.float64) * 2).astype(np.int64), minlength=11)
    return {f"{k / 2:.1f}": int(bins[k]) for k in range(1, 11)}


def _id_table(ids: np.ndarray, idx: np.ndarray, labels: np.ndarray, n: int, idx_name: str,
              id_name: str) -> pl.DataFrame:
    return pl.DataFrame({
        idx_name: np.arange(n, dtype=np.int32),
        id_name: ids,
        "n_train": np.bincount(idx[labels == split.TRAIN], minlength=n).astype(np.int32),
        "n_ratings": np.bincount(idx, minlength=n).astype(np.int32),
    })


def prepare(args: argparse.Namespace) -> dict:
    """Run the whole preparation; return the manifest."""
    t0 = time.perf_counter()
    out: Path = args.out.resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_dir(out)
    except OSError as exc:
        raise DataError(f"cannot write output directory {args.out}: {exc.strerror or exc}") from None
    need: dict[str, int] = {}  # _prepare_into fills in "bytes" once it knows the size of the data
    try:
        with tempfile.TemporaryDirectory(prefix="mfscale-prepare-") as scratch:
            manifest = _prepare_into(args, tmp, Path(scratch), need)
        manifest["prepare_seconds"] = round(time.perf_counter() - t0, 2)
        record_written(tmp, manifest)
        write_json_atomic(tmp / MANIFEST, manifest)
        install_dir(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        # Writes into the staging directory (beside --out) that ran out of space. The free bytes are counted
        # after the partial output is removed: what this directory has for a new try.
        if isinstance(exc, Exception) and not isinstance(exc, DataError) and is_disk_full(exc):
            raise disk_full(out.parent, need.get("bytes"), "the prepared dataset", exc=exc, about=True) from None
        raise
    _log(args, f"wrote {out} in {manifest['prepare_seconds']:.1f} s: {manifest['counts']['train']:,} train / "
               f"{manifest['counts']['val']:,} val / {manifest['counts']['test']:,} test ratings")
    return manifest


def _prepare_into(args: argparse.Namespace, tmp: Path, scratch: Path, need: dict[str, int]) -> dict:
    ratings, movies, source = load_source(args, scratch)
    n_input = ratings.height
    if args.test_input is not None:
        test_path, _ = _resolve_ratings_path(args.test_input, scratch / "test")
        test = formats.read_ratings(test_path)
        source["test_input"] = str(args.test_input.resolve())
        ratings = pl.concat([ratings.with_columns(is_test=pl.lit(False)),
                             test.with_columns(is_test=pl.lit(True))])
    ratings, dropped = _dedupe_and_sort(ratings)
    _log(args, f"{ratings.height:,} ratings after removing {dropped:,} duplicate pairs")

    user_ids_raw = ratings.get_column("user_id").to_numpy()
    movie_ids_raw = ratings.get_column("movie_id").to_numpy()
    user_ids, user = np.unique(user_ids_raw, return_inverse=True)
    movie_ids, item = np.unique(movie_ids_raw, return_inverse=True)
    user, item = user.astype(np.int32), item.astype(np.int32)
    del user_ids_raw, movie_ids_raw
    rating = ratings.get_column("rating").to_numpy().astype(np.float32)
    timestamp = ratings.get_column("timestamp").to_numpy().astype(np.int32)
    is_test = ratings.get_column("is_test").to_numpy() if "is_test" in ratings.columns else None
    del ratings
    n = len(rating)

    if is_test is not None:
        labels, split_spec = split.predefined_split(is_test, args.val_frac, args.seed)
    elif args.split == "random":
        labels, split_spec = split.random_split(n, args.val_frac, args.test_frac, args.seed)
    elif args.split == "temporal":
        labels, split_spec = split.temporal_split(user, timestamp, args.val_k, args.test_k)
    else:
        labels, split_spec = split.time_split(timestamp, args.val_frac, args.test_frac)

    n_users, n_items = len(user_ids), len(movie_ids)
    train_mask = labels == split.TRAIN
    if not train_mask.any():
        raise DataError("the split leaves no training ratings")
    shards: dict[str, list[dict]] = {}
    counts = {"input_ratings": n_input + (0 if is_test is None else int(is_test.sum())),
              "ratings": n, "users": n_users, "items": n_items, "duplicates_dropped": dropped}
    cold: dict[str, int] = {}
    in_train_u = np.zeros(n_users, dtype=bool)
    in_train_u[user[train_mask]] = True
    in_train_i = np.zeros(n_items, dtype=bool)
    in_train_i[item[train_mask]] = True
    # Users dealt into buckets by training count (balanced ratings per bucket); the training split is written
    # bucket by bucket inside each stripe (shards.write_split), so a blocks rank reads only its buckets.
    n_train_user = np.bincount(user[train_mask], minlength=n_users)
    n_train = int(train_mask.sum())
    n_buckets = min(args.user_buckets, n_users) if args.user_buckets else auto_buckets(n_train, n_users)
    user_bucket = deal_rows(n_train_user, n_buckets).astype(np.int32)
    need["bytes"] = estimate_bytes(n, n_users, n_items, -(-n_train // group_rows(n_train)) * n_buckets)
    for code, name in ((split.TRAIN, "train"), (split.VAL, "val"), (split.TEST, "test")):
        idx = np.flatnonzero(labels == code)
        if code == split.TRAIN:
            # A seeded shuffle makes every row group a random sample of the training set.
            idx = idx[np.random.default_rng([args.seed, 0x5A4D]).permutation(len(idx))]
        else:
            cold[f"{name}_users_not_in_train"] = int(np.unique(user[idx][~in_train_u[user[idx]]]).size)
            cold[f"{name}_items_not_in_train"] = int(np.unique(item[idx][~in_train_i[item[idx]]]).size)
            cold[f"{name}_ratings_cold"] = int((~in_train_u[user[idx]] | ~in_train_i[item[idx]]).sum())
        counts[name] = len(idx)
        counts[f"{name}_users"] = int(np.unique(user[idx]).size)
        counts[f"{name}_items"] = int(np.unique(item[idx]).size)
        shards[name] = write_split(tmp / name, user[idx], item[idx], rating[idx], timestamp[idx],
                                   bucket=user_bucket[user[idx]] if code == split.TRAIN else None)
        _log(args, f"wrote {name}: {len(idx):,} ratings in {len(shards[name])} shard(s)")

    users_df = _id_table(user_ids, user, labels, n_users, "user_idx", "user_id").with_columns(
        bucket=pl.Series(user_bucket))
    items_df = _id_table(movie_ids, item, labels, n_items, "item_idx", "movie_id")
    if movies is not None:
        items_df = items_df.join(movies, on="movie_id", how="left", maintain_order="left")
    else:
        items_df = items_df.with_columns(title=pl.lit(None, pl.String), genres=pl.lit(None, pl.String),
                                         year=pl.lit(None, pl.Int32))
    users_df.write_parquet(tmp / "users.parquet")
    items_df.write_parquet(tmp / "movies.parquet")

    train_r = rating[train_mask].astype(np.float64)
    return {
        "format_version": FORMAT_VERSION,
        "created_by": "mfscale.prepare",
        "source": source,
        "counts": counts,
        "cold_start": cold,
        "rating": {
            "scale": [formats.RATING_MIN, formats.RATING_MAX],
            "min": float(rating.min()),
            "max": float(rating.max()),
            "mean": float(rating.astype(np.float64).mean()),
            "train_mean": float(train_r.mean()),
            "histogram": _histogram(rating),
        },
        "split": split_spec,
        "shards": {s: shards[s] for s in SPLITS},
        "buckets": {"n": n_buckets, "seed": args.seed,
                    "rows": np.bincount(user_bucket, weights=n_train_user, minlength=n_buckets).astype(
                        np.int64).tolist()},
        "files": {"users": "users.parquet", "movies": "movies.parquet"},
        "has_movie_metadata": movies is not None,
    }


@cli_entry(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    prepare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

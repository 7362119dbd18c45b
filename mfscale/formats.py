"""Read MovieLens ratings and movies in every release format into polars frames.

Formats:
- ``ratings.csv`` (ml-20m and later, ml-latest*): header ``userId,movieId,rating,timestamp``.
- ``ratings.dat`` (ml-1m, ml-10m): ``user::movie::rating::timestamp``, no header.
- ``u.data`` / ``u1.base`` / ``u1.test`` (ml-100k): tab-separated, no header.
Movies: ``movies.csv`` (movieId,title,genres), ``movies.dat`` (``::``-separated, latin-1 in ml-1m),
``u.item`` (``|``-separated latin-1 with 19 genre flag columns).

Every reader returns the same schema (``RATINGS_SCHEMA``) and raises ``DataError`` with a one-line
message that names the file and, where it can, the line at fault.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import polars as pl

from .errors import DataError

RATINGS_SCHEMA = {"user_id": pl.Int64, "movie_id": pl.Int64, "rating": pl.Float64, "timestamp": pl.Int64}
MOVIES_SCHEMA = {"movie_id": pl.Int64, "title": pl.String, "genres": pl.String, "year": pl.Int32}
RATING_MIN, RATING_MAX = 0.5, 5.0

RATINGS_FILES = ("ratings.csv", "ratings.dat", "u.data")
MOVIES_FILES = ("movies.csv", "movies.dat", "u.item")
# ml-100k's u.item genre flags, in file order.
UITEM_GENRES = (
    "(no genres listed)", "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
    "Western",
)
_CSV_HEADER = ("userId", "movieId", "rating", "timestamp")


def detect_format(path: Path) -> str:
    """Return 'csv', 'dat' or 'tsv' for a ratings file, from its first line."""
    try:
        with open(path, "rb") as f:
            first = f.readline(4096)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not first.strip():
        raise DataError(f"{path} is empty")
    text = first.decode("latin-1").strip()
    if "::" in text:
        return "dat"
    if "\t" in text:
        return "tsv"
    if "," in text:
        return "csv"
    raise DataError(f"{path}: unknown ratings format (expected MovieLens ratings.csv, ratings.dat or u.data)")


def find_ratings_file(directory: Path) -> Path:
    """The ratings file of an extracted MovieLens release directory."""
    for name in RATINGS_FILES:
        hits = sorted(directory.rglob(name))
        if hits:
            return hits[0]
    raise DataError(f"no ratings file ({', '.join(RATINGS_FILES)}) found in {directory}")


def find_movies_file(directory: Path) -> Path | None:
    for name in MOVIES_FILES:
        hits = sorted(directory.rglob(name))
        if hits:
            return hits[0]
    return None


def read_ratings(path: Path) -> pl.DataFrame:
    """Read and validate a MovieLens ratings file of any format."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"ratings file not found: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a directory, expected a ratings file")
    fmt = detect_format(path)
    if fmt == "csv":
        source: Path | bytes = path
        header = _read_header(path)
        if tuple(header[:4]) != _CSV_HEADER:
            missing = [c for c in _CSV_HEADER if c not in header]
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {', '.join(missing)}; expected header "
                    f"{','.join(_CSV_HEADER)}, found {','.join(header)}"
                )
        kwargs = {"has_header": True, "separator": ",", "columns": list(_CSV_HEADER)}
        line_offset = 2
    else:
        if fmt == "dat":
            # polars separators are single bytes: rewrite '::' once in memory (fine at ml-10m scale).
            source = path.read_bytes().replace(b"::", b"\t")
        else:
            source = path
        kwargs = {"has_header": False, "separator": "\t", "new_columns": list(_CSV_HEADER)}
        line_offset = 1
    schema = dict(zip(_CSV_HEADER, RATINGS_SCHEMA.values(), strict=True))
    src = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        df = pl.read_csv(src, schema_overrides=schema, quote_char=None, **kwargs)
    except pl.exceptions.PolarsError:
        _raise_parse_error(source, path, kwargs, line_offset)
        raise  # unreachable: _raise_parse_error always raises
    if len(df.columns) < 4:
        raise DataError(f"{path}: expected 4 columns (user, movie, rating, timestamp), found {len(df.columns)}")
    df = df.select(df.columns[:4]).rename(dict(zip(df.columns[:4], RATINGS_SCHEMA, strict=True)))
    return validate_ratings(df.cast(RATINGS_SCHEMA), str(path), line_offset)


def _read_header(path: Path) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return [c.strip().strip('"') for c in f.readline().strip().split(",")]


def _raise_parse_error(source: Path | bytes, path: Path, kwargs: dict, line_offset: int) -> None:
    """Re-read as text to name the first unparseable field; the fast typed read failed."""
    src = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        raw = pl.read_csv(src, infer_schema=False, quote_char=None, truncate_ragged_lines=True, **kwargs)
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{path}: cannot parse as a MovieLens ratings file: {str(exc).splitlines()[0]}") from None
    for name, dtype in zip(_CSV_HEADER, RATINGS_SCHEMA.values(), strict=True):
        if name not in raw.columns:
            continue
        col = raw.get_column(name)
        parsed = col.str.strip_chars().cast(dtype, strict=False)
        bad = (parsed.is_null() & col.is_not_null()).arg_true()
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{path} line {i + line_offset}: {name} {col[i]!r} is not a number")
    raise DataError(f"{path}: malformed rows (wrong number of fields or bad quoting)")


def validate_ratings(df: pl.DataFrame, where: str, line_offset: int = 1) -> pl.DataFrame:
    """Check nulls, NaN, rating range and id/timestamp ranges; return the frame unchanged."""
    if df.height == 0:
        raise DataError(f"{where}: no ratings")
    for name in RATINGS_SCHEMA:
        nulls = df.get_column(name).is_null()
        if nulls.any():
            i = int(nulls.arg_true()[0])
            raise DataError(f"{where} line {i + line_offset}: missing {name}")
    rating = df.get_column("rating")
    bad = rating.is_nan() | (rating < RATING_MIN) | (rating > RATING_MAX)
    if bad.any():
        i = int(bad.arg_true()[0])
        raise DataError(
            f"{where} line {i + line_offset}: rating {rating[i]} is outside the scale "
            f"[{RATING_MIN}, {RATING_MAX}]"
        )
    for name in ("user_id", "movie_id"):
        col = df.get_column(name)
        if col.min() < 0:
            i = int((col < 0).arg_true()[0])
            raise DataError(f"{where} line {i + line_offset}: negative {name} {col[i]}")
    ts = df.get_column("timestamp")
    bad_ts = (ts < 0) | (ts > 2**31 - 1)
    if bad_ts.any():
        i = int(bad_ts.arg_true()[0])
        raise DataError(f"{where} line {i + line_offset}: timestamp {ts[i]} is not a unix time in int32 range")
    return df


_YEAR = re.compile(r"\((\d{4})(?:[-–]\d{0,4})?\)\s*$")


def _with_year(df: pl.DataFrame) -> pl.DataFrame:
    title = pl.col("title").str.strip_chars()
    return df.with_columns(
        title=title,
        year=title.str.extract(_YEAR.pattern, 1).cast(pl.Int32, strict=False),
    ).select(list(MOVIES_SCHEMA))


def read_movies(path: Path) -> pl.DataFrame:
    """Read movies.csv / movies.dat / u.item into (movie_id, title, genres, year)."""
    path = Path(path)
    try:
        if path.name.endswith(".csv"):
            df = pl.read_csv(path, schema_overrides={"movieId": pl.Int64}, infer_schema=False)
            missing = {"movieId", "title", "genres"} - set(df.columns)
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
            df = df.select(movie_id=pl.col("movieId").cast(pl.Int64), title="title", genres="genres")
        elif path.name == "u.item":
            text = path.read_bytes().decode("latin-1")
            rows = [line.split("|") for line in text.splitlines() if line.strip()]
            genres = [
                "|".join(g for g, flag in zip(UITEM_GENRES, r[5:24], strict=False) if flag == "1")
                or "(no genres listed)"
                for r in rows
            ]
            df = pl.DataFrame(
                {"movie_id": [int(r[0]) for r in rows], "title": [r[1] for r in rows], "genres": genres},
                schema={"movie_id": pl.Int64, "title": pl.String, "genres": pl.String},
            )
        else:  # movies.dat: id::title::genres; ml-1m is latin-1, ml-10m utf-8
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            rows = [line.split("::") for line in text.splitlines() if line.strip()]
            df = pl.DataFrame(
                {"movie_id": [int(r[0]) for r in rows], "title": [r[1] for r in rows],
                 "genres": [r[2] if len(r) > 2 else "" for r in rows]},
                schema={"movie_id": pl.Int64, "title": pl.String, "genres": pl.String},
            )
    except (ValueError, IndexError, pl.exceptions.PolarsError) as exc:
        raise DataError(f"{path}: cannot parse movies file: {str(exc).splitlines()[0]}") from None
    return _with_year(df.unique("movie_id", keep="first", maintain_order=True))

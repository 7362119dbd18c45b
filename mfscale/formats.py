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


def read_ratings(path: Path, *, timestamp_optional: bool = False) -> pl.DataFrame:
    """Read and validate a MovieLens ratings file of any format.

    ``timestamp_optional``: a ``.csv`` file may lack the timestamp column (``userId,movieId,rating``, as a
    new user's ratings for ``mfscale.recommend --ratings``); it is then 0.

    A ``.csv`` file is read as CSV proper (RFC 4180), as pyarrow, pandas, R and the csv module write it:
    quoted or unquoted header and fields, a UTF-8 byte-order mark, LF or CRLF line ends, and other
    columns beside the four (R's leading row-name column, pandas' index) are ignored. Columns are found
    by name, in any order.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"ratings file not found: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a directory, expected a ratings file")
    fmt = detect_format(path)
    if fmt == "csv":
        source: Path | bytes = path
        if timestamp_optional:
            try:
                _csv_columns(path)
            except DataError:
                three = _csv_columns(path, _CSV_HEADER[:3])  # the one line names what else is missing
                df = read_ratings_columns(path, three)
                return validate_ratings(df.with_columns(timestamp=pl.lit(0, pl.Int64)), str(path), 2)
        columns = _csv_columns(path)
        # quote_char='"' (polars' default, spelled out): quoted headers and fields are ordinary CSV.
        kwargs = {"has_header": True, "separator": ",", "quote_char": '"', "columns": columns}
        line_offset = 2
    else:
        # ratings.dat and u.data are never quoted: a '"' there is data, not quoting.
        raw = path.read_bytes()
        if fmt == "dat":
            # polars separators are single bytes: rewrite '::' once in memory (fine at ml-10m scale).
            source = raw.removeprefix(_BOM).replace(b"::", b"\t")
        else:
            source = raw.removeprefix(_BOM) if raw.startswith(_BOM) else path
            del raw
        columns = list(_CSV_HEADER)
        kwargs = {"has_header": False, "separator": "\t", "quote_char": None, "new_columns": columns}
        line_offset = 1
    schema = dict(zip(columns, RATINGS_SCHEMA.values(), strict=True))
    try:
        df = pl.read_csv(_open(source), schema_overrides=schema, **kwargs)
    except pl.exceptions.PolarsError:
        df = _read_as_text(source, path, kwargs, columns, line_offset)
    if len(df.columns) < 4:
        raise DataError(f"{path}: expected 4 columns (user, movie, rating, timestamp), found {len(df.columns)}")
    df = df.select(columns).rename(dict(zip(columns, RATINGS_SCHEMA, strict=True)))
    return validate_ratings(df.cast(RATINGS_SCHEMA), str(path), line_offset)


_BOM = b"\xef\xbb\xbf"


def read_ratings_columns(path: Path, columns: list[str]) -> pl.DataFrame:
    """``userId, movieId, rating`` of a CSV without timestamps, as ``user_id, movie_id, rating``."""
    kwargs = {"has_header": True, "separator": ",", "quote_char": '"', "columns": columns}
    schema = dict(zip(columns, list(RATINGS_SCHEMA.values())[:3], strict=True))
    try:
        df = pl.read_csv(path, schema_overrides=schema, **kwargs)
    except pl.exceptions.PolarsError:
        df = _read_as_text(path, path, kwargs, columns, 2)
    names = list(RATINGS_SCHEMA)[:3]
    return df.select(columns).rename(dict(zip(columns, names, strict=True))).cast(
        {n: RATINGS_SCHEMA[n] for n in names})


def _open(source: Path | bytes) -> Path | io.BytesIO:
    return io.BytesIO(source) if isinstance(source, bytes) else source


def _csv_columns(path: Path, wanted: tuple[str, ...] = _CSV_HEADER) -> list[str]:
    """The file's own names of ``wanted`` (userId, movieId, rating and timestamp), in that order.

    The header is parsed by polars itself (quotes, BOM and CRLF handled exactly as in the read that
    follows); names are then matched after trimming spaces and stray quotes (``"userId", "movieId"``).
    """
    try:
        names = pl.read_csv(path, has_header=True, n_rows=0, infer_schema=False, quote_char='"').columns
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{path}: cannot parse the CSV header: {str(exc).splitlines()[0]}") from None
    found: dict[str, str] = {}
    for name in names:
        found.setdefault(name.strip().strip('"').strip(), name)
    missing = [c for c in wanted if c not in found]
    if missing:
        shown = ",".join(name.strip().strip('"').strip() for name in names)
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; expected header "
            f"{','.join(wanted)}, found {shown}"
        )
    return [found[c] for c in wanted]


def read_pairs(path: Path) -> pl.DataFrame:
    """A CSV of ``userId,movieId`` pairs (a header, any other columns ignored) as ``user_id, movie_id``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file not found: {path}")
    columns = _csv_columns(path, _CSV_HEADER[:2])
    try:
        df = pl.read_csv(path, has_header=True, columns=columns, quote_char='"',
                         schema_overrides=dict.fromkeys(columns, pl.Int64))
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{path}: cannot read userId,movieId pairs: {str(exc).splitlines()[0]}") from None
    df = df.select(columns).rename(dict(zip(columns, ("user_id", "movie_id"), strict=True)))
    if df.height == 0:
        raise DataError(f"{path}: no pairs")
    nulls = df["user_id"].is_null() | df["movie_id"].is_null()
    if nulls.any():
        raise DataError(f"{path} line {int(nulls.arg_true()[0]) + 2}: missing userId or movieId")
    return df


def _read_as_text(source: Path | bytes, path: Path, kwargs: dict, columns: list[str], line_offset: int
                  ) -> pl.DataFrame:
    """The fast typed read failed: re-read the four columns as text.

    Whole numbers written as floats in the integer columns (``3.0`` from pandas when a column held a
    NaN, ``1e+05`` from R's write.csv) are accepted. Anything else that is not a number is named with
    its line, and rows with a wrong number of fields or broken quoting are refused.
    """
    try:
        raw = pl.read_csv(_open(source), infer_schema=False, **kwargs)
        well_formed = True
    except pl.exceptions.PolarsError:
        try:
            raw = pl.read_csv(_open(source), infer_schema=False, truncate_ragged_lines=True, **kwargs)
        except pl.exceptions.PolarsError as exc:
            raise DataError(f"{path}: cannot parse as a MovieLens ratings file: {str(exc).splitlines()[0]}") \
                from None
        well_formed = False
    parsed: dict[str, pl.Series] = {}
    n = len(columns)  # 4, or 3 for a file without timestamps (read_ratings_columns)
    for name, column, dtype in zip(_CSV_HEADER[:n], columns, list(RATINGS_SCHEMA.values())[:n], strict=True):
        if column not in raw.columns:
            continue
        text = raw.get_column(column)
        stripped = text.str.strip_chars()
        as_float = stripped.cast(pl.Float64, strict=False)
        values = stripped.cast(dtype, strict=False)
        if dtype == pl.Int64:
            whole = as_float.is_finite() & (as_float == as_float.floor()) & (as_float.abs() < 2.0**53)
            values = pl.select(
                pl.when(values.is_null() & whole).then(as_float.cast(pl.Int64, strict=False)).otherwise(values)
            ).to_series()
        bad = (values.is_null() & text.is_not_null()).arg_true()
        if len(bad):
            i = int(bad[0])
            what = "an integer" if as_float[i] is not None else "a number"
            raise DataError(f"{path} line {i + line_offset}: {name} {text[i]!r} is not {what}")
        parsed[column] = values.alias(column)
    if not well_formed or len(parsed) < n:
        raise DataError(f"{path}: malformed rows (wrong number of fields or bad quoting)")
    return pl.DataFrame(list(parsed.values()))


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

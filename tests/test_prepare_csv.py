"""prepare --input with ratings.csv files as other tools write them: quoted headers and fields, a BOM,
CRLF line ends, R's row-name column, pandas' index column, whole numbers written as floats.

Each file is written by the tool that writes it that way (R is not installed: its shape is written by
hand, following write.csv's rules) and must prepare to exactly the dataset the plain file gives.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.test_prepare import all_rows, fail, run

HEADER = ["userId", "movieId", "rating", "timestamp"]


def frame(n_users: int = 40, n_items: int = 30, per_user: int = 12, seed: int = 1) -> list[tuple]:
    """(user, movie, rating, timestamp) rows; some ids are round multiples of 50,000 (R writes 1e+05)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        uid = (u + 1) * 50_000 if u < 4 else u + 1
        for j, m in enumerate(rng.choice(n_items, per_user, replace=False)):
            mid = 100_000 if m == 0 else int(m) * 7 + 1
            rows.append((uid, mid, float(rng.integers(1, 11)) / 2, 964_982_703 + u * 1_000 + j * 17))
    return rows


ROWS = frame()
NOTES = ['Heat, The (1995)', 'say "hi"', "plain", "multi\nline"]  # an extra text column that needs quoting


def note(i: int) -> str:
    return NOTES[i % len(NOTES)]


def plain(path: Path) -> Path:
    path.write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{m},{r},{t}\n" for u, m, r, t in ROWS))
    return path


def write_pyarrow(path: Path, **options) -> Path:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    cols = list(zip(*ROWS, strict=True))
    table = pa.table({
        "userId": pa.array(cols[0], pa.int64()), "movieId": pa.array(cols[1], pa.int64()),
        "rating": pa.array(cols[2], pa.float64()), "timestamp": pa.array(cols[3], pa.int64()),
        "note": pa.array([note(i) for i in range(len(ROWS))]),
    })
    pacsv.write_csv(table, path, write_options=pacsv.WriteOptions(**options))
    return path


def write_pandas(path: Path, **options) -> Path:
    pd = pytest.importorskip("pandas", reason="pandas is not installed here: its to_csv cannot be tested")
    df = pd.DataFrame(ROWS, columns=HEADER)
    df["note"] = [note(i) for i in range(len(ROWS))]
    df.to_csv(path, **options)
    return path


def write_csv_module(path: Path, *, encoding: str = "utf-8", rows=None, header=HEADER, **options) -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f, **options)
        w.writerow(header + ["note"])
        for i, row in enumerate(rows if rows is not None else ROWS):
            w.writerow([*row, note(i)])
    return path


def r_number(x: float) -> str:
    """A double as R's write.csv prints it (15 significant digits, scipen = 0): fixed notation unless the
    scientific one is narrower, so 100000 is written 1e+05 and 4.0 is written 4."""
    fixed = f"{x:.15g}"
    if "e" in fixed:
        fixed = f"{x:.15f}".rstrip("0").rstrip(".")
    mantissa, exp = f"{x:.14e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    sci = f"{mantissa}e{int(exp):+03d}"
    return fixed if len(fixed) <= len(sci) else sci


def write_r(path: Path, *, doubles: bool = False, eol: str = "\n") -> Path:
    """write.csv(df, path): a first column of quoted row names under an empty quoted header, every header
    quoted, strings quoted with "" for a quote; numbers as R formats them. With ``doubles`` the id and
    timestamp columns are R doubles (e.g. after arithmetic), which write.csv prints with ``r_number``."""
    fmt = r_number if doubles else (lambda v: str(int(v)))
    lines = ['"","userId","movieId","rating","timestamp","note"']
    for i, (u, m, r, t) in enumerate(ROWS):
        text = '"' + note(i).replace('"', '""') + '"'
        lines.append(f'"{i + 1}",{fmt(u)},{fmt(m)},{r_number(r)},{fmt(t)},{text}')
    path.write_bytes((eol.join(lines) + eol).encode())
    return path


WRITERS = {
    "pyarrow write_csv": lambda p: write_pyarrow(p),
    "pyarrow write_csv, all quoted": lambda p: write_pyarrow(p, quoting_style="all_valid"),
    "pandas to_csv (index column)": lambda p: write_pandas(p),
    "pandas to_csv QUOTE_ALL, no index": lambda p: write_pandas(p, index=False, quoting=csv.QUOTE_ALL),
    "csv QUOTE_ALL": lambda p: write_csv_module(p, quoting=csv.QUOTE_ALL),
    "csv QUOTE_NONNUMERIC": lambda p: write_csv_module(p, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n"),
    "csv excel dialect (CRLF)": lambda p: write_csv_module(p),
    "csv utf-8-sig (BOM)": lambda p: write_csv_module(p, encoding="utf-8-sig", lineterminator="\n"),
    "csv BOM, CRLF, QUOTE_ALL (Excel's CSV UTF-8)": lambda p: write_csv_module(p, encoding="utf-8-sig",
                                                                            quoting=csv.QUOTE_ALL),
    "csv columns reordered": lambda p: write_csv_module(p, rows=[(t, r, m, u) for u, m, r, t in ROWS],
                                                        header=HEADER[::-1], quoting=csv.QUOTE_MINIMAL),
    "R write.csv": lambda p: write_r(p),
    "R write.csv, double ids (1e+05)": lambda p: write_r(p, doubles=True),
    "R write.csv on Windows (CRLF)": lambda p: write_r(p, eol="\r\n"),
}


def test_r_number_follows_r():
    assert [r_number(x) for x in (100000.0, 150000.0, 4.0, 3.5, 0.5, 964982703.0, 1e9, 123456.0)] == \
        ["1e+05", "150000", "4", "3.5", "0.5", "964982703", "1e+09", "123456"]


def prepared(src: Path, out: Path, *extra: str) -> tuple[dict, pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    m = run(["--input", str(src), "--out", str(out), "--seed", "3", "--quiet", *extra])
    rows = all_rows(out).sort("split", "user_id", "movie_id")
    return m, rows, pl.read_parquet(out / "users.parquet"), pl.read_parquet(out / "movies.parquet")


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("split", ["random", "temporal"])
def test_tool_written_csv_prepares_like_the_plain_file(tmp_path, writer, split):
    (tmp_path / "written").mkdir()
    src = WRITERS[writer](tmp_path / "written" / "ratings.csv")
    raw = src.read_bytes()
    if "BOM" in writer:
        assert raw.startswith(b"\xef\xbb\xbf")
    if "CRLF" in writer:
        assert b"\r\n" in raw
    if "R " in writer or "QUOTE" in writer or "pyarrow" in writer:
        assert b'"userId"' in raw.split(b"\n")[0]  # the header is quoted: the case of issue 24

    (tmp_path / "plain").mkdir()
    base_m, base_rows, base_users, base_movies = prepared(plain(tmp_path / "plain" / "ratings.csv"),
                                                         tmp_path / "a", "--split", split)
    m, rows, users, movies = prepared(src, tmp_path / "b", "--split", split)

    assert m["counts"]["input_ratings"] == len(ROWS) and m["counts"]["duplicates_dropped"] == 0
    for key in ("counts", "cold_start", "rating", "split"):
        assert m[key] == base_m[key], key
    assert rows.equals(base_rows)
    assert users.equals(base_users) and movies.equals(base_movies)
    assert set(rows["user_id"]) >= {100_000, 150_000, 200_000} and 100_000 in set(rows["movie_id"])
    for name in ("train", "val", "test"):
        assert [e["sha256"] for e in m["shards"][name]] == [e["sha256"] for e in base_m["shards"][name]]


def test_quoted_test_input_file(tmp_path):
    """--test-input goes through the same reader."""
    train = write_csv_module(tmp_path / "train.csv", rows=ROWS[:300], quoting=csv.QUOTE_ALL)
    test = write_csv_module(tmp_path / "test.csv", rows=ROWS[300:], encoding="utf-8-sig")
    m = run(["--input", str(train), "--test-input", str(test), "--val-frac", "0", "--out", str(tmp_path / "o"),
             "--quiet"])
    assert m["counts"]["train"] == 300 and m["counts"]["test"] == len(ROWS) - 300
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["split"]["kind"] == "predefined"


QUOTED = '"userId","movieId","rating","timestamp"\r\n'
BAD_QUOTED = {  # (file text, expected part of the one-line error)
    "quoted header, column missing": ('"userId","movieId","rating"\r\n"1","2","3.0"\r\n',
                                      "missing column(s) timestamp"),
    "quoted header, wrong names": ('"","user","item","score","time"\n"1",1,2,3,4\n', "missing column(s) userId"),
    "quoted non-numeric rating": (QUOTED + '"1","2","3.0","4"\r\n"1","3","abc","5"\r\n', "line 3: rating 'abc'"),
    "R's NA rating": ('"","userId","movieId","rating","timestamp"\n"1",1,2,NA,4\n', "line 2: rating 'NA' is not"),
    "fractional user id": (QUOTED + "1.5,2,3.0,4\r\n", "line 2: userId '1.5' is not an integer"),
    "quoted NaN rating": (QUOTED + '"1","2","NaN","4"\r\n', "outside the scale"),
    "quoted rating out of scale": (QUOTED + '"1","2","3.0","4"\r\n"1","3","5.5","4"\r\n', "line 3: rating 5.5"),
    "quoted empty rating": (QUOTED + '"1","2","","4"\r\n', "line 2: missing rating"),
    "too many fields": (QUOTED + "1,2,3.0,4\r\n1,3,4.0,5,6\r\n", "malformed rows"),
    "unclosed quote": (QUOTED + '1,2,3.0,4\r\n"1,3,4.0,5\r\n', "ratings.csv"),
    "BOM, header only": ("\ufeff" + QUOTED, "no ratings"),
}


@pytest.mark.parametrize("case", sorted(BAD_QUOTED))
def test_bad_quoted_input_is_one_line_error(tmp_path, capsys, case):
    text, expected = BAD_QUOTED[case]
    src = tmp_path / "ratings.csv"
    src.write_bytes(text.encode())
    err = fail(["--input", str(src), "--out", str(tmp_path / "out"), "--quiet"], capsys)
    assert expected in err, err
    assert not (tmp_path / "out").exists()

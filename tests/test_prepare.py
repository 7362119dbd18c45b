"""mfscale.prepare: formats, id maps, splits, duplicates, atomic output and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from mfscale import prepare
from mfscale.shards import Dataset, read_row_group, read_stripe

ROWS = [  # user, movie, rating, timestamp
    (1, 10, 4.0, 1000), (1, 20, 3.5, 1001), (1, 30, 5.0, 1002), (1, 40, 2.0, 1003),
    (2, 10, 1.0, 1100), (2, 30, 4.5, 1101), (2, 50, 3.0, 1102),
    (7, 20, 0.5, 900), (7, 40, 5.0, 901), (7, 50, 2.5, 902), (7, 60, 4.0, 903),
]


def write_csv(path: Path, rows=ROWS, header="userId,movieId,rating,timestamp") -> Path:
    lines = [header] + [f"{u},{m},{r},{t}" for u, m, r, t in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(argv: list[str]) -> dict:
    assert prepare.main(argv) == 0
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "manifest.json").read_text())


def fail(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        prepare.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def all_rows(out: Path) -> pl.DataFrame:
    ds = Dataset(out)
    users = pl.read_parquet(out / "users.parquet")
    movies = pl.read_parquet(out / "movies.parquet")
    frames = []
    for split in ("train", "val", "test"):
        a = ds.read_split(split)
        frames.append(pl.DataFrame({"user_idx": a["user"], "item_idx": a["item"], "rating": a["rating"],
                                    "timestamp": a["timestamp"], "split": split}))
    df = pl.concat(frames)
    return (df.join(users.select("user_idx", "user_id"), on="user_idx")
              .join(movies.select("item_idx", "movie_id"), on="item_idx"))


def as_tuples(df: pl.DataFrame) -> set:
    return {(int(u), int(m), float(r), int(t)) for u, m, r, t in
            df.select("user_id", "movie_id", "rating", "timestamp").iter_rows()}


@pytest.mark.parametrize("fmt", ["csv", "dat", "tsv"])
def test_each_format_round_trips_through_id_maps(tmp_path, fmt):
    if fmt == "csv":
        src = write_csv(tmp_path / "ratings.csv")
        (tmp_path / "movies.csv").write_text(
            'movieId,title,genres\n10,"Heat, The (1995)",Action|Crime\n20,Up (2009),Animation\n')
    elif fmt == "dat":
        src = tmp_path / "ratings.dat"
        src.write_text("".join(f"{u}::{m}::{r:g}::{t}\n" for u, m, r, t in ROWS))
        (tmp_path / "movies.dat").write_bytes("10::Amélie (2001)::Comedy|Romance\n".encode("latin-1"))
    else:
        src = tmp_path / "u.data"
        src.write_text("".join(f"{u}\t{m}\t{r:g}\t{t}\n" for u, m, r, t in ROWS))
        flags = ["0"] * 19
        flags[1] = flags[5] = "1"
        (tmp_path / "u.item").write_bytes(("10|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(flags)
                                           + "\n").encode("latin-1"))
    out = tmp_path / "out"
    m = run(["--input", str(src), "--out", str(out), "--val-frac", "0.1", "--test-frac", "0.2", "--quiet"])
    assert m["counts"]["ratings"] == len(ROWS)
    assert m["counts"]["users"] == 3 and m["counts"]["items"] == 6
    assert as_tuples(all_rows(out)) == set(ROWS)
    users = pl.read_parquet(out / "users.parquet")
    assert users["user_id"].to_list() == [1, 2, 7]  # contiguous index in original-id order
    assert users["n_ratings"].to_list() == [4, 3, 4]
    movies = pl.read_parquet(out / "movies.parquet")
    first = movies.filter(pl.col("movie_id") == 10).row(0, named=True)
    expected = {"csv": ("Heat, The (1995)", "Action|Crime", 1995),
                "dat": ("Amélie (2001)", "Comedy|Romance", 2001),
                "tsv": ("Toy Story (1995)", "Action|Comedy", 1995)}[fmt]
    assert (first["title"], first["genres"], first["year"]) == expected
    assert m["has_movie_metadata"]


def test_zip_and_directory_inputs(tmp_path):
    d = tmp_path / "ml-x"
    d.mkdir()
    write_csv(d / "ratings.csv")
    z = tmp_path / "ml-x.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(d / "ratings.csv", "ml-x/ratings.csv")
    a = run(["--input", str(z), "--out", str(tmp_path / "a"), "--quiet"])
    b = run(["--input", str(d), "--out", str(tmp_path / "b"), "--quiet"])
    assert a["counts"] == b["counts"]
    assert as_tuples(all_rows(tmp_path / "a")) == set(ROWS)


def big_frame(n_users=200, n_items=150, per_user=30, seed=0) -> list[tuple]:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for j, m in enumerate(rng.choice(n_items, per_user, replace=False)):
            rows.append((u + 1, int(m) * 3 + 1, float(rng.integers(1, 11)) / 2, 10_000 + u * 7 + j * 13))
    return rows


@pytest.mark.parametrize("kind", ["random", "time"])
def test_fraction_splits_disjoint_complete_deterministic_proportional(tmp_path, kind):
    rows = big_frame()
    src = write_csv(tmp_path / "ratings.csv", rows)
    argv = ["--input", str(src), "--split", kind, "--val-frac", "0.1", "--test-frac", "0.2", "--seed", "3",
            "--quiet"]
    m = run(argv + ["--out", str(tmp_path / "a")])
    run(argv + ["--out", str(tmp_path / "b")])
    df = all_rows(tmp_path / "a")
    assert df.height == len(rows) and as_tuples(df) == set(rows)  # complete and disjoint
    n = len(rows)
    assert m["counts"]["test"] == round(0.2 * n) and m["counts"]["val"] == round(0.1 * n)
    for split in ("train", "val", "test"):  # deterministic
        assert Dataset(tmp_path / "a").read_split(split)["user"].tolist() == \
            Dataset(tmp_path / "b").read_split(split)["user"].tolist()
    if kind == "time":
        ts = {s: df.filter(pl.col("split") == s)["timestamp"] for s in ("train", "val", "test")}
        assert ts["train"].max() <= ts["val"].min() and ts["val"].max() <= ts["test"].min()
        assert m["split"]["test_from_timestamp"] == ts["test"].min()
    # A different seed gives a different random split.
    if kind == "random":
        run(argv[:-3] + ["--seed", "4", "--quiet", "--out", str(tmp_path / "c")])
        assert Dataset(tmp_path / "c").read_split("test")["item"].tolist() != \
            Dataset(tmp_path / "a").read_split("test")["item"].tolist()


def test_input_order_does_not_change_split(tmp_path):
    rows = big_frame()
    run(["--input", str(write_csv(tmp_path / "a.csv", rows)), "--out", str(tmp_path / "a"), "--quiet"])
    run(["--input", str(write_csv(tmp_path / "b.csv", rows[::-1])), "--out", str(tmp_path / "b"), "--quiet"])
    assert as_tuples(all_rows(tmp_path / "a").filter(pl.col("split") == "test")) == \
        as_tuples(all_rows(tmp_path / "b").filter(pl.col("split") == "test"))


def test_temporal_split_holds_out_each_users_last_ratings(tmp_path):
    rows = big_frame(n_users=50) + [(999, 1, 3.0, 5)]  # a one-rating user keeps it in train
    src = write_csv(tmp_path / "ratings.csv", rows)
    m = run(["--input", str(src), "--split", "temporal", "--val-k", "1", "--test-k", "2", "--out",
             str(tmp_path / "o"), "--quiet"])
    df = all_rows(tmp_path / "o")
    assert m["counts"]["test"] == 50 * 2 and m["counts"]["val"] == 50
    for (uid,), g in df.group_by(["user_id"]):
        g = g.sort("timestamp")
        if uid == 999:
            assert g["split"].to_list() == ["train"]
        else:
            assert g["split"].to_list()[-3:] == ["val", "test", "test"]
            assert set(g["split"].to_list()[:-3]) == {"train"}


def test_predefined_test_file(tmp_path):
    base = write_csv(tmp_path / "u1.base", ROWS[:8])
    test = write_csv(tmp_path / "u1.test", ROWS[8:] + [(99, 70, 3.0, 5)])
    m = run(["--input", str(base), "--test-input", str(test), "--val-frac", "0", "--out", str(tmp_path / "o"),
             "--quiet"])
    df = all_rows(tmp_path / "o")
    assert as_tuples(df.filter(pl.col("split") == "test")) == set(ROWS[8:] + [(99, 70, 3.0, 5)])
    assert m["split"]["kind"] == "predefined"
    # User 99 and movie 70 appear only in test: indexed, and counted as cold start.
    assert m["cold_start"]["test_users_not_in_train"] == 1
    assert m["cold_start"]["test_items_not_in_train"] >= 1


def test_duplicates_keep_latest_and_are_counted(tmp_path):
    rows = ROWS + [(1, 10, 1.0, 5000), (2, 50, 5.0, 10)]  # (1,10) newer wins; (2,50) older loses
    m = run(["--input", str(write_csv(tmp_path / "r.csv", rows)), "--out", str(tmp_path / "o"),
             "--val-frac", "0", "--test-frac", "0", "--quiet"])
    assert m["counts"]["duplicates_dropped"] == 2
    got = as_tuples(all_rows(tmp_path / "o"))
    assert (1, 10, 1.0, 5000) in got and (1, 10, 4.0, 1000) not in got
    assert (2, 50, 3.0, 1102) in got and (2, 50, 5.0, 10) not in got


def test_manifest_contents(tmp_path):
    m = run(["--input", str(write_csv(tmp_path / "r.csv", big_frame())), "--out", str(tmp_path / "o"),
             "--quiet"])
    assert m["format_version"] == 1
    assert m["source"]["kind"] == "file" and len(m["source"]["md5"]) == 32
    assert sum(m["rating"]["histogram"].values()) == m["counts"]["ratings"]
    assert 0.5 <= m["rating"]["min"] <= m["rating"]["mean"] <= m["rating"]["max"] <= 5.0
    for split in ("train", "val", "test"):
        assert sum(e["rows"] for e in m["shards"][split]) == m["counts"][split]
        for e in m["shards"][split]:
            assert len(e["sha256"]) == 64 and (tmp_path / "o" / e["file"]).is_file()
    # Enough row groups to deal to ranks x workers even on small data.
    assert len(Dataset(tmp_path / "o").row_groups("train")) >= 4


def test_existing_output_refused_then_overwritten(tmp_path, capsys):
    src = write_csv(tmp_path / "r.csv")
    out = tmp_path / "o"
    run(["--input", str(src), "--out", str(out), "--quiet"])
    before = (out / "manifest.json").read_text()
    assert "already exists" in fail(["--input", str(src), "--out", str(out), "--quiet"], capsys)
    assert (out / "manifest.json").read_text() == before
    run(["--input", str(src), "--out", str(out), "--overwrite", "--seed", "5", "--quiet"])
    assert json.loads((out / "manifest.json").read_text())["split"]["seed"] == 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_run_keeps_existing_output_and_leaves_no_partial(tmp_path, capsys):
    src = write_csv(tmp_path / "r.csv")
    out = tmp_path / "o"
    run(["--input", str(src), "--out", str(out), "--quiet"])
    before = (out / "manifest.json").read_text()
    bad = write_csv(tmp_path / "bad.csv", ROWS + [(3, 3, 9.0, 1)])
    fail(["--input", str(bad), "--out", str(out), "--overwrite", "--quiet"], capsys)
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "o", "r.csv"]


BAD_INPUTS = {
    "missing file": (None, "not found"),
    "unknown format": ("just some words\nmore words\n", "unknown ratings format"),
    "wrong columns": ("user,item,score,time\n1,2,3.0,4\n", "missing column"),
    "non-numeric rating": ("userId,movieId,rating,timestamp\n1,2,3.0,4\n1,3,abc,5\n", "line 3: rating 'abc'"),
    "non-numeric user": ("userId,movieId,rating,timestamp\nx1,2,3.0,4\n", "line 2: userId 'x1'"),
    "NaN rating": ("userId,movieId,rating,timestamp\n1,2,NaN,4\n", "outside the scale"),
    "rating too high": ("userId,movieId,rating,timestamp\n1,2,3.0,4\n1,3,5.5,4\n", "line 3: rating 5.5"),
    "rating too low": ("userId,movieId,rating,timestamp\n1,2,0.0,4\n", "outside the scale"),
    "missing field": ("userId,movieId,rating,timestamp\n1,2,3.0\n", "missing timestamp"),
    "empty": ("", "empty"),
    "header only": ("userId,movieId,rating,timestamp\n", "no ratings"),
    "bad dat": ("1::2::x::4\n", "rating 'x' is not a number"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_line_error(tmp_path, capsys, case):
    text, expected = BAD_INPUTS[case]
    name = "ratings.dat" if case == "bad dat" else "ratings.csv"
    src = tmp_path / name
    if text is not None:
        src.write_text(text)
    out = tmp_path / "out"
    err = fail(["--input", str(src), "--out", str(out), "--quiet"], capsys)
    assert expected in err, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_flags(tmp_path, capsys):
    src = write_csv(tmp_path / "r.csv")
    assert "below 1" in fail(["--input", str(src), "--out", str(tmp_path / "o"), "--val-frac", "0.5",
                              "--test-frac", "0.5"], capsys)
    assert "--users" in fail(["--input", str(src), "--out", str(tmp_path / "o"), "--users", "3"], capsys)


def test_unwritable_output_is_one_line_error(tmp_path, capsys):
    src = write_csv(tmp_path / "r.csv")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = fail(["--input", str(src), "--out", str(blocker / "sub"), "--quiet"], capsys)
    assert "cannot write output directory" in err


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mfscale.prepare", "--input", str(tmp_path / "nope.csv"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"mfscale.prepare: error: input not found: {tmp_path / 'nope.csv'}"


def test_output_directory_has_ordinary_permissions(tmp_path):
    """Staged with mkdtemp (0700) but installed with the umask's permissions, like any directory."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    out = tmp_path / "o"
    run(["--input", str(write_csv(tmp_path / "r.csv")), "--out", str(out), "--quiet"])
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_training_split_is_bucketed_by_user(tmp_path):
    """Each row group of the training split holds one user bucket (a blocks rank reads only its own), the
    buckets balance the training ratings, and the stripes hold every training row once."""
    out = tmp_path / "o"
    run(["--synthetic", "small", "--out", str(out), "--quiet", "--user-buckets", "7"])
    ds = Dataset(out)
    users = pq.read_table(out / "users.parquet").to_pydict()
    bucket = np.array(users["bucket"])
    assert ds.buckets["n"] == 7 and set(bucket.tolist()) == set(range(7))
    rows = np.array(ds.buckets["rows"])
    assert rows.sum() == ds.split_rows("train") and rows.max() / rows.mean() < 1.05
    assert np.array_equal(rows, np.bincount(bucket, weights=users["n_train"], minlength=7))
    groups = ds.row_groups("train")
    assert len({g.bucket for g in groups}) == 7
    for g in groups[:50]:
        assert set(bucket[read_row_group(g)["user"]].tolist()) == {g.bucket}
    whole = ds.read_split("train")
    streamed = _stream_order(ds)
    key = lambda a: np.sort(a["user"].astype(np.int64) * ds.n_items + a["item"])  # noqa: E731
    assert np.array_equal(key(whole), key(streamed))
    assert sum(s.rows for s in ds.stripes("train")) == len(whole["user"])


def test_bad_user_buckets_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        prepare.main(["--synthetic", "tiny", "--out", str(tmp_path / "o"), "--user-buckets", "-1"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == "mfscale.prepare: error: --user-buckets must be >= 0 (0 = auto), got -1"


def _adjacent_same(a: np.ndarray) -> float:
    """Share of neighbouring rows with the same value: about 1 / distinct values in a random order."""
    return float(np.mean(a[1:] == a[:-1]))


def _stream_order(ds: Dataset) -> dict[str, np.ndarray]:
    """The training rows in the order the stream reads them: stripe after stripe, each in its fixed order."""
    parts = [read_stripe(s) for s in ds.stripes("train")]
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def test_training_rows_are_written_in_a_seeded_random_order(tmp_path):
    """The stream relies on it: any contiguous run of training rows, as stripes are read, must be a random
    sample."""
    rows = sorted(big_frame(n_users=60, per_user=20))  # input sorted by user, then movie
    src = write_csv(tmp_path / "ratings.csv", rows)
    argv = ["--input", str(src), "--quiet", "--seed", "5"]
    for name in ("a", "b"):
        run(argv + ["--out", str(tmp_path / name)])
    run(argv[:-1] + ["6", "--out", str(tmp_path / "c")])
    train = {name: _stream_order(Dataset(tmp_path / name)) for name in "abc"}
    a = train["a"]
    n_users, n = len(np.unique(a["user"])), len(a["user"])
    # Sorted by user, 19 of 20 neighbours share the user; shuffled, about 1 in 60 does.
    assert _adjacent_same(a["user"]) < 5 / n_users
    pos = np.arange(n)
    for col in ("user", "item", "timestamp"):  # no column still orders the rows
        assert abs(np.corrcoef(pos, a[col])[0, 1]) < 0.2, col
    for col in ("user", "item", "rating", "timestamp"):  # the same seed gives the same order
        assert np.array_equal(a[col], train["b"][col]), col

    # Another seed gives another order, also among the rows both splits keep in training.
    def keys(t: dict[str, np.ndarray]) -> list[tuple[int, int]]:
        return list(zip(t["user"].tolist(), t["item"].tolist(), strict=True))

    common = set(keys(a)) & set(keys(train["c"]))
    assert len(common) > 0.6 * n
    assert [k for k in keys(a) if k in common] != [k for k in keys(train["c"]) if k in common]

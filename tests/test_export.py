"""mfscale.export: NumPy predictions from the exported files equal the model's, Parquet and npy agree, the
files load without mfscale or torch, and an existing output directory is refused unless --overwrite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mfscale.export import main
from mfscale.runs import load_run
from mfscale.shards import Dataset

from .test_recommend import tiny_run


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, Path]:
    data, run_dir = tiny_run(tmp_path_factory)
    out = tmp_path_factory.mktemp("export") / "model"
    assert main(["--run", str(run_dir), "--out", str(out)]) == 0
    return data, run_dir, out


def load_npy(out: Path) -> dict[str, np.ndarray]:
    names = ("user_factors", "item_factors", "user_bias", "item_bias", "user_ids", "movie_ids", "global_mean")
    return {n: np.load(out / f"{n}.npy") for n in names}


def test_numpy_predictions_equal_the_model(exported):
    data, run_dir, out = exported
    a = load_npy(out)
    run = load_run(run_dir)
    test = Dataset(data).read_split("test")
    u, i = test["user"].astype(np.int64), test["item"].astype(np.int64)
    expect = run.model.predict(torch.from_numpy(u), torch.from_numpy(i)).numpy()
    # look rows up through the exported original ids, as a user of the export would
    urow = {int(x): r for r, x in enumerate(a["user_ids"])}
    mrow = {int(x): r for r, x in enumerate(a["movie_ids"])}
    uids = run.users["user_id"].to_numpy()[u]
    mids = run.movies["movie_id"].to_numpy()[i]
    ur = np.array([urow[x] for x in uids.tolist()])
    mr = np.array([mrow[x] for x in mids.tolist()])
    got = a["global_mean"] + a["user_bias"][ur] + a["item_bias"][mr] + \
        np.einsum("ij,ij->i", a["user_factors"][ur], a["item_factors"][mr])
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
    assert a["global_mean"].shape == () and a["user_factors"].dtype == np.float32
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dim"] == a["user_factors"].shape[1] == 8
    assert (meta["n_users"], meta["n_movies"]) == (len(a["user_ids"]), len(a["movie_ids"]))
    assert (meta["rating_min"], meta["rating_max"]) == (0.5, 5.0)
    assert sorted(p.name for p in out.iterdir()) == sorted(meta["files"] + ["meta.json"])
    assert "np.clip" in (out / "README.txt").read_text()


def test_day_biases_exported_give_the_jobs_test_rmse(exported):
    """The run trains user-day biases (the default): the README's formula over the exported files alone, the day
    bias looked up by (original user id, timestamp // 86400), gives the test RMSE the job reported."""
    data, run_dir, out = exported
    a = load_npy(out)
    users_id, days, bias = (np.load(out / f"user_day_{n}.npy") for n in ("user_ids", "days", "bias"))
    assert len(bias) > 0 and days.dtype == np.int32 and bias.dtype == np.float32
    table = pq.read_table(out / "user_day_bias.parquet")
    assert table.column_names == ["user_id", "day", "bias"]
    np.testing.assert_array_equal(table["bias"].to_numpy(), bias)
    day_bias = dict(zip(zip(users_id.tolist(), days.tolist(), strict=True), bias.tolist(), strict=True))
    assert len(day_bias) == len(bias)  # one row per (user, day)
    run = load_run(run_dir)
    test = Dataset(data).read_split("test")
    uids = run.users["user_id"].to_numpy()[test["user"]]
    mids = run.movies["movie_id"].to_numpy()[test["item"]]
    urow = {int(x): r for r, x in enumerate(a["user_ids"])}
    mrow = {int(x): r for r, x in enumerate(a["movie_ids"])}
    ur = np.array([urow[x] for x in uids.tolist()])
    mr = np.array([mrow[x] for x in mids.tolist()])
    b = np.array([day_bias.get((u, t // 86400), 0.0) for u, t in zip(uids.tolist(), test["timestamp"].tolist(),
                                                                         strict=True)])
    assert (b != 0).any()  # some test ratings fall on a training day
    pred = (a["global_mean"] + a["user_bias"][ur] + a["item_bias"][mr] + b
            + np.einsum("ij,ij->i", a["user_factors"][ur], a["item_factors"][mr]))
    rmse = np.sqrt(np.mean((np.clip(pred, 0.5, 5.0) - test["rating"]) ** 2))
    assert rmse == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["test_rmse"], abs=2e-5)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["day_bias"]["n"] == len(bias) and "user_day_bias.parquet" in meta["files"]
    assert "TIMESTAMP // 86400" in (out / "README.txt").read_text()


def test_parquet_and_npy_agree(exported):
    _, run_dir, out = exported
    a = load_npy(out)
    users, movies = pq.read_table(out / "users.parquet"), pq.read_table(out / "movies.parquet")
    assert users.column_names == ["user_id", "n_train", "bias", "factors"]
    assert movies.column_names == ["movie_id", "title", "year", "genres", "n_train", "bias", "factors"]
    assert users.schema.field("factors").type.list_size == 8
    np.testing.assert_array_equal(users["user_id"].to_numpy(), a["user_ids"])
    np.testing.assert_array_equal(movies["movie_id"].to_numpy(), a["movie_ids"])
    np.testing.assert_array_equal(users["bias"].to_numpy(), a["user_bias"])
    np.testing.assert_array_equal(movies["bias"].to_numpy(), a["item_bias"])
    np.testing.assert_array_equal(np.stack(users["factors"].to_numpy(zero_copy_only=False)), a["user_factors"])
    np.testing.assert_array_equal(np.stack(movies["factors"].to_numpy(zero_copy_only=False)), a["item_factors"])
    run = load_run(run_dir)
    assert movies["title"].to_pylist() == run.movies["title"].to_list()


def test_loads_with_numpy_and_pyarrow_only(exported):
    _, _, out = exported
    code = (
        "import sys, numpy as np, pyarrow.parquet as pq\n"
        f"d = {str(out)!r}\n"
        "P, Q = np.load(d + '/user_factors.npy'), np.load(d + '/item_factors.npy')\n"
        "s = np.clip(np.load(d + '/global_mean.npy') + np.load(d + '/user_bias.npy')[0] "
        "+ np.load(d + '/item_bias.npy') + Q @ P[0], 0.5, 5.0)\n"
        "pq.read_table(d + '/movies.parquet')\n"
        "assert not {'torch', 'mfscale', 'polars'} & set(sys.modules), sys.modules.keys()\n"
        "print(s.shape[0])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=out)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) == len(np.load(out / "movie_ids.npy"))


def test_refuses_existing_out_dir_unless_overwrite(exported, tmp_path, capsys):
    _, run_dir, _ = exported
    out = tmp_path / "exp"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as se:
        main(["--run", str(run_dir), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert se.value.code == 2 and "\n" not in err and "exists (use --overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["--run", str(run_dir), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "item_factors.npy").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no temp or backup dirs left


def test_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as se:
        main(["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert se.value.code == 2 and "run directory not found" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit) as se:
        main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "o")])
    assert se.value.code == 2 and "no model in run directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

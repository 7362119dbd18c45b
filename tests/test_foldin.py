"""Fold-in of new users without retraining (issue 23): ``recommend.fold_in`` and ``recommend --ratings``.

The solve is checked against the objective itself (its gradient vanishes at the answer, computed straight
from the formula with NumPy, not by the solver), on a real trained run; then the CLI: top-N per new user,
``--predict`` pairs, and one line for each kind of bad input.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from mfscale import config, daybias, train
from mfscale.errors import DataError
from mfscale.recommend import (
    FOLD_IN_PRIORS,
    Recommender,
    calibrate_prior,
    calibration_sample,
    fold_in,
    fold_in_prior,
    main,
)
from mfscale.runs import load_run

from .test_recommend import prepare_synthetic, tiny_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny_run(tmp_path_factory)


FOLDIN_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "foldin.py"


@pytest.fixture(scope="module", autouse=True)
def foldin_benchmark(request, tmp_path_factory):
    """test_foldin_benchmark_smoke's run of benchmarks/foldin.py, started with the module when that test is to run:
    one process, mostly on one core, beside the in-process tests before it: (its Popen, its directory)."""
    if not any(item.nodeid.endswith("::test_foldin_benchmark_smoke") for item in request.session.items):
        yield None
        return
    work = tmp_path_factory.mktemp("foldin-bench")
    out = work / "f.jsonl"
    with open(work / "stdout", "w") as o, open(work / "stderr", "w") as e:  # files: no pipe to fill meanwhile
        proc = subprocess.Popen([sys.executable, str(FOLDIN_BENCH), "--synthetic", "tiny", "--work", str(work / "w"),
                                 "--train-args", "--epochs 1 --dim 8", "--out-jsonl", str(out)], stdout=o, stderr=e,
                                text=True)
    try:
        yield proc, work
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def new_user_ratings(run, user_row: int, new_id: int) -> pl.DataFrame:
    """A trained user's training ratings under an id the model has not seen."""
    train_split = run.data.read_split("train")
    mine = train_split["user"] == user_row
    movie_ids = run.movies["movie_id"].to_numpy()[train_split["item"][mine]]
    return pl.DataFrame({"user_id": np.full(mine.sum(), new_id), "movie_id": movie_ids,
                         "rating": train_split["rating"][mine].astype(np.float64)})


def objective_gradient(run, ratings: pl.DataFrame, p: np.ndarray, b: float, prior: float = 0.0) -> np.ndarray:
    """d/d[p, b] of sum_i (r_i - mean - b_i - b - p.q_i)^2 + (n + prior) (reg_factor |p|^2 + reg_bias b^2),
    straight from the formula (float64)."""
    _, _, q, bi = (t.detach().double().numpy() for t in run.model.factors())
    rows = np.searchsorted(run.movies["movie_id"].to_numpy(), ratings["movie_id"].to_numpy())
    mean = float(run.model.global_bias)
    err = ratings["rating"].to_numpy() - mean - bi[rows] - b - q[rows] @ p
    n = len(rows) + prior
    grad_p = -2 * (err[:, None] * q[rows]).sum(0) + 2 * n * run.reg_factor * p
    grad_b = -2 * err.sum() + 2 * n * run.reg_bias * b
    return np.r_[grad_p, grad_b]


def test_fold_in_minimizes_the_training_objective(trained):
    data, run_dir = trained
    run = load_run(run_dir)
    assert (run.reg_factor, run.reg_bias) == (config.OptimConfig().reg_factor, config.OptimConfig().reg_bias)
    counts = run.users["n_train"].to_numpy()
    row = int(np.argmax(counts))
    ratings = new_user_ratings(run, row, new_id=10**6)
    for prior in (0.0, 64.0):  # the training objective itself, and with a prior's extra L2
        folded = fold_in(run, ratings, prior=prior)
        p, b = folded.p[0].double().numpy(), float(folded.bu[0])
        scale = np.abs(objective_gradient(run, ratings, np.zeros_like(p), 0.0, prior)).max()
        assert np.abs(objective_gradient(run, ratings, p, b, prior)).max() < 1e-4 * scale
    calibrated = fold_in_prior(run)["prior"]
    folded = fold_in(run, ratings)  # the default: the calibrated prior
    p, b = folded.p[0].double().numpy(), float(folded.bu[0])
    assert np.abs(objective_gradient(run, ratings, p, b, calibrated)).max() < 1e-4 * scale
    # the folded-in user fits its ratings about as well as training fitted the same user
    rec = Recommender(run)
    pairs = ratings.select("user_id", "movie_id")
    folded_rmse = np.sqrt(np.mean((rec.predict_folded(folded, pairs) - ratings["rating"].to_numpy()) ** 2))
    p_t, bu_t, q, bi = (t.detach().double().numpy() for t in run.model.factors())
    items = np.searchsorted(run.movies["movie_id"].to_numpy(), ratings["movie_id"].to_numpy())
    trained_pred = np.clip(float(run.model.global_bias) + bu_t[row] + bi[items] + q[items] @ p_t[row],
                           *run.rating_range)
    trained_rmse = np.sqrt(np.mean((trained_pred - ratings["rating"].to_numpy()) ** 2))
    assert folded_rmse <= trained_rmse + 0.02


def test_fold_in_of_a_plain_mf_run_and_a_max_norm_run(tmp_path):
    data = prepare_synthetic(tmp_path / "data")
    for name, changes in (("plain", {"model__biases": False}), ("capped", {"model__max_norm": 0.05})):
        cfg = config.JobConfig()
        cfg.data.path, cfg.run_dir, cfg.data.workers = str(data), str(tmp_path / name), 0
        train.run(config.replace(cfg, train__epochs=1, model__dim=8, optim__lr=0.02, train__batch_size=1024,
                                 train__device="cpu", **changes).validate())
        run = load_run(tmp_path / name)
        folded = fold_in(run, new_user_ratings(run, 0, new_id=10**6))
        if name == "plain":
            assert float(folded.bu[0]) == 0.0
            pairs = pl.DataFrame({"user_id": [10**6], "movie_id": [int(run.movies["movie_id"][3])]})
            q = run.model.factors()[2].detach().double().numpy()
            expected = np.clip(folded.p[0].double().numpy() @ q[3], *run.rating_range)
            assert Recommender(run).predict_folded(folded, pairs)[0] == pytest.approx(expected, rel=1e-5)
        else:
            assert float(np.linalg.norm(folded.p[0].numpy())) <= 0.05 + 1e-6


def write(path, text: str):
    path.write_text(text)
    return path


def test_cli_top_n_and_predict(trained, tmp_path, capsys):
    _, run_dir = trained
    run = load_run(run_dir)
    movies = run.movies.filter(pl.col("n_train") > 0)["movie_id"].to_list()
    stars = [5, 4, 1, 3, 4.5, 2]
    lines = [f"{u},{m},{r}\n" for u, ms in ((900001, movies[:6]), (900002, movies[6:9]))
             for m, r in zip(ms, stars[:len(ms)], strict=True)]
    ratings = write(tmp_path / "new.csv", "userId,movieId,rating\n" + "".join(lines))
    assert main(["--run", str(run_dir), "--ratings", str(ratings), "-k", "4"]) == 0
    out = capsys.readouterr().out
    assert "Top 4 for new user 900001 (folded in from 6 ratings" in out and "new user 900002" in out
    shown = [int(line.split("[")[1].split("]")[0]) for line in out.splitlines()
             if line.strip()[:2].strip(".").isdigit()]
    assert len(shown) == 8 and not set(shown[:4]) & set(movies[:6])  # the file's own movies are not recommended
    pairs = write(tmp_path / "pairs.csv", f"userId,movieId\n900002,{movies[0]}\n900001,{movies[10]}\n")
    out_csv = tmp_path / "pred.csv"
    assert main(["--run", str(run_dir), "--ratings", str(ratings), "--predict", str(pairs),
                 "--out", str(out_csv)]) == 0
    pred = pl.read_csv(out_csv)
    assert pred.columns == ["userId", "movieId", "rating"] and pred["userId"].to_list() == [900002, 900001]
    lo, hi = run.rating_range
    assert pred["rating"].is_between(lo, hi).all()
    capsys.readouterr()
    assert main(["--run", str(run_dir), "--ratings", str(ratings), "--predict", str(pairs)]) == 0
    assert pl.read_csv(capsys.readouterr().out.encode())["rating"].to_list() == pred["rating"].to_list()
    # --fold-in-prior: the solve at that prior instead of the calibrated one
    assert main(["--run", str(run_dir), "--ratings", str(ratings), "--predict", str(pairs),
                 "--fold-in-prior", "0"]) == 0
    exact = fold_in(run, pl.read_csv(ratings).rename({"userId": "user_id", "movieId": "movie_id"}), prior=0.0)
    expected = Recommender(run).predict_folded(exact, pl.read_csv(pairs).rename({"userId": "user_id",
                                                                                 "movieId": "movie_id"}))
    got = pl.read_csv(capsys.readouterr().out.encode())["rating"].to_numpy()
    assert np.allclose(got, expected, atol=1e-6)


def test_the_fold_in_prior_is_calibrated_on_validation_alone(trained, monkeypatch):
    """The calibration reads the training and validation splits, never the test split; each prior's RMSE is the
    ridge written from the formula with NumPy (not fold_in) on the sample's ratings, scored on their validation
    ratings; the best is kept."""
    run = load_run(trained[1])
    reads = []
    real_read = run.data.read_split
    monkeypatch.setattr(run.data, "read_split", lambda split, *a, **k: reads.append(split) or real_read(split, *a, **k))
    calibration = calibrate_prior(run)
    assert reads and set(reads) == {"train", "val"}
    assert set(calibration["val_rmse"]) == {str(p) for p in FOLD_IN_PRIORS}
    assert calibration["val_rmse"][str(int(calibration["prior"]))] == min(calibration["val_rmse"].values())
    ratings, pairs, truth = calibration_sample(run)
    assert ratings["user_id"].min() > run.users["user_id"].max()  # new ids: fold_in would refuse known users
    assert calibration["users"] == ratings["user_id"].n_unique() > 10
    _, _, q, bi = (t.detach().double().numpy() for t in run.model.factors())
    mean, d = float(run.model.global_bias), q.shape[1]
    movie_ids = run.movies["movie_id"].to_numpy()
    trained_movie = run.movies["n_train"].to_numpy() > 0
    lo, hi = run.rating_range
    for prior in (0, 16):
        pred = np.empty(pairs.height)
        for uid in np.unique(pairs["user_id"].to_numpy()):
            mine = ratings.filter(pl.col("user_id") == uid)
            rows = np.searchsorted(movie_ids, mine["movie_id"].to_numpy())
            rows = rows[trained_movie[rows]]
            y = mine["rating"].to_numpy()[trained_movie[np.searchsorted(movie_ids, mine["movie_id"].to_numpy())]]
            x = np.hstack([q[rows], np.ones((len(rows), 1))])
            lam = (len(rows) + prior) * np.r_[np.full(d, run.reg_factor), run.reg_bias]
            w = np.linalg.solve(x.T @ x + np.diag(lam), x.T @ (y - mean - bi[rows]))
            at = (pairs["user_id"] == uid).to_numpy()
            items = np.searchsorted(movie_ids, pairs["movie_id"].to_numpy()[at])
            pred[at] = np.clip(mean + w[d] + bi[items] + q[items] @ w[:d], lo, hi)
        assert calibration["val_rmse"][str(prior)] == pytest.approx(np.sqrt(np.mean((pred - truth) ** 2)), abs=1e-6)


def test_the_calibrated_prior_is_kept_per_checkpoint(trained, tmp_path, monkeypatch):
    """``RUN/foldin.json`` keeps the calibration: found once, found again when the checkpoint changes."""
    import os
    import shutil

    from mfscale import recommend

    run_dir = tmp_path / "run"
    shutil.copytree(trained[1], run_dir)
    (run_dir / recommend.CALIBRATION_FILE).unlink(missing_ok=True)
    calls = []
    real = recommend.calibrate_prior
    monkeypatch.setattr(recommend, "calibrate_prior", lambda run: calls.append(1) or real(run))
    first = fold_in_prior(load_run(run_dir))
    assert fold_in_prior(load_run(run_dir)) == first and len(calls) == 1
    assert (run_dir / recommend.CALIBRATION_FILE).is_file()
    run = load_run(run_dir)
    st = run.checkpoint_path.stat()
    os.utime(run.checkpoint_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a newer checkpoint
    assert fold_in_prior(load_run(run_dir)) == first and len(calls) == 2


@pytest.mark.parametrize("content, pairs, message", [
    ("userId,movieId,rating\n", None, "no ratings"),
    ("userId,movieId,rating\n{known},{movie},4\n", None, "is in the training data already (use --user"),
    ("userId,movieId,rating\n900001,987654321,4\n", None, "movie 987654321 is not in"),
    ("userId,movieId,rating\n900001,{movie},7\n", None, "outside the scale"),
    ("userId,movie,rating\n900001,{movie},4\n", None, "missing column(s) movieId"),
    ("userId,movieId,rating\n900001,{movie},4\n", "userId,movieId\n900002,{movie}\n", "user 900002 has no ratings"),
    ("userId,movieId,rating\n900001,{movie},4\n", "--fold-in-prior=-1", "--fold-in-prior goes with --ratings and must"),
])
def test_cli_bad_input_is_one_line(trained, tmp_path, capsys, content, pairs, message):
    _, run_dir = trained
    run = load_run(run_dir)
    fill = {"known": int(run.users["user_id"][0]), "movie": int(run.movies["movie_id"][0])}
    args = ["--run", str(run_dir), "--ratings", str(write(tmp_path / "r.csv", content.format(**fill)))]
    if pairs and pairs.startswith("--"):
        args.append(pairs)
    elif pairs:
        args += ["--predict", str(write(tmp_path / "p.csv", pairs.format(**fill)))]
    with pytest.raises(SystemExit) as se:
        main(args)
    assert se.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("mfscale.recommend: error:") and message in err, err


def test_fold_in_refuses_known_users_directly(trained):
    run = load_run(trained[1])
    with pytest.raises(DataError, match="in the training data already"):
        fold_in(run, new_user_ratings(run, 0, new_id=int(run.users["user_id"][0])))


def export_recipe(directory) -> str:
    """The NumPy code of an export's README.txt (its indented blocks that use np), reading ``directory``."""
    import textwrap

    text = (directory / "README.txt").read_text()
    blocks, current = [], []
    for line in text.splitlines():
        if line.startswith("    ") or (current and not line.strip()):
            current.append(line)
        elif current:
            blocks.append(textwrap.dedent("\n".join(current)))
            current = []
    blocks.append(textwrap.dedent("\n".join(current)))
    return "\n".join(b for b in blocks if "np." in b).replace('d = "path/to/this/directory"', f'd = "{directory}"')


def test_the_exports_numpy_recipe_folds_in_the_same_user(trained, tmp_path):
    """README.txt of an export: its code, run as written with NumPy alone, gives the fold-in's numbers."""
    from mfscale import export

    run = load_run(trained[1])
    export.main(["--run", str(trained[1]), "--out", str(tmp_path / "exp")])
    code = export_recipe(tmp_path / "exp")
    ratings = new_user_ratings(run, 2, new_id=10**6)
    folded = fold_in(run, ratings)
    # the run has user-day biases (the default): the README's day-bias lines need a time, one of user 0's training days
    keys, values = run.day_biases()
    user0 = keys >> daybias.DAY_BITS == 0
    timestamp = int(keys[user0][0] & ((1 << daybias.DAY_BITS) - 1)) * daybias.DAY_SECONDS + 3600
    space = {"USER_ID": int(run.users["user_id"][0]), "MOVIE_ID": int(run.movies["movie_id"][0]),
             "TIMESTAMP": timestamp,
             "NEW_USER_MOVIE_IDS": ratings["movie_id"].to_list(), "NEW_USER_RATINGS": ratings["rating"].to_list()}
    exec(code, space)  # noqa: S102 - the export's own documentation, run as a user would
    assert np.allclose(space["p_new"], folded.p[0].double().numpy(), atol=1e-5)
    assert space["b_new"] == pytest.approx(float(folded.bu[0]), abs=1e-5)
    # user 0's rating of movie 0 on that day: the model's prediction plus that day's bias, clipped
    plain = float(run.model.predict(torch.tensor([0]), torch.tensor([0]))[0])
    assert space["rating"] == pytest.approx(min(max(plain + float(values[user0][0]), 0.5), 5.0), abs=1e-5)


def test_foldin_benchmark_smoke(foldin_benchmark):
    """benchmarks/foldin.py end to end on the tiny preset (1 epoch): both runs, both RMSEs, the times. (Started with
    the module: the foldin_benchmark fixture.)"""
    import json

    proc, work = foldin_benchmark
    proc.wait(timeout=300)
    out = work / "f.jsonl"
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, (work / "stdout").read_text(),
                                       (work / "stderr").read_text())
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(out.read_text())
    assert set(row["rmse"]) == {"trained in", "folded in"} and all(0 < v < 5 for v in row["rmse"].values())
    assert row["held_users"] > 0 and row["fold_seconds"] > 0
    assert "fold-in minus trained-in" in proc.stdout

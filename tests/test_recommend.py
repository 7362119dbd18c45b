"""mfscale.recommend: top-N excludes training movies and matches brute force, batch mode, similar movies,
title lookup and the one-line errors. Also home of the tiny trained run the tool tests share."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from mfscale import checkpoint, config, prepare, train
from mfscale.errors import DataError
from mfscale.recommend import Recommender, find_movie, main, similar_movies
from mfscale.runs import load_run


def prepare_synthetic(out: Path, preset: str = "tiny", seed: int = 0) -> Path:
    assert prepare.main(["--synthetic", preset, "--seed", str(seed), "--out", str(out), "--quiet"]) == 0
    return out


def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data, run_dir) of a model trained briefly on `tiny` synthetic data; built once per pytest session
    (kept under the session's base temp dir, so every test module reuses it)."""
    base = tmp_path_factory.getbasetemp() / "mfscale-tiny-run"
    data, run_dir = base / "data", base / "run"
    if not checkpoint.best_path(run_dir).is_file():
        shutil.rmtree(base, ignore_errors=True)
        prepare_synthetic(data)
        cfg = config.JobConfig()
        cfg.data.path, cfg.run_dir, cfg.data.workers = str(data), str(run_dir), 0
        cfg = config.replace(cfg, train__epochs=3, model__dim=8, optim__lr=0.02, train__batch_size=1024,
                             train__device="cpu").validate()
        train.run(cfg)
    return data, run_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_run(tmp_path_factory)


def seen_by_user(data: Path) -> dict[int, set[int]]:
    """Training movies per user row, computed independently of the tool."""
    import mfscale.shards as shards

    tr = shards.Dataset(data).read_split("train")
    out: dict[int, set[int]] = {}
    for u, i in zip(tr["user"].tolist(), tr["item"].tolist(), strict=True):
        out.setdefault(u, set()).add(i)
    return out


def test_top_k_excludes_seen_is_sorted_and_matches_brute_force(trained):
    data, run_dir = trained
    run = load_run(run_dir)
    rec = Recommender(run)
    seen = seen_by_user(data)
    movie_ids = run.movies["movie_id"].to_numpy()
    trained_items = run.movies["n_train"].to_numpy() > 0
    for uid in run.users["user_id"].to_list()[:5] + [int(run.users["user_id"][-1])]:
        u = run.user_index(uid)
        table = rec.for_user(uid, 7)
        assert table.height == 7 and table["rank"].to_list() == list(range(1, 8))
        scores = table["score"].to_numpy()
        assert np.all(np.diff(scores) <= 0)
        assert scores.min() >= 0.5 and scores.max() <= 5.0
        items = [int(np.flatnonzero(movie_ids == m)[0]) for m in table["movie_id"].to_list()]
        assert not set(items) & seen[u]
        # brute force with the model's own predict
        all_items = torch.arange(run.movies.height)
        pred = run.model.predict(torch.full_like(all_items, u), all_items).numpy()
        pred[list(seen[u])] = -np.inf
        pred[~trained_items] = -np.inf
        expect = np.argsort(-pred, kind="stable")[:7]
        assert items == expect.tolist()
        np.testing.assert_allclose(scores, np.clip(pred[expect], 0.5, 5.0), rtol=1e-5)


def test_cli_user_prints_k_lines(trained, capsys):
    _, run_dir = trained
    assert main(["--run", str(run_dir), "--user", "3", "-k", "4"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("Top 4 for user 3") and len(out) == 5
    assert out[1].lstrip().startswith("1.")


def test_all_users_file_matches_single_user_output(trained, tmp_path):
    _, run_dir = trained
    out = tmp_path / "recs.parquet"
    # a small batch so several batches (and a short last one) are exercised
    assert main(["--run", str(run_dir), "--all-users", "--out", str(out), "-k", "5", "--batch-users", "7"]) == 0
    df = pl.read_parquet(out)
    assert df.columns == ["user_id", "rank", "movie_id", "score"]
    run = load_run(run_dir)
    assert df["user_id"].n_unique() == run.users.height
    assert df.group_by("user_id").len()["len"].max() == 5
    assert not list(tmp_path.glob(".*tmp*"))
    rec = Recommender(run)
    for uid in (1, 8, 150, int(run.users["user_id"][-1])):
        single = rec.for_user(uid, 5)
        mine = df.filter(pl.col("user_id") == uid).sort("rank")
        assert mine["movie_id"].to_list() == single["movie_id"].to_list()
        assert mine["rank"].to_list() == [1, 2, 3, 4, 5]
        np.testing.assert_allclose(mine["score"].to_numpy(), single["score"].to_numpy(), rtol=1e-6)


def test_similar_to_finds_a_planted_near_copy(trained, tmp_path, capsys):
    _, run_dir = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    state, path = checkpoint.load_best(copy)
    ((part_path, _),) = checkpoint.part_paths(path, state)  # one process: one part, rows in global id order
    part = checkpoint.read_part(part_path)
    w = part.tables["items"].weight
    assert torch.equal(part.tables["items"].ids, torch.arange(len(w)))
    dim = state["model_shape"]["dim"]
    src, twin = 10, 150  # make movie row 150 a near-copy (scaled, slightly perturbed) of movie row 10
    w[twin, :dim] = 2.0 * w[src, :dim] + 1e-4 * torch.randn(dim)
    digest = checkpoint.write_part(copy, 10**6, 0, 1, part)
    checkpoint.save_checkpoint(copy, state, step=10**6, is_best=True, n_parts=1, parts_sha256=[digest])

    run = load_run(copy)
    table = similar_movies(run, src, 5)
    assert table["movie_id"][0] == run.movies["movie_id"][twin]
    assert table["cosine"][0] > 0.999 and run.movies["movie_id"][src] not in table["movie_id"].to_list()
    assert np.all(np.diff(table["cosine"].to_numpy()) <= 0)

    assert main(["--run", str(copy), "--similar-to", str(run.movies["movie_id"][src]), "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and f"[{run.movies['movie_id'][twin]}]" in lines[1]


def test_title_lookup_and_ambiguity(trained, capsys):
    _, run_dir = trained
    run = load_run(run_dir)
    titles = [t.lower() for t in run.movies["title"].to_list()]
    # a fragment of a title (its name without the year) that no other title contains
    row, frag = next((r, t[1:-8]) for r, t in enumerate(titles) if sum(t[1:-8] in o for o in titles) == 1)
    assert find_movie(run, frag.upper()) == row  # case-insensitive substring
    assert find_movie(run, f"  {titles[row]} ") == row
    assert find_movie(run, str(run.movies["movie_id"][row])) == row

    with pytest.raises(DataError, match="ambiguous") as exc:
        find_movie(run, "the")
    assert 1 <= str(exc.value).count("[id ") <= 5
    with pytest.raises(SystemExit) as se:
        main(["--run", str(run_dir), "--similar-to", "the"])
    assert se.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "ambiguous movie 'the'" in err and err.count("[id ") == 5
    with pytest.raises(DataError, match="unknown movie"):
        find_movie(run, "no such film zzz")


@pytest.mark.parametrize("args, message", [
    (["--user", "987654"], "unknown user id 987654"),
    (["--similar-to", "zzz-not-a-title"], "unknown movie"),
    (["--user", "1", "--data", "{tmp}/no-data"], "data directory not found"),
    (["--all-users"], "--all-users needs --out FILE.parquet"),
    (["--user", "1", "--out", "{tmp}/x.csv"], "--out goes with --all-users (Parquet) or --predict (CSV)"),
    (["--user", "1", "--predict", "{tmp}/p.csv"], "--predict PAIRS.csv goes with --ratings FILE"),
])
def test_cli_errors_are_one_line(trained, tmp_path, capsys, args, message):
    _, run_dir = trained
    with pytest.raises(SystemExit) as se:
        main(["--run", str(run_dir)] + [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert se.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("mfscale.recommend: error:") and message in err


def test_missing_run_and_run_without_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as se:
        main(["--run", str(tmp_path / "nope"), "--user", "1"])
    assert se.value.code == 2 and "run directory not found" in capsys.readouterr().err
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit) as se:
        main(["--run", str(tmp_path / "empty"), "--user", "1"])
    assert se.value.code == 2 and "no model in run directory" in capsys.readouterr().err


COLD_MOVIE = 9999  # rated only in the test file


@pytest.fixture(scope="module")
def cold_movie_run(tmp_path_factory) -> Path:
    """A run whose dataset has a movie seen only in test: its factors are the random initialization."""
    from .conftest import write_lowrank_csv

    base = tmp_path_factory.mktemp("cold")
    train_csv = write_lowrank_csv(base / "base.csv", n_users=40, n_items=30, per_user=10, seed=5)
    (base / "test.csv").write_text("userId,movieId,rating,timestamp\n"
                                   + "".join(f"{u},{COLD_MOVIE},4.0,2000000{u}\n" for u in (1, 2, 3)))
    data, run_dir = base / "data", base / "run"
    assert prepare.main(["--input", str(train_csv), "--test-input", str(base / "test.csv"), "--out", str(data),
                         "--quiet"]) == 0
    cfg = config.JobConfig()
    cfg.data.path, cfg.run_dir, cfg.data.workers = str(data), str(run_dir), 0
    train.run(config.replace(cfg, train__epochs=2, model__dim=4, train__batch_size=64, train__ranking_k=0,
                             train__device="cpu").validate())
    return run_dir


def test_movie_without_training_ratings_is_never_recommended(cold_movie_run, tmp_path, capsys):
    run = load_run(cold_movie_run)
    movies = run.movies
    assert movies.filter(pl.col("movie_id") == COLD_MOVIE)["n_train"].to_list() == [0]
    n_items = movies.height
    rec = Recommender(run)
    for uid in run.users["user_id"].to_list():
        table = rec.for_user(uid, n_items)  # every movie the user has not rated in training
        assert table.height > n_items // 2 and COLD_MOVIE not in table["movie_id"].to_list()
    out = tmp_path / "all.parquet"
    assert main(["--run", str(cold_movie_run), "--all-users", "--out", str(out), "-k", str(n_items)]) == 0
    df = pl.read_parquet(out)
    assert df.height > run.users.height * n_items // 2 and COLD_MOVIE not in df["movie_id"].to_list()
    some_trained = int(movies.filter(pl.col("n_train") > 0)["movie_id"][0])
    similar = similar_movies(run, find_movie(run, str(some_trained)), n_items)
    assert similar.height == n_items - 2 and COLD_MOVIE not in similar["movie_id"].to_list()

    capsys.readouterr()
    with pytest.raises(SystemExit) as se:
        main(["--run", str(cold_movie_run), "--similar-to", str(COLD_MOVIE)])
    assert se.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("mfscale.recommend: error:")
    assert f"movie {COLD_MOVIE} has no training ratings" in err

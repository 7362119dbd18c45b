"""mfscale.analyze clusters: planted genres recovered, purity, clusters.parquet and the projector column.

The recovery test does not train (too slow on a shared CPU for the suite): it builds a run whose
checkpoint holds the synthetic generator's true factors and biases for the `small` preset (1,000 movies,
12 planted genres), i.e. what a perfectly trained model would have learned, and checks that KMeans on
those item vectors recovers the planted primary genre (adjusted Rand index well above chance, 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from mfscale import checkpoint, synthetic
from mfscale.analyze import cluster_movies, main, split_genres
from mfscale.runs import load_run

from .test_recommend import prepare_synthetic, tiny_run


def truth_run(root: Path, preset: str = "small", seed: int = 0) -> tuple[Path, np.ndarray]:
    """A run dir whose model is the generator's truth; returns it and the planted genre per item row."""
    data = prepare_synthetic(root / "data", preset, seed)
    spec = synthetic.resolve_spec(preset)
    gen = synthetic.generate(spec, seed, return_truth=True)
    truth = gen.truth
    users = pl.read_parquet(data / "users.parquet").sort("user_idx")
    movies = pl.read_parquet(data / "movies.parquet").sort("item_idx")
    row_of_movie = {m: r for r, m in enumerate(gen.movies["movie_id"].to_list())}
    item_rows = np.array([row_of_movie[m] for m in movies["movie_id"].to_list()])
    user_rows = users["user_id"].to_numpy() - 1  # truth row u is user_id u + 1
    uw = np.hstack([truth["user_factors"][user_rows], truth["user_bias"][user_rows, None]])
    iw = np.hstack([truth["item_factors"][item_rows], truth["item_bias"][item_rows, None]])
    state = {
        "model": {"users.weight": torch.tensor(uw, dtype=torch.float32),
                  "items.weight": torch.tensor(iw, dtype=torch.float32),
                  "global_bias": torch.tensor(spec.global_mean, dtype=torch.float32)},
        "model_shape": {"n_users": len(users), "n_items": len(movies), "dim": spec.rank},
        "config": {"data": {"path": str(data)}},
        "global_step": 0,
    }
    run_dir = root / "run"
    checkpoint.save_checkpoint(run_dir, state, step=0, is_best=True)
    return run_dir, truth["item_genre"][item_rows]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, np.ndarray]:
    return truth_run(tmp_path_factory.mktemp("truth"))


def test_clusters_recover_planted_genres(planted):
    run_dir, genre = planted
    run = load_run(run_dir)
    result = cluster_movies(run, 12, seed=0, min_ratings=5)
    rows = result.movies["item_idx"].to_numpy()
    assert len(rows) > 900  # almost every movie of `small` has >= 5 training ratings
    ari = adjusted_rand_score(genre[rows], result.movies["cluster"].to_numpy())
    assert ari > 0.6, ari  # chance is 0
    # purity: each cluster's top genre is shared by most of its movies (labels include second genres)
    assert 0.6 < result.purity <= 1.0
    for c in result.clusters:
        members = result.movies.filter(pl.col("cluster") == c.label)
        share = np.mean([c.top_genre in split_genres(g) for g in members["genres"].to_list()])
        assert c.purity == pytest.approx(share) and c.size == members.height
        assert c.genre_shares[0] == (c.top_genre, pytest.approx(c.purity))


def test_cli_prints_purity_writes_parquet_and_projector(planted, capsys):
    run_dir, _ = planted
    assert main(["clusters", "--run", str(run_dir), "-k", "12", "--seed", "1", "--titles", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("purity") == 13 and "overall genre purity" in out
    df = pl.read_parquet(run_dir / "clusters.parquet")
    assert {"movie_id", "title", "year", "genres", "n_train", "cluster"} <= set(df.columns)
    assert df["cluster"].n_unique() == 12 and df["n_train"].min() >= 5
    assert not list(run_dir.glob(".*tmp*"))
    meta = list((run_dir / "tb").rglob("clusters/metadata.tsv"))
    assert len(meta) == 1
    lines = meta[0].read_text().rstrip("\n").split("\n")
    header = lines[0].split("\t")
    assert header[:4] == ["title", "year", "genres", "cluster"] and len(lines) == df.height + 1
    col = header.index("cluster")
    assert sorted({int(line.split("\t")[col]) for line in lines[1:]}) == list(range(12))
    assert "clusters" in (run_dir / "tb" / "projector_config.pbtxt").read_text()


def test_learned_model_clusters_and_keeps_training_projector(tmp_path_factory):
    """On a (briefly) trained run: clusters written beside the training run's own projector entry."""
    _, run_dir = tiny_run(tmp_path_factory)
    assert main(["clusters", "--run", str(run_dir), "-k", "4", "--min-ratings", "10"]) == 0
    pbtxt = (run_dir / "tb" / "projector_config.pbtxt").read_text()
    assert "movies" in pbtxt and "clusters" in pbtxt
    assert pl.read_parquet(run_dir / "clusters.parquet")["n_train"].min() >= 10


@pytest.mark.parametrize("extra, message", [
    (["-k", "5000"], "fewer than -k 5000 clusters"),
    (["-k", "1"], "-k must be >= 2"),
])
def test_cli_errors(planted, capsys, extra, message):
    run_dir, _ = planted
    with pytest.raises(SystemExit) as se:
        main(["clusters", "--run", str(run_dir), *extra])
    err = capsys.readouterr().err.strip()
    assert se.value.code == 2 and "\n" not in err and message in err


def test_missing_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as se:
        main(["clusters", "--run", str(tmp_path / "nope")])
    assert se.value.code == 2 and "run directory not found" in capsys.readouterr().err

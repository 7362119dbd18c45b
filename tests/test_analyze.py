"""mfscale.analyze clusters: planted genres recovered, purity, clusters.parquet and the projector column.

Two recovery tests. ``test_trained_model_clusters_recover_planted_groups`` trains a model through the
real pipeline (synthetic.generate -> MovieLens CSV -> mfscale.prepare -> mfscale.train) on a custom spec
built to have clear group structure, then runs ``python -m mfscale.analyze clusters`` and checks the
clusters against the generator's planted groups (adjusted Rand index and genre purity, each far above a
shuffled-label baseline). ``test_clusters_recover_planted_genres`` checks the clustering itself on the
`small` preset with the generator's true factors, i.e. what a perfectly trained model would have learned.

Why not train on `small` itself: it is MovieLens-shaped (rank 16, noise 0.75, long tail: half its movies
have fewer than 30 training ratings), so even item factors fitted by ridge regression with the *true* user
factors only reach an ARI of ~0.44 over movies with >= 5 ratings (~0.94 over those with >= 100), and a
model trained with the defaults ~0.16 (~0.2 with more regularization). The limit is the data, not the
clustering: L2-normalizing the vectors, PCA or weighting KMeans by rating count moves the ARI by < 0.05.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from mfscale import checkpoint, config, prepare, synthetic, train
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
        "model_shape": {"n_users": len(users), "n_items": len(movies), "dim": spec.rank},
        "config": {"data": {"path": str(data)}},
        "global_step": 0,
    }
    run_dir = root / "run"
    checkpoint.save_whole_model(run_dir, state, torch.tensor(uw, dtype=torch.float32),
                                torch.tensor(iw, dtype=torch.float32),
                                torch.tensor(spec.global_mean, dtype=torch.float32), step=0, is_best=True)
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


# Test data with clear group structure: few, well-separated planted groups (within-group share of the
# item-factor variance 0.15 instead of 0.3), a low true rank, and enough ratings on every movie (~250
# training ratings each, at least ~170) and user (~60) for their factors to be learned. Across generator
# seeds 0-5 the trained model reaches ARI 0.89-1.0 (seed 0: 0.895); perfect factors reach 0.98-1.0.
GROUPS_SPEC = synthetic.SyntheticSpec(n_users=600, n_items=150, n_ratings=45_000, rank=8, n_genres=4,
                                      genre_spread=0.15)
# Test-specific training settings (the library defaults are tuned for MovieLens-sized data): dim = true
# rank, so no spare dimensions fit noise; everything that matters is pinned so the test does not drift
# with the defaults.
GROUPS_TRAINING = dict(model__dim=8, optim__lr=0.01, train__epochs=12, train__batch_size=512, train__seed=0,
                       train__patience=3, train__device="cpu", train__ranking_k=0)


def trained_groups_run(root: Path, seed: int = 0) -> tuple[Path, dict[int, int]]:
    """Train on GROUPS_SPEC data via prepare + train; the run dir and the planted group of each movie id."""
    gen = synthetic.generate(GROUPS_SPEC, seed, return_truth=True)
    csv_dir = root / "csv"
    synthetic.write_ratings_csv(gen, csv_dir)
    data = root / "data"
    assert prepare.main(["--input", str(csv_dir), "--out", str(data), "--seed", str(seed), "--quiet"]) == 0
    cfg = config.JobConfig()
    cfg.data.path, cfg.run_dir, cfg.data.workers = str(data), str(root / "run"), 0
    # One intra-op thread: the batches are tiny, so extra threads only add sync overhead (5x slower on a
    # busy 2-core machine), and the result does not depend on the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.run(config.replace(cfg, **GROUPS_TRAINING).validate())
    finally:
        torch.set_num_threads(threads)
    group = dict(zip(gen.movies["movie_id"].to_list(), gen.truth["item_genre"].tolist(), strict=True))
    return root / "run", group


def purity(labels: np.ndarray, genre_lists: list[list[str]]) -> float:
    """Size-weighted share of each cluster's movies that carry the cluster's most common genre label."""
    hits = 0
    for c in np.unique(labels):
        members = [genre_lists[j] for j in np.flatnonzero(labels == c)]
        counts: dict[str, int] = {}
        for gs in members:
            for g in gs:
                counts[g] = counts.get(g, 0) + 1
        top = max(counts, key=counts.__getitem__)
        hits += sum(top in gs for gs in members)
    return hits / len(labels)


def test_trained_model_clusters_recover_planted_groups(tmp_path, capsys):
    run_dir, group = trained_groups_run(tmp_path)
    k = GROUPS_SPEC.n_genres
    assert main(["clusters", "--run", str(run_dir), "-k", str(k), "--no-projector"]) == 0
    out = capsys.readouterr().out
    printed_purity = float(out.split("overall genre purity (size-weighted): ")[1].split()[0])
    df = pl.read_parquet(run_dir / "clusters.parquet")
    assert df.height == GROUPS_SPEC.n_items  # every movie has far more than --min-ratings 5
    planted = np.array([group[m] for m in df["movie_id"].to_list()])
    labels = df["cluster"].to_numpy()
    genre_lists = [split_genres(g) for g in df["genres"].to_list()]
    ari = adjusted_rand_score(planted, labels)
    own_purity = purity(labels, genre_lists)
    assert printed_purity == pytest.approx(own_purity, abs=5e-4)

    # Baselines: the same cluster sizes with the movies shuffled between clusters.
    rng = np.random.default_rng(0)
    shuffled = [rng.permutation(labels) for _ in range(20)]
    base_ari = max(adjusted_rand_score(planted, s) for s in shuffled)
    base_purity = max(purity(s, genre_lists) for s in shuffled)
    assert ari >= 0.6 and ari > base_ari + 0.5, (ari, base_ari)  # measured ~0.9 vs ~0.03
    assert own_purity >= 0.8 and own_purity > base_purity + 0.3, (own_purity, base_purity)  # ~0.98 vs ~0.45


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

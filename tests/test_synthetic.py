"""mfscale.synthetic: exact counts, MovieLens shape, determinism, oracle RMSE, planted genres, CSV output."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest

from mfscale import synthetic
from mfscale.errors import ConfigError
from mfscale.synthetic import PRESETS, SyntheticSpec, generate, rating_moments, resolve_spec, write_ratings_csv

HALF_STARS = {v / 2 for v in range(1, 11)}


@pytest.fixture(scope="module")
def tiny():
    return generate(PRESETS["tiny"], seed=0, return_truth=True)


@pytest.fixture(scope="module")
def small():
    return generate(PRESETS["small"], seed=0, return_truth=True)


def check_exact(data: synthetic.SyntheticData, spec: SyntheticSpec) -> None:
    r, m = data.ratings, data.movies
    assert r.schema == pl.Schema({"user_id": pl.Int64, "movie_id": pl.Int64, "rating": pl.Float32,
                                  "timestamp": pl.Int64})
    assert dict(m.schema) == {"movie_id": pl.Int64, "title": pl.String, "genres": pl.String, "year": pl.Int32}
    assert r.height == spec.n_ratings
    assert r["user_id"].n_unique() == spec.n_users
    assert r["movie_id"].n_unique() == spec.n_items
    assert not r.select("user_id", "movie_id").is_duplicated().any()
    assert set(r["rating"].unique().to_list()) <= HALF_STARS
    assert r.null_count().sum_horizontal().item() == 0
    # Every rated movie is in the movies frame, and only those.
    assert m.height == spec.n_items and m["movie_id"].is_unique().all()
    assert set(m["movie_id"].to_list()) == set(r["movie_id"].unique().to_list())
    # Sorted like MovieLens' ratings.csv; user ids 1..n_users; movie ids sparse.
    key = r["user_id"].to_numpy() * (3 * spec.n_items + 1) + r["movie_id"].to_numpy()
    assert (np.diff(key) > 0).all()
    assert r["user_id"].min() == 1 and r["user_id"].max() == spec.n_users
    assert m["movie_id"].max() > spec.n_items
    json.dumps(data.params)  # JSON-serializable


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_presets_exact_counts_and_schema(name, tiny, small):
    data = {"tiny": tiny, "small": small}[name]
    check_exact(data, PRESETS[name])
    p = data.params
    assert p["n_ratings"] == PRESETS[name].n_ratings and p["seed"] == 0
    for key in ("best_rmse", "noise_rmse", "mean_rating"):
        assert isinstance(p[key], float)


@pytest.mark.parametrize("kw", [
    dict(n_users=50, n_items=40, n_ratings=2000),  # complete matrix: the exact fallback fills it
    dict(n_users=50, n_items=40, n_ratings=1900),
    dict(n_users=10, n_items=100, n_ratings=100),  # every item exactly once
    dict(n_users=100, n_items=10, n_ratings=100),  # every user exactly once
    dict(n_users=30, n_items=5, n_ratings=100, n_genres=12),  # more genres than items
    dict(n_users=1, n_items=1, n_ratings=1),
    dict(n_users=200, n_items=300, n_ratings=1000, n_genres=1, rank=1),
])
def test_edge_sizes_exact(kw):
    spec = resolve_spec(None, **kw)
    check_exact(generate(spec, seed=3), spec)


def test_reproducible_by_seed(tiny):
    again = generate(PRESETS["tiny"], seed=0)
    assert again.ratings.equals(tiny.ratings)
    assert again.movies.equals(tiny.movies)
    assert again.params == tiny.params
    other = generate(PRESETS["tiny"], seed=1)
    assert not other.ratings.equals(tiny.ratings)
    assert not other.ratings["rating"].equals(tiny.ratings["rating"])
    assert other.params["seed"] == 1


def test_resolve_spec_overrides_and_errors():
    spec = resolve_spec("ml-32m")
    assert (spec.n_users, spec.n_items, spec.n_ratings) == (200_948, 87_585, 32_000_204)
    assert resolve_spec("ML-1M").n_ratings == 1_000_209
    spec = resolve_spec("tiny", n_users=500, n_ratings=20_000, noise=0.5, rank=8)
    assert (spec.n_users, spec.n_items, spec.n_ratings, spec.noise, spec.rank) == (500, 200, 20_000, 0.5, 8)
    assert resolve_spec(None, n_users=10, n_items=20, n_ratings=50) == SyntheticSpec(10, 20, 50)
    for name, want in (("ml-25m", (162_541, 59_047, 25_000_095)), ("ml-10m", (69_878, 10_677, 10_000_054)),
                       ("ml-100k", (943, 1_682, 100_000)), ("small", (2_000, 1_000, 100_000)),
                       ("tiny", (300, 200, 12_000))):
        s = PRESETS[name]
        assert (s.n_users, s.n_items, s.n_ratings) == want
    bad = [
        dict(preset="nope"),
        dict(preset=None, n_users=10, n_items=10),  # missing count without a preset
        dict(preset="tiny", n_ratings=300 * 200 + 1),  # more than users x items
        dict(preset="tiny", n_ratings=250),  # cannot cover 300 users
        dict(preset="tiny", n_items=0),
        dict(preset="tiny", n_users=-5),
        dict(preset="tiny", noise=0.0),
        dict(preset="tiny", rank=0),
        dict(preset="tiny", second_genre_frac=1.5),
        dict(preset="tiny", start_year=2020, end_year=2000),
        dict(preset="tiny", bogus=1),
    ]
    for kw in bad:
        with pytest.raises(ConfigError):
            resolve_spec(**kw)
    with pytest.raises(ConfigError):
        generate(SyntheticSpec(10, 10, 5))


def test_long_tail(small):
    r = small.ratings
    per_item = np.sort(r.group_by("movie_id").len()["len"].to_numpy())[::-1]
    n_items = PRESETS["small"].n_items
    assert per_item[: n_items // 100].sum() / r.height > 0.08  # top 1% of items: 8x their uniform share
    assert per_item[: n_items // 10].sum() / r.height > 0.4
    assert (per_item <= 10).sum() > 0.02 * n_items  # rarely rated items
    per_user = r.group_by("user_id").len()["len"].to_numpy()
    assert per_user.min() >= PRESETS["small"].min_user_ratings
    assert per_user.max() > 8 * np.median(per_user)  # a few very active users
    p = small.params
    assert p["item_ratings"]["max"] == per_item[0] and p["user_ratings"]["min"] == per_user.min()


def test_min_user_ratings_lowered_for_sparse_specs():
    data = generate(resolve_spec(None, n_users=100, n_items=500, n_ratings=1000), seed=0)
    assert data.params["min_user_ratings_effective"] == 5  # 1000 // (2 * 100)
    assert data.ratings.group_by("user_id").len()["len"].min() >= 5


def test_rating_moments_exact():
    noise = 0.75
    mus = np.array([-4.0, 0.4, 1.1, 2.5, 3.55, 3.76, 4.9, 5.3, 9.5])
    mean, var = rating_moments(mus, noise)
    for mu, m, v in zip(mus, mean, var, strict=True):
        phi = [0.5 * math.erfc(-(e - mu) / (noise * math.sqrt(2))) for e in synthetic._EDGES]
        cdf = [0.0, *phi, 1.0]
        pmf = np.diff(cdf)
        vals = synthetic.RATING_VALUES
        assert m == pytest.approx(float(pmf @ vals), abs=1e-12)
        assert v == pytest.approx(float(pmf @ vals**2 - (pmf @ vals) ** 2), abs=1e-12)
    # Far outside the scale the rating is certain.
    assert mean[0] == pytest.approx(0.5) and mean[-1] == pytest.approx(5.0) and var[-1] < 1e-9
    # Monte Carlo agrees.
    rng = np.random.default_rng(0)
    draws = synthetic._round_half_clip(3.3 + noise * rng.standard_normal(400_000))
    m1, v1 = rating_moments(np.array([3.3]), noise)
    assert draws.mean() == pytest.approx(m1[0], abs=5e-3) and draws.var() == pytest.approx(v1[0], rel=1e-2)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_best_rmse_and_oracles(name, tiny, small):
    data = {"tiny": tiny, "small": small}[name]
    spec, p = PRESETS[name], data.params
    rating = data.ratings["rating"].to_numpy().astype(np.float64)
    mu = data.truth["mu"].astype(np.float64)
    assert len(mu) == len(rating)
    assert p["best_rmse"] < p["noise_rmse"] and p["best_rmse"] < spec.noise
    # mu itself as the prediction: exactly noise_rmse.
    assert math.sqrt(np.mean((rating - mu) ** 2)) == pytest.approx(p["noise_rmse"], rel=1e-6)
    assert p["noise_rmse"] == pytest.approx(spec.noise, rel=0.1)
    # The Bayes-optimal prediction E[rating | mu] scores close to best_rmse on the sample.
    mean, _ = rating_moments(mu, spec.noise)
    oracle = math.sqrt(np.mean((rating - mean) ** 2))
    assert oracle == pytest.approx(p["oracle_rmse_empirical"], rel=1e-9)
    assert oracle == pytest.approx(p["best_rmse"], rel=0.03)
    # Predicting the global mean is far worse.
    constant = float(rating.std())
    assert constant == pytest.approx(p["constant_rmse"], rel=1e-6)
    assert constant > 1.25 * p["best_rmse"]
    assert p["mean_rating"] == pytest.approx(rating.mean())
    assert 3.3 < p["mean_rating"] < 3.9
    # mu is rebuilt from the published truth.
    t = data.truth
    u = data.ratings["user_id"].to_numpy() - 1
    i = np.searchsorted(data.movies["movie_id"].to_numpy(), data.ratings["movie_id"].to_numpy())
    rebuilt = (spec.global_mean + t["user_bias"][u] + t["item_bias"][i]
               + np.einsum("ij,ij->i", t["user_factors"][u], t["item_factors"][i]))
    assert np.allclose(rebuilt, mu, atol=1e-4)
    assert 0.45 < np.std(np.einsum("ij,ij->i", t["user_factors"][u], t["item_factors"][i])) < 0.75


def test_planted_genres(small):
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    t, movies = small.truth, small.movies
    genre = t["item_genre"]
    names = t["genre_names"]
    primary = movies["genres"].str.split("|").list.first().to_list()
    assert primary == [names[g] for g in genre]
    assert set(primary) <= set(synthetic.GENRE_NAMES) and len(set(primary)) == PRESETS["small"].n_genres
    n_two = movies["genres"].str.contains("|", literal=True).sum()
    assert 0.15 * movies.height < n_two < 0.45 * movies.height
    labels = KMeans(n_clusters=len(names), n_init=4, random_state=0).fit_predict(t["item_factors"])
    assert adjusted_rand_score(genre, labels) > 0.9


def test_timestamps_and_titles(small):
    r, movies = small.ratings, small.movies
    ts = r["timestamp"].to_numpy()
    assert ts.min() >= 820_454_400 and ts.max() < 1_704_067_200  # 1996-01-01 .. 2024-01-01
    span = r.group_by("user_id").agg(s=pl.col("timestamp").max() - pl.col("timestamp").min())["s"].to_numpy()
    assert np.median(span) < 90 * 86400  # users are active over windows, not the whole range
    assert (ts.max() - ts.min()) > 20 * 365 * 86400
    assert movies["title"].str.contains(r" \(\d{4}\)$").all()
    assert movies["title"].str.contains(",", literal=True).any()
    first_year = (r.group_by("movie_id").agg(t=pl.col("timestamp").min())
                  .with_columns(fy=pl.from_epoch("t", time_unit="s").dt.year()))
    joined = movies.join(first_year, on="movie_id")
    assert (joined["year"] <= joined["fy"]).all()


def test_write_ratings_csv_round_trip(tmp_path, tiny):
    path = write_ratings_csv(tiny, tmp_path / "out")
    assert path == tmp_path / "out" / "ratings.csv"
    assert path.read_text().splitlines()[0] == "userId,movieId,rating,timestamp"
    back = pl.read_csv(path)
    assert back.columns == ["userId", "movieId", "rating", "timestamp"]
    r = tiny.ratings
    assert back["userId"].to_list() == r["user_id"].to_list()
    assert back["movieId"].to_list() == r["movie_id"].to_list()
    assert back["timestamp"].to_list() == r["timestamp"].to_list()
    assert np.array_equal(back["rating"].to_numpy(), r["rating"].to_numpy().astype(np.float64))
    movies_text = (tmp_path / "out" / "movies.csv").read_text().splitlines()
    assert movies_text[0] == "movieId,title,genres"
    assert any(line.count('"') == 2 and ", The (" in line for line in movies_text)  # quoted like MovieLens
    movies = pl.read_csv(tmp_path / "out" / "movies.csv")
    assert movies["movieId"].to_list() == tiny.movies["movie_id"].to_list()
    assert movies["title"].to_list() == tiny.movies["title"].to_list()
    assert movies["genres"].to_list() == tiny.movies["genres"].to_list()


def test_readable_by_formats(tmp_path, tiny):
    from mfscale import formats

    write_ratings_csv(tiny, tmp_path)
    ratings = formats.read_ratings(tmp_path / "ratings.csv")
    assert ratings.height == tiny.ratings.height
    movies = formats.read_movies(tmp_path / "movies.csv")
    assert movies["year"].to_list() == tiny.movies["year"].to_list()

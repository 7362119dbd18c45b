"""Shared fixtures: small prepared datasets with known low-rank structure, built by mfscale.prepare."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from mfscale import prepare


def write_lowrank_csv(path: Path, n_users: int = 300, n_items: int = 200, per_user: int = 40, rank: int = 3,
                      noise: float = 0.3, seed: int = 0) -> Path:
    """MovieLens-format ratings.csv from mean + biases + <p, q> + noise, rounded to half stars."""
    rng = np.random.default_rng(seed)
    p = rng.normal(0, 0.6, (n_users, rank))
    q = rng.normal(0, 0.6, (n_items, rank))
    bu, bi = rng.normal(0, 0.3, n_users), rng.normal(0, 0.4, n_items)
    lines = ["userId,movieId,rating,timestamp"]
    for u in range(n_users):
        items = rng.choice(n_items, per_user, replace=False)
        score = 3.5 + bu[u] + bi[items] + q[items] @ p[u] + rng.normal(0, noise, per_user)
        score = np.clip(np.round(score * 2) / 2, 0.5, 5.0)
        for i, s in zip(items, score, strict=True):
            lines.append(f"{u + 1},{int(i) * 2 + 1},{s:.1f},{1_000_000 + u * 100 + int(i)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def make_dataset(root: Path, **kw) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    csv = write_lowrank_csv(root / "ratings.csv", **kw)
    out = root / "data"
    assert prepare.main(["--input", str(csv), "--out", str(out), "--quiet", "--val-frac", "0.1",
                         "--test-frac", "0.1"]) == 0
    return out


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """12,000 ratings, 300 users, 200 movies, rank-3 structure."""
    return make_dataset(tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="session")
def odd_data(tmp_path_factory) -> Path:
    """An odd number of ratings in every split (2,521 train, 315 val, 315 test; 137 users, 90 movies): two
    ranks get unequal shares, and at batch 90 the epoch's last global step holds 1 rating, so rank 1's last
    batch is empty."""
    return make_dataset(tmp_path_factory.mktemp("odd"), n_users=137, n_items=90, per_user=23, seed=3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

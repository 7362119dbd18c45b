"""Ranking metrics against a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import torch

from mfscale.distributed import DistEnv
from mfscale.evaluate import evaluate, ranking_metrics
from mfscale.layout import Replicated, TableLayout
from mfscale.model import BiasedMF
from mfscale.shards import Dataset

CPU = torch.device("cpu")


def layout_of(model: BiasedMF, data: Dataset, env: DistEnv) -> TableLayout:
    """A one-process replicated layout holding ``model``'s weights (what evaluation reads)."""
    lay = Replicated(env, data, dim=model.dim, init_std=0.0, seed=0, mean=0.0, optimizer="lazy_adam", lr=0.01,
                     compile=False, batch_size=1024, resident=False, workers=0)
    lay.model.load_state_dict(model.state_dict())
    return lay


def reference(model: BiasedMF, data: Dataset, k: int) -> dict[str, float]:
    train, test = data.read_split("train"), data.read_split("test")
    p, _, q, bi = (t.detach().numpy() for t in model.factors())
    seen: dict[int, set] = {}
    for u, i in zip(train["user"], train["item"], strict=True):
        seen.setdefault(int(u), set()).add(int(i))
    rel: dict[int, set] = {}
    for u, i, r in zip(test["user"], test["item"], test["rating"], strict=True):
        if r >= 4:
            rel.setdefault(int(u), set()).add(int(i))
    recall = ndcg = ap = 0.0
    for u, items in rel.items():
        scores = p[u] @ q.T + bi
        ranked = [i for i in np.argsort(-scores, kind="stable") if i not in seen.get(u, set())][:k]
        hits = [1.0 if i in items else 0.0 for i in ranked]
        recall += sum(hits) / len(items)
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        ndcg += dcg / sum(1 / math.log2(r + 2) for r in range(min(k, len(items))))
        ap += sum(h * sum(hits[: r + 1]) / (r + 1) for r, h in enumerate(hits)) / min(k, len(items))
    n = len(rel)
    return {f"recall@{k}": recall / n, f"ndcg@{k}": ndcg / n, f"map@{k}": ap / n, "ranking_users": n}


def test_ranking_metrics_match_brute_force(small_data):
    data = Dataset(small_data)
    torch.manual_seed(0)
    model = BiasedMF(data.n_users, data.n_items, 8, init_std=0.5)
    with torch.no_grad():
        model.items.weight[:, 8] = torch.randn(data.n_items)
    env = DistEnv(0, 1, 0, CPU)
    for k in (5, 10):
        # A small score budget forces several user batches.
        got = ranking_metrics(layout_of(model, data, env), "test", k=k, score_budget=data.n_items * 7)
        want = reference(model, data, k)
        assert got["ranking_users"] == want["ranking_users"]
        for key in (f"recall@{k}", f"ndcg@{k}", f"map@{k}"):
            assert math.isclose(got[key], want[key], rel_tol=1e-9, abs_tol=1e-12), key


def test_rmse_is_global_and_clipped(small_data):
    data = Dataset(small_data)
    model = BiasedMF(data.n_users, data.n_items, 4, mean=100.0)  # every prediction clips to 5.0
    got = evaluate(layout_of(model, data, DistEnv(0, 1, 0, CPU)), "test", batch_size=333)
    r = data.read_split("test")["rating"].astype(np.float64)
    assert got["count"] == len(r)
    assert math.isclose(got["rmse"], float(np.sqrt(np.mean((5.0 - r) ** 2))), rel_tol=1e-9)
    assert math.isclose(got["mae"], float(np.mean(5.0 - r)), rel_tol=1e-9)

"""Held-out RMSE and MAE with global sums (all-reduced), never a mean of per-rank means; top-K ranking metrics.

Both work from any table layout (``mfscale.layout``): each rank evaluates the ratings of the users it owns
(``TableLayout.eval_share``) against ``TableLayout.eval_tables()``, and the sums are all-reduced. With
``--model.max_norm`` the factor vectors are capped as ``nn.Embedding(max_norm=...)``'s lookup caps them (without
changing the tables); without biases the bias columns and the global bias are 0, so the scores are <p_u, q_i>.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from .distributed import all_reduce_sum
from .model import capped, predict_rows

if TYPE_CHECKING:
    from .layout import TableLayout

# (rows of the users a rank evaluates, the whole movie table, global bias): TableLayout.eval_tables()
Tables = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@torch.no_grad()
def evaluate(layout: TableLayout, split: str, *, batch_size: int, tables: Tables | None = None
             ) -> dict[str, float] | None:
    """RMSE/MAE of predictions clipped to the rating scale over all of ``split`` (each rank its users).

    ``tables``: ``layout.eval_tables()`` when the caller has them already (under blocks a collective).

    Returns None when the split is empty.
    """
    data, env = layout.data, layout.env
    if data.split_rows(split) == 0:
        return None
    lo, hi = data.rating_range
    share = layout.eval_share(split)
    users, items, global_bias = tables or layout.eval_tables()
    time = layout.time_bias
    if time is not None:  # --model.time_bins / user_drift: (alpha_u, t_u) by user row, every movie's bin biases
        alpha, _, time_bins = layout.eval_time()
    dev = users.device
    sums = torch.zeros(3, dtype=torch.float64, device=dev)  # squared error, absolute error, count
    for start in range(0, len(share.user), batch_size):
        user = torch.from_numpy(share.user[start : start + batch_size]).to(dev)
        item = torch.from_numpy(share.item[start : start + batch_size]).to(dev)
        rating = torch.from_numpy(share.rating[start : start + batch_size]).to(dev)
        pred = predict_rows(users, items, global_bias, user, item, layout.cfg.model.max_norm)
        if share.day_row is not None:  # --model.day_bias: b_{u,day} (0 for a day without training ratings)
            pred = pred + layout.day_bias.offset(torch.from_numpy(share.day_row[start : start + batch_size]).to(dev))
        if time is not None:  # b_{i,bin(t)} + alpha_u dev_u(t)
            sl = slice(start, start + batch_size)
            if time.n_bins:
                k = torch.from_numpy(share.time["time_bin"][sl]).to(dev).long()
                pred = pred + time_bins.reshape(-1)[item * time.n_bins + k]
            if time.drift:
                pred = pred + alpha[user] * torch.from_numpy(share.time["time_dev"][sl]).to(dev, alpha.dtype)
        err = (pred.float().clamp(lo, hi) - rating).double()
        sums[0] += err.square().sum()
        sums[1] += err.abs().sum()
    sums[2] = float(len(share.user))
    sse, sae, n = all_reduce_sum(env, sums).tolist()
    return {"rmse": math.sqrt(sse / n), "mae": sae / n, "count": int(n)}


def _csr(user: np.ndarray, item: np.ndarray, n_users: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row pointers and items of (user, item) pairs grouped by user."""
    order = np.argsort(user, kind="stable")
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(user, minlength=n_users), out=indptr[1:])
    return torch.from_numpy(indptr).to(device), torch.from_numpy(item[order].astype(np.int64)).to(device)


def _rows_of(indptr: torch.Tensor, items: torch.Tensor, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row in batch, item) for every pair of the given users, without a Python loop over users."""
    starts, ends = indptr[users], indptr[users + 1]
    counts = ends - starts
    row = torch.repeat_interleave(torch.arange(len(users), device=users.device), counts)
    offset = torch.arange(int(counts.sum()), device=users.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts)
    return row, items[torch.repeat_interleave(starts, counts) + offset]


@torch.no_grad()
def ranking_metrics(layout: TableLayout, split: str, *, k: int = 10, relevant_min: float = 4.0,
                    score_budget: int = 1 << 25, tables: Tables | None = None) -> dict[str, float] | None:
    """Recall@K, NDCG@K and MAP@K of top-K lists over all movies, on ``split`` ratings >= ``relevant_min``.

    Movies the user rated in training are excluded from the lists. Each rank scores the users it owns in
    batches of ``score_budget / n_items`` on the model's device; the sums are all-reduced, so the result is the
    mean over all users with at least one relevant held-out movie.
    Recall@K = hits / |relevant|; NDCG@K with binary gains; MAP@K divides by min(K, |relevant|).
    """
    env = layout.env
    held = layout.eval_share(split)
    keep = held.rating >= relevant_min
    user_tab, item_tab, _ = tables or layout.eval_tables()
    n_users, n_items = user_tab.shape[0], item_tab.shape[0]
    dev = user_tab.device
    train = layout.eval_share("train")
    seen_ptr, seen_items = _csr(train.user, train.item, n_users, dev)
    rel_ptr, rel_items = _csr(held.user[keep], held.item[keep], n_users, dev)
    n_rel = rel_ptr[1:] - rel_ptr[:-1]
    users_all = torch.nonzero(n_rel > 0).flatten()
    k = min(k, n_items)
    discounts = 1.0 / torch.log2(torch.arange(2, k + 2, device=dev, dtype=torch.float64))
    sums = torch.zeros(4, dtype=torch.float64, device=dev)  # recall, ndcg, map, users
    batch = max(1, score_budget // n_items)
    # One score buffer for all batches: a fresh (batch, n_items) block per batch (128 MiB by default) would
    # be mapped and faulted in anew each time on CPU (ML-32M: ~400 batches, over a minute of system time).
    buf = torch.empty(min(batch, max(len(users_all), 1)), n_items, device=dev)
    max_norm = layout.cfg.model.max_norm
    items_t = capped(item_tab, max_norm).float().T  # rows [q_i, b_i] as columns
    for start in range(0, len(users_all), batch):
        users = users_all[start : start + batch]
        # The user bias and global mean do not change a user's ranking; the item bias does: with the user's
        # bias column set to 1, [p_u, 1] . [q_i, b_i] = p_u . q_i + b_i in one matrix product.
        u = capped(user_tab[users], max_norm).float()
        u[:, -1] = 1.0  # an item's bias column is 0 without biases: the scores are then p_u . q_i
        scores = torch.mm(u, items_t, out=buf[: len(users)])
        row, col = _rows_of(seen_ptr, seen_items, users)
        scores[row, col] = -math.inf
        top = torch.topk(scores, k, dim=1).indices
        # A top-K entry is a hit if (row, movie) is one of the batch's relevant held-out pairs: looked up
        # among those pairs, not in a (batch, n_items) mask.
        row, col = _rows_of(rel_ptr, rel_items, users)
        top_keys = torch.arange(len(users), device=dev)[:, None] * n_items + top
        hits = torch.isin(top_keys, row * n_items + col).double()
        n = n_rel[users].double()
        cut = torch.clamp(n, max=k)
        ideal = torch.cumsum(discounts, 0)[cut.long() - 1]
        precision_at = torch.cumsum(hits, 1) / torch.arange(1, k + 1, device=dev, dtype=torch.float64)
        sums += torch.stack([
            (hits.sum(1) / n).sum(),
            ((hits * discounts).sum(1) / ideal).sum(),
            ((precision_at * hits).sum(1) / cut).sum(),
            torch.tensor(float(len(users)), dtype=torch.float64, device=dev),
        ])
    # every rank joins the all_reduce, also one without relevant users
    recall, ndcg, map_k, count = all_reduce_sum(env, sums).tolist()
    if count == 0:
        return None
    return {f"recall@{k}": recall / count, f"ndcg@{k}": ndcg / count, f"map@{k}": map_k / count,
            "ranking_users": int(count)}

"""Held-out RMSE and MAE with global sums (all-reduced), never a mean of per-rank means."""

from __future__ import annotations

import math

import torch

from .distributed import DistEnv, all_reduce_sum
from .model import BiasedMF
from .shards import Dataset
from .stream import RatingStream


@torch.no_grad()
def evaluate(model: BiasedMF, data: Dataset, split: str, env: DistEnv, *, batch_size: int) -> dict[str, float] | None:
    """RMSE/MAE of predictions clipped to the rating scale over all of ``split`` (each rank its share).

    Returns None when the split is empty.
    """
    if data.split_rows(split) == 0:
        return None
    lo, hi = data.rating_range
    stream = RatingStream(data, split, batch_size=batch_size, rank=env.rank, world_size=env.world_size,
                          shuffle=False)
    stream.set_epoch(0)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # squared error, absolute error, count
    for batch in stream:
        user = batch["user"].to(env.device, non_blocking=True)
        item = batch["item"].to(env.device, non_blocking=True)
        rating = batch["rating"].to(env.device, non_blocking=True)
        err = (model.predict(user, item).float().clamp(lo, hi) - rating).double()
        sums += torch.stack([err.square().sum(), err.abs().sum(), torch.tensor(float(err.numel()),
                                                                               dtype=torch.float64,
                                                                               device=env.device)])
    model.train(was_training)
    sse, sae, n = all_reduce_sum(env, sums).tolist()
    return {"rmse": math.sqrt(sse / n), "mae": sae / n, "count": int(n)}

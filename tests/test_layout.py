"""Table layouts: W ranks equal one process on the union of their batches (tables, Adam moments, global bias),
exactly-once coverage, stratum balance, checkpoints across layouts and world sizes, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from time import monotonic

import numpy as np
import pytest
import torch

from mfscale import checkpoint, config, distributed
from mfscale.daybias import day_key
from mfscale.distributed import DistEnv
from mfscale.errors import ConfigError
from mfscale.layout import Blocks, deal_rows, init_rows, stratum_balance
from mfscale.layout.rows import deal_pieces, movie_block
from mfscale.shards import Dataset
from mfscale.train import Trainer, run

from .conftest import RESTART_ARGS, as_rank, free_port, make_dataset, spawn_ranks
from .test_train import job

CPU = torch.device("cpu")


def trainer_tensors(tr: Trainer) -> dict[str, np.ndarray]:
    """This rank's rows by global id (weights and the optimizer's state: Adam's moments or RowRMSprop's
    ``row_sq``), its user-day biases by key with their state, plus the global bias and its Adam moments."""
    part = tr.layout.held_rows()
    out: dict[str, np.ndarray] = {}
    for name in ("users", "items"):
        t = part.tables[name]
        out[f"{name}.ids"] = t.ids.numpy()
        for key, value in {"weight": t.weight, **t.state}.items():
            out[f"{name}.{key}"] = value.numpy()
    if part.days is not None:  # the user-day biases of this rank's users, by key
        out["days.ids"] = part.days.ids.numpy()
        out["days.weight"] = part.days.weight.numpy()[:, 0]
        out["days.sq"] = part.days.state["sq"].numpy()[:, 0]
    if part.time is not None:  # the time-aware biases beside this rank's rows: bins by movie, drift by user
        for name in ("users", "items"):
            t = part.time[name]
            out[f"time.{name}.ids"] = t.ids.numpy()
            out[f"time.{name}.weight"] = t.weight.numpy()
            out[f"time.{name}.sq"] = t.state["sq"].numpy()
    if part.implicit is not None:  # y (and 1 / D) beside this rank's movies, z and z' beside its users
        for name in ("users", "items"):
            out[f"implicit.{name}.ids"] = part.implicit[name].ids.numpy()
            out[f"implicit.{name}.weight"] = part.implicit[name].weight.numpy()
    out["global_bias"] = tr.model.global_bias.detach().numpy().copy()
    dense = tr.optims.dense.state[tr.model.global_bias]
    out["global_bias.exp_avg"] = dense["exp_avg"].numpy().copy()
    out["global_bias.exp_avg_sq"] = dense["exp_avg_sq"].numpy().copy()
    return out


def day_keys(tr: Trainer, batch: dict) -> np.ndarray | None:
    """The user-day key (``daybias.day_key``) of each rating of a batch, from its bias rows; None without them."""
    days = tr.layout.day_bias
    return None if days is None else np.r_[days.keys, -1][batch["day_row"].numpy()]


def day_rows_of(tr: Trainer, keys: np.ndarray) -> torch.Tensor:
    """The rows of ``tr``'s user-day biases for keys (all present)."""
    found = tr.layout.day_bias.keys
    pos = np.searchsorted(found, keys)
    assert np.array_equal(found[pos], keys)
    return torch.from_numpy(pos)


def _epoch_worker(rank: int, world: int, port: int, cfgs: list[dict], out: str,
                  old_positions: tuple[str, str] | None = None) -> None:
    """Trains one epoch per config on this rank (float64); saves each one's batches (global ids) and tensors.
    With ``old_positions`` (data, directory; 2 ranks): then, in float32 again, ``_old_positions`` in the same
    process group (one launch for both)."""
    as_rank(rank, world, port)
    env = distributed.init("cpu", 60)
    try:
        torch.set_default_dtype(torch.float64)  # the comparison is about the algorithm, not summation order
        for k, cfg in enumerate(cfgs):
            tr = Trainer(config.from_dict(cfg), env)
            lay = tr.layout
            blocks = isinstance(lay, Blocks)
            groups = {}  # --model.implicit: the (users, movies) of each group of ratings a phase visits, global ids
            if lay.implicit is not None:  # a prior to pull the users toward from the first step (test_implicit.py)
                gids = lay.user_members[rank] if blocks else np.arange(lay.data.n_users)
                lay.implicit.z.copy_(torch.from_numpy(starting_z(gids, tr.cfg.model.dim)))
                groups = ({(b, q): (gids, lay.piece_members[b][q]) for b in range(world) for q in range(lay.pieces)}
                          if blocks else {"all": (gids, np.arange(lay.data.n_items))})
            batches, sync_steps = [], []
            for j, batch in enumerate(lay.batches(0, 0), start=1):  # to the end of the epoch
                user, item = lay.global_ids(batch)
                batches.append({"user": user, "item": item, "rating": batch["rating"].numpy().copy(),
                                "global_rows": batch["global_rows"], "day": day_keys(tr, batch),
                                # the group of ratings whose phase this batch is in
                                "group": (movie_block(rank, lay.held, world), lay.phase) if blocks else "all",
                                **{k: batch[k].numpy().copy() for k in ("time_bin", "time_dev") if k in batch}})
                tr.train_step(batch)
                if tr.layout.sync_point(j):  # as the loop does (train.Trainer._train_epoch)
                    tr.step_fn.reconcile()
                    sync_steps.append(j)
            torch.save({"batches": batches, "tensors": trainer_tensors(tr), "steps": tr.layout.steps_per_epoch,
                        "groups": groups,
                        "bytes_sent": tr.layout.bytes_sent, "sync_steps": sync_steps,
                        "local_bias": tr.step_fn.local_bias}, Path(out) / f"cfg{k}-rank{rank}.pt")
        if old_positions is not None:
            torch.set_default_dtype(torch.float32)  # as a process of its own would have it
            _old_positions(rank, env, *old_positions)
    finally:
        distributed.destroy()


def starting_z(user_ids: np.ndarray, dim: int) -> np.ndarray:
    """The implicit prior z a test job starts from, by global user id (the job's own starts at 0: the pull toward
    it would show only from the second epoch)."""
    return 0.05 * np.sin(0.7 * user_ids[:, None] + 1.3 * np.arange(dim)[None, :])


def run_ranks(cfgs: list[config.JobConfig], world: int, tmp: Path,
              old_positions: tuple[str, str] | None = None) -> list[list[dict]]:
    args = (world, free_port(), [c.to_dict() for c in cfgs], str(tmp), old_positions)
    assert spawn_ranks(_epoch_worker, world, args, 180) == [0] * world
    return [[torch.load(tmp / f"cfg{k}-rank{r}.pt", weights_only=False) for r in range(world)]
            for k in range(len(cfgs))]


def assert_union_equal(ranks: list[dict], cfg: config.JobConfig, data: Dataset) -> None:
    """One float64 process (replicated tables, torch-ops step) fed each step the union of the ranks' batches ends
    with the ranks' tables, Adam moments and global bias (whose Adam moments scale with its gradient: averaging it
    over ranks instead of summing would show there)."""
    steps = {r["steps"] for r in ranks}
    assert len(steps) == 1 and all(len(r["batches"]) == steps.pop() for r in ranks[:1])  # equal steps per rank
    assert len({len(r["batches"]) for r in ranks}) == 1
    torch.set_default_dtype(torch.float64)
    try:
        # torch ops as the reference: blocks ranks run the C++ step (where the step is fused)
        single = Trainer(config.replace(cfg, train__tables="replicated", train__cpu_kernel="off"),
                         DistEnv(0, 1, 0, CPU))
    finally:
        torch.set_default_dtype(torch.float32)
    sizes = set()
    for step in zip(*(r["batches"] for r in ranks), strict=True):
        g = step[0]["global_rows"]
        assert all(b["global_rows"] == g for b in step) and g == sum(len(b["user"]) for b in step)
        sizes.update(len(b["user"]) for b in step)
        union = {k: torch.from_numpy(np.concatenate([b[k] for b in step])) for k in ("user", "item", "rating")}
        if cfg.model.day_bias:
            union["day_row"] = day_rows_of(single, np.concatenate([b["day"] for b in step]))
        for k in ("time_bin", "time_dev"):  # (replicas: user rows are global ids, as in the one process)
            if k in step[0]:
                union[k] = torch.from_numpy(np.concatenate([b[k] for b in step]))
        single.train_step({**union, "global_rows": g})
    assert len(sizes) > 1  # some batches are short (a remainder), not only full ones
    want = trainer_tensors(single)
    for name, n in (("users", data.n_users), ("items", data.n_items)):
        seen = np.zeros(n, dtype=int)
        for r in ranks:
            t = r["tensors"]
            ids = t[f"{name}.ids"]
            seen[ids] += 1
            keys = ("weight", *state_keys(cfg))
            assert sorted(k for k in want if k.startswith(f"{name}.") and k != f"{name}.ids") == sorted(
                f"{name}.{k}" for k in keys)
            for key in keys:
                got, ref = t[f"{name}.{key}"], want[f"{name}.{key}"][ids]
                np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-10, err_msg=f"{name}.{key}")
        assert (seen == (1 if cfg.train.tables == "blocks" else len(ranks))).all()  # blocks: each row once
        last = f"{name}.{state_keys(cfg)[-1]}"
        assert not np.array_equal(want[last], np.zeros_like(want[last]))
    if cfg.model.day_bias:  # each rank's user-day biases: its users' days, once over the ranks under blocks
        seen = np.zeros(len(want["days.ids"]), dtype=int)
        for r in ranks:
            t = r["tensors"]
            pos = day_rows_of(single, t["days.ids"]).numpy()
            seen[pos] += 1
            for key in ("weight", "sq"):
                np.testing.assert_allclose(t[f"days.{key}"], want[f"days.{key}"][pos], rtol=1e-6, atol=1e-10,
                                           err_msg=f"days.{key}")
        assert (seen == (1 if cfg.train.tables == "blocks" else len(ranks))).all()
        assert np.abs(want["days.weight"]).max() > 0
    time_keys = [k for k in want if k.startswith("time.") and not k.endswith(".ids")]
    for key in time_keys:  # the time-aware biases: every replica holds them all
        for r in ranks:
            np.testing.assert_allclose(r["tensors"][key], want[key], rtol=1e-6, atol=1e-10, err_msg=key)
    assert not time_keys or (np.abs(want["time.items.weight"]).max() > 0) == (cfg.model.time_bins > 0)
    for key in ("global_bias", "global_bias.exp_avg", "global_bias.exp_avg_sq"):
        for r in ranks:
            np.testing.assert_allclose(r["tensors"][key], want[key], rtol=1e-9, atol=0, err_msg=key)


def row_floats(cfg: config.JobConfig) -> int:
    """Floats a movie row travels with: its dim + 1 values and its optimizer state (RowRMSprop: 2, Adam: two
    moments of dim + 1)."""
    return cfg.model.dim + 1 + (2 if cfg.optim.optimizer == "row_rmsprop" else 2 * (cfg.model.dim + 1))


def state_keys(cfg: config.JobConfig) -> tuple[str, ...]:
    """The tables' optimizer state a config's run keeps, by name."""
    return ("row_sq",) if cfg.optim.optimizer == "row_rmsprop" else ("exp_avg", "exp_avg_sq")


def global_bias_step(bias: np.ndarray, m: np.ndarray, v: np.ndarray, grad: np.ndarray, t: int, lr: float,
                     sync: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each rank's copy of the global bias after step ``t``: torch.optim.Adam (its default betas, eps 1e-8) on the
    rank's gradient, then at a sync point the copies and their moments replaced by their means over the ranks."""
    b1, b2 = 0.9, 0.999
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad**2
    bias = bias - lr / (1 - b1**t) * m / (np.sqrt(v) / np.sqrt(1 - b2**t) + 1e-8)
    if sync:
        bias, m, v = (np.full(len(x), x.mean()) for x in (bias, m, v))
    return bias, m, v


def numpy_reference(ranks: list[dict], cfg: config.JobConfig, initial: dict[str, np.ndarray]) -> dict[str, list]:
    """The blocks layout's closed-form step written out in NumPy (float64) from the config alone, fed each step the
    ranks' batches: squared error / G plus the per-rating L2, LazyAdam (or RowRMSprop: one second moment of the mean
    square of a row's factor gradients, one of its bias gradient, no first moment) on the touched rows of each table
    (one step count per table), and per rank a copy of the global bias stepped by torch's Adam on W x its batch's
    gradient, the copies and their moments averaged at the ranks' sync points. Constant learning rates (schedule
    none). The model options (issue 24): without biases no global bias and no bias columns (their gradient is 0);
    with max_norm the factor vectors of the step's touched rows (all ranks') renormalized first, as nn.Embedding
    does. With user-day biases (model.day_bias; ``initial["days.keys"]``, ``["days.count"]``: every key of the
    training split and its ratings) each prediction adds its key's bias b, and each touched b steps by RMSprop on
    its summed 2 e / G plus its share of reg_day b^2: count / n_key x 2 reg_day b / G (mfscale/daybias.py). With
    time-aware biases (model.time_bins, model.user_drift; ``initial["time.span"]``: the training split's first and
    last day, ``["time.mean_day"]``: each user's mean training day, ``["time.count"]``: each user's training ratings,
    ``["time.item"]``, ``["time.day"]``: each training rating's movie and day; ``["time.day_of"]``: the day of a
    rating by its user and movie)
    each prediction adds its movie's bias for the bin of its day and alpha_u dev_u(day), and each touched bin bias and
    alpha steps by RMSprop on its summed 2 e / G (times dev for alpha) plus its share of reg_time b^2 (reg_drift
    alpha^2): count / n x 2 reg x value / G, n the bin's (the user's) training ratings (mfscale/timebias.py). With
    implicit feedback (model.implicit; ``initial["implicit"]``, tests/test_implicit.py's ImplicitReference) its visits
    run before each rank's first step of a phase and the users' L2 pulls toward its z instead of 0."""
    o, d, w = cfg.optim, cfg.model.dim, len(ranks)
    ones = 1.0 if cfg.model.biases else 0.0  # the bias column's derivative
    implicit = initial.get("implicit")  # --model.implicit (tests/test_implicit.py): its visits, the users' pull to z
    assert o.schedule == "none"
    reg = np.full(d + 1, o.reg_factor)
    reg[d] = o.reg_bias
    tables = {"users": initial["users.weight"].copy(), "items": initial["items.weight"].copy()}
    row_wise = o.optimizer == "row_rmsprop"
    moments = {k: ((np.zeros((len(t), 2)),) if row_wise else (np.zeros_like(t), np.zeros_like(t)))
               for k, t in tables.items()}
    bias = np.full(w, float(initial["global_bias"]))
    bias_m, bias_v = np.zeros(w), np.zeros(w)
    sync = set(ranks[0]["sync_steps"])
    assert all(set(r["sync_steps"]) == sync for r in ranks)
    days = cfg.model.day_bias
    if days:
        day_keys, day_n = initial["days.keys"], initial["days.count"]
        day_b, day_s = np.zeros(len(day_keys)), np.zeros(len(day_keys))
    n_bins, drift = cfg.model.time_bins, cfg.model.user_drift
    timed = n_bins > 0 or drift
    if timed:
        first, last = initial["time.span"]
        k_of = lambda when: np.clip((when - first) * max(n_bins, 1) // (last - first + 1), 0, max(n_bins, 1) - 1)  # noqa: E731
        bin_n = np.zeros((len(tables["items"]), max(n_bins, 1)))  # training ratings per (movie, bin), from the split
        np.add.at(bin_n, (initial["time.item"], k_of(initial["time.day"])), 1)
        bins, bins_s = np.zeros((len(tables["items"]), n_bins)), np.zeros((len(tables["items"]), n_bins))
        alpha, alpha_s = np.zeros(len(tables["users"])), np.zeros(len(tables["users"]))
    for t, step in enumerate(zip(*(r["batches"] for r in ranks), strict=True), start=1):
        g_rows = step[0]["global_rows"]
        if implicit is not None:
            implicit.before_step(step, tables)
        if days:
            day_g, day_c = np.zeros(len(day_keys)), np.zeros(len(day_keys))
        if timed:
            bins_g, bins_c = np.zeros_like(bins), np.zeros_like(bins)
            alpha_g, alpha_c = np.zeros_like(alpha), np.zeros_like(alpha)
        grads = {k: np.zeros_like(v) for k, v in tables.items()}
        counts = {k: np.zeros(len(v)) for k, v in tables.items()}
        p, q = tables["users"], tables["items"]
        if cfg.model.max_norm:
            for x, key in ((p, "user"), (q, "item")):
                rows = np.unique(np.concatenate([b[key] for b in step]))
                norm = np.linalg.norm(x[rows, :d], axis=1)
                over = rows[norm > cfg.model.max_norm]
                x[over, :d] *= (cfg.model.max_norm / (norm[norm > cfg.model.max_norm] + 1e-7))[:, None]
        g_bias = np.zeros(w)
        for r, b in enumerate(step):
            u, i, y = b["user"], b["item"], b["rating"].astype(np.float64)
            at = np.searchsorted(day_keys, b["day"]) if days else None
            day = day_b[at] if days else 0.0
            time = 0.0
            if timed:
                when = initial["time.day_of"](u, i)  # each rating's day, found in the split by (user, movie)
                k = k_of(when)
                x = when - initial["time.mean_day"][u]
                dev = (np.sign(x) * np.abs(x) ** 0.4).astype(np.float32)  # batches carry it as float32, as ratings
                time = (bins[i, k] if n_bins else 0.0) + (alpha[u] * dev if drift else 0.0)
            coef = 2 * (bias[r] + (p[u, :d] * q[i, :d]).sum(1) + p[u, d] + q[i, d] + day + time - y) / g_rows
            if days:
                np.add.at(day_g, at, coef)
                np.add.at(day_c, at, 1)
            if timed:
                if n_bins:
                    np.add.at(bins_g, (i, k), coef)
                    np.add.at(bins_c, (i, k), 1)
                if drift:
                    np.add.at(alpha_g, u, coef * dev)
                    np.add.at(alpha_c, u, 1)
            np.add.at(grads["users"], u, coef[:, None] * np.c_[q[i, :d], np.full(len(i), ones)])
            np.add.at(grads["items"], i, coef[:, None] * np.c_[p[u, :d], np.full(len(u), ones)])
            np.add.at(counts["users"], u, 1)
            np.add.at(counts["items"], i, 1)
            g_bias[r] = w * coef.sum() * ones
        size = o.lr * np.sqrt(1 - o.beta2**t) / (1 - o.beta1**t)
        for k, x in tables.items():
            rows = counts[k] > 0
            pulled = x[rows] if implicit is None else x[rows] - implicit.prior(k, rows)
            g = grads[k][rows] + (counts[k][rows, None] * reg * 2 / g_rows) * pulled
            if row_wise:
                (s,) = moments[k]
                s[rows] += (np.c_[(g[:, :d] ** 2).mean(1), g[:, d] ** 2] - s[rows]) * (1 - o.beta2)
                step = o.lr * np.sqrt(1 - o.beta2**t) / (np.sqrt(s[rows]) + 1e-8)  # no beta1 correction
                x[rows] -= g * np.c_[np.repeat(step[:, :1], d, 1), step[:, 1:]]
                continue
            m, v = moments[k]
            m[rows] += (g - m[rows]) * (1 - o.beta1)
            v[rows] += (g * g - v[rows]) * (1 - o.beta2)
            x[rows] -= size * m[rows] / (np.sqrt(v[rows]) + 1e-8)
        if days:
            rows = day_c > 0
            g = day_g[rows] + day_c[rows] / day_n[rows] * 2 * o.reg_day / g_rows * day_b[rows]
            day_s[rows] += (g * g - day_s[rows]) * (1 - o.beta2)
            day_b[rows] -= o.lr * np.sqrt(1 - o.beta2**t) * g / (np.sqrt(day_s[rows]) + 1e-8)
        if timed:
            for value, state, grad, count, n, l2 in ((bins, bins_s, bins_g, bins_c, bin_n[:, :n_bins], o.reg_time),
                                                     (alpha, alpha_s, alpha_g, alpha_c, initial["time.count"],
                                                      o.reg_drift)):
                rows = count > 0
                g = grad[rows] + count[rows] / n[rows] * 2 * l2 / g_rows * value[rows]
                state[rows] += (g * g - state[rows]) * (1 - o.beta2)
                value[rows] -= o.lr * np.sqrt(1 - o.beta2**t) * g / (np.sqrt(state[rows]) + 1e-8)
        bias, bias_m, bias_v = global_bias_step(bias, bias_m, bias_v, g_bias, t, o.dense_lr, t in sync)
    out = {"tables": tables, "moments": moments, "bias": [bias, bias_m, bias_v]}
    if days:
        out["days"] = [day_b, day_s]
    if timed:
        out["time"] = {"items": [bins, bins_s], "users": [alpha, alpha_s]}
    if implicit is not None:
        out["implicit"] = implicit.end_epoch()
    return out


def assert_numpy_reference(ranks: list[dict], cfg: config.JobConfig, data: Dataset, extra: dict | None = None
                           ) -> dict:
    """Each rank's rows, their optimizer state and its global bias (with its Adam moments) equal the NumPy
    reference's (``extra``: more of its ``initial``); returns the reference's values."""
    torch.set_default_dtype(torch.float64)
    try:
        initial = Trainer(config.replace(cfg, train__tables="replicated"), DistEnv(0, 1, 0, CPU)).model
    finally:
        torch.set_default_dtype(torch.float32)
    start = {k: v.detach().numpy() for k, v in initial.state_dict().items()}
    train = data.read_split("train")
    start["days.keys"], start["days.count"] = np.unique(day_key(train["user"], train["timestamp"]), return_counts=True)
    when = train["timestamp"].astype(np.int64) // 86400  # the time biases' days, span and users' mean days
    start["time.span"] = (int(when.min()), int(when.max()))
    n = np.bincount(train["user"], minlength=data.n_users)
    start["time.mean_day"] = np.bincount(train["user"], weights=when, minlength=data.n_users) / np.maximum(n, 1)
    start["time.count"], start["time.item"], start["time.day"] = n, train["item"].astype(np.int64), when
    pair = train["user"].astype(np.int64) * data.n_items + train["item"]
    order = np.argsort(pair)

    def day_of(user: np.ndarray, item: np.ndarray) -> np.ndarray:
        at = order[np.searchsorted(pair[order], user * data.n_items + item)]
        assert np.array_equal(pair[at], user * data.n_items + item)
        return when[at]

    start["time.day_of"] = day_of
    start.update(extra or {})
    want = numpy_reference(ranks, cfg, start)
    assert len(want["tables"]["users"]) == data.n_users
    for r, rank in enumerate(ranks):
        t = rank["tensors"]
        for name in ("users", "items"):
            ids = t[f"{name}.ids"]
            for key, ref in zip(("weight", *state_keys(cfg)), (want["tables"][name], *want["moments"][name]),
                                strict=True):
                np.testing.assert_allclose(t[f"{name}.{key}"], ref[ids], rtol=1e-6, atol=1e-10,
                                           err_msg=f"rank {r} {name}.{key}")
        for key, ref in zip(("global_bias", "global_bias.exp_avg", "global_bias.exp_avg_sq"), want["bias"],
                            strict=True):
            np.testing.assert_allclose(t[key], ref[r], rtol=1e-9, atol=0, err_msg=f"rank {r} {key}")
        if cfg.model.day_bias:
            pos = np.searchsorted(start["days.keys"], t["days.ids"])
            assert np.array_equal(start["days.keys"][pos], t["days.ids"])
            for key, ref in zip(("weight", "sq"), want["days"], strict=True):
                np.testing.assert_allclose(t[f"days.{key}"], ref[pos], rtol=1e-6, atol=1e-10,
                                           err_msg=f"rank {r} days.{key}")
        if "time" in want:  # the bins beside the movies this rank holds, the drift beside its users
            for name in ("users", "items"):
                ids = t[f"time.{name}.ids"]
                assert np.array_equal(ids, t[f"{name}.ids"])
                for key, ref in zip(("weight", "sq"), want["time"][name], strict=True):
                    got = t[f"time.{name}.{key}"]
                    np.testing.assert_allclose(got.reshape(len(ids), -1), ref[ids].reshape(len(ids), -1), rtol=1e-6,
                                               atol=1e-10, err_msg=f"rank {r} time.{name}.{key}")
    if "time" in want:  # the terms that are on moved
        assert bool(want["time"]["items"][0].any()) == (cfg.model.time_bins > 0)
        assert bool(want["time"]["users"][0].any()) == cfg.model.user_drift
    if cfg.model.day_bias:  # the ranks' keys are the split's, each once
        assert np.array_equal(np.sort(np.concatenate([rank["tensors"]["days.ids"] for rank in ranks])),
                              start["days.keys"])
        assert np.abs(want["days"][0]).max() > 0
    return want


# The spawned epochs of the tests below share one launch per world size (module fixtures ``epochs_w2``,
# ``epochs_w3``): each config still trains its own epoch from scratch in that process group, in the order given.
# Start-up (spawning, importing torch, the gloo rendezvous) is most of a launch's time; a config's epoch is not.
def _union_cfgs(data: Path, root: Path, pieces: int) -> list[config.JobConfig]:
    """test_blocks_on_w_ranks_equal_one_process_on_the_union's configs: the fused step and the autograd step."""
    # schedule none: the one process takes other steps per epoch, so a decaying LR would differ per step
    base = dict(train__batch_size=97, optim__lr=0.02, train__tables="blocks", train__seed=3, optim__schedule="none",
                train__block_pieces=pieces)
    return [job(data, root / "a", **base),
            job(data, root / "b", **base, train__step="autograd", optim__gravity=0.5)]


def _adam_cfgs(data: Path, root: Path) -> list[config.JobConfig]:
    return [job(data, root / "a", train__batch_size=97, optim__lr=0.02, train__seed=3, optim__schedule="none",
                optim__optimizer="lazy_adam", train__tables="blocks", train__block_pieces=2)]


def _replicated_cfgs(data: Path, root: Path) -> list[config.JobConfig]:
    base = dict(train__batch_size=97, optim__lr=0.02, train__tables="replicated", train__seed=3,
                optim__schedule="none")
    return [job(data, root / "a", **base),
            job(data, root / "b", **base, train__step="autograd", optim__gravity=0.5)]


def _shared_epochs(data: Path, root: Path, world: int, groups: dict[str, list[config.JobConfig]],
                   old_positions: bool = False) -> dict[str, list[tuple[config.JobConfig, list[dict]]]]:
    """One launch of ``world`` ranks training every group's configs; per group, (config, ranks' results)."""
    flat = [cfg for cfgs in groups.values() for cfg in cfgs]
    results = iter(run_ranks(flat, world, root, (str(data), str(root / "old")) if old_positions else None))
    return {name: [(cfg, next(results)) for cfg in cfgs] for name, cfgs in groups.items()}


@pytest.fixture(scope="module")
def epochs_w2(small_data, tmp_path_factory) -> dict:
    """2 ranks: the union test's pieces 2 and 1, Adam's blocks, the replicated tables; and the positions of
    checkpoints from before pieces (test_checkpoints_from_before_pieces_resume_exactly_or_are_refused), whose
    files are in the directory under "old-positions"."""
    root = tmp_path_factory.mktemp("epochs-w2")
    (root / "old").mkdir()
    runs: dict = _shared_epochs(small_data, root, 2, {"blocks-2": _union_cfgs(small_data, root / "p2", 2),
                                                      "blocks-1": _union_cfgs(small_data, root / "p1", 1),
                                                      "adam": _adam_cfgs(small_data, root / "adam"),
                                                      "replicated": _replicated_cfgs(small_data, root / "replicated")},
                                old_positions=True)
    runs["old-positions"] = root / "old"
    return runs


@pytest.fixture(scope="module")
def epochs_w3(small_data, tmp_path_factory) -> dict[str, list[tuple[config.JobConfig, list[dict]]]]:
    """3 ranks: the union test's pieces 2 and 3."""
    root = tmp_path_factory.mktemp("epochs-w3")
    return _shared_epochs(small_data, root, 3, {f"blocks-{p}": _union_cfgs(small_data, root / f"p{p}", p)
                                                for p in (2, 3)})


@pytest.mark.parametrize(("world", "pieces"), [(2, 2), (3, 2), (2, 1), (3, 3)])
def test_blocks_on_w_ranks_equal_one_process_on_the_union(small_data, request, world, pieces):
    """Fused and autograd steps (the latter with gravity, whose Gram matrices are summed over ranks), through
    a whole epoch with sub-epoch rotations in ``pieces`` pieces (sent behind the other pieces' training) and
    uneven strata."""
    runs = request.getfixturevalue(f"epochs_w{world}")[f"blocks-{pieces}"]
    assert [cfg.train.block_pieces for cfg, _ in runs] == [pieces, pieces]
    assert [cfg.train.step == "autograd" for cfg, _ in runs] == [False, True]
    data = Dataset(small_data)
    for cfg, ranks in runs:
        assert len(ranks) == world
        if ranks[0]["local_bias"]:  # the closed-form step: each rank's own global bias between sync points
            assert cfg.train.step != "autograd" and all(r["sync_steps"][-1] == r["steps"] for r in ranks)
            assert len(ranks[0]["sync_steps"]) == world  # the sub-epoch ends: W collectives per epoch
            assert_numpy_reference(ranks, cfg, data)
        else:  # autograd: DDP sums the global bias's gradient every step
            assert_union_equal(ranks, cfg, data)
        # exactly once: the epoch's batches over all ranks are the training split, as a multiset
        train = data.read_split("train")
        got = np.sort(np.concatenate([b["user"] * data.n_items + b["item"] for r in ranks for b in r["batches"]]))
        assert np.array_equal(got, np.sort(train["user"].astype(np.int64) * data.n_items + train["item"]))
        # traffic: W rotations of a movie block (rows + their state) per rank per epoch, in pieces: each block
        # passes through every rank once, so each rank sends the whole movie table once; no gradient rows
        assert {r["bytes_sent"] for r in ranks} == {data.n_items * row_floats(cfg) * 8}
        assert {len(r["batches"]) for r in ranks} == {r["steps"] for r in ranks}


def test_adam_on_two_ranks_equals_the_numpy_reference(small_data, epochs_w2):
    """The tests above run the default optimizer (RowRMSprop, two floats of state per row); Adam's blocks run (the
    C++ step with LazyAdam, the rotation in 2 pieces carrying both moments) against the NumPy reference too."""
    ((cfg, ranks),) = epochs_w2["adam"]
    assert cfg.optim.optimizer == "lazy_adam" and cfg.train.block_pieces == 2 and len(ranks) == 2
    data = Dataset(small_data)
    assert ranks[0]["local_bias"] and all("users.exp_avg_sq" in r["tensors"] for r in ranks)
    assert_numpy_reference(ranks, cfg, data)
    # the rotation carries each movie row with its two moments: 3 (dim + 1) float64 per movie
    assert {r["bytes_sent"] for r in ranks} == {data.n_items * row_floats(cfg) * 8} == {
        data.n_items * 3 * (cfg.model.dim + 1) * 8}


def test_replicated_on_two_ranks_equals_one_process_on_the_union(small_data, epochs_w2):
    runs = epochs_w2["replicated"]
    assert [(cfg.train.tables, cfg.train.step == "autograd", len(ranks)) for cfg, ranks in runs] == [
        ("replicated", False, 2), ("replicated", True, 2)]
    for cfg, ranks in runs:
        assert_union_equal(ranks, cfg, Dataset(small_data))


def test_init_rows_are_the_same_whatever_the_rows_asked_for():
    all_rows = init_rows(np.arange(150_000), 4, 0.1, seed=7, table=0)
    some = np.array([149_999, 3, 70_000, 3, 65_536])
    assert torch.equal(init_rows(some, 4, 0.1, seed=7, table=0), all_rows[some])
    assert (all_rows[:, 4] == 0).all() and 0.09 < float(all_rows[:, :4].std()) < 0.11
    assert not torch.equal(init_rows(some, 4, 0.1, seed=7, table=1), all_rows[some])


def test_rows_are_dealt_by_count_in_snake_order():
    counts = np.array([50, 10, 40, 30, 20, 60, 0])
    # by count: 5 (60), 0 (50), 2 (40), 3 (30), 4 (20), 1 (10), 6 (0) -> blocks 0 1 2 2 1 0 0
    assert deal_rows(counts, 3).tolist() == [1, 0, 2, 2, 1, 0, 0]
    # ML-32M-like skew (Zipf counts): blocks get equal rows and ratings within 1%
    rng = np.random.default_rng(0)
    zipf = np.minimum(rng.zipf(1.3, 200_000), 30_000)
    block = deal_rows(zipf, 4)
    per_block = np.bincount(block, weights=zipf, minlength=4)
    assert per_block.max() / per_block.mean() < 1.01
    assert np.bincount(block).max() - np.bincount(block).min() <= 1
    # pieces of movie blocks: W x P groups of the same deal; a block holds the same rows for any P, its pieces
    # are balanced in rows and ratings too
    for world, pieces in ((2, 2), (3, 2), (3, 3), (4, 5)):
        b, q = deal_pieces(zipf, world, pieces)
        assert np.array_equal(b, deal_rows(zipf, world)) and q.min() == 0 and q.max() == pieces - 1
        group = b * pieces + q
        assert np.bincount(group).max() - np.bincount(group).min() <= 1
        per_group = np.bincount(group, weights=zipf)
        assert per_group.max() / per_group.mean() < 1.02
    assert deal_pieces(counts, 2, 2)[0].tolist() == deal_rows(counts, 2).tolist()
    # sub-epoch 0 trains strata (0,0) and (1,1): 4 steps' worth for both ranks; sub-epoch 1: (0,1), (1,0)
    assert stratum_balance(np.array([[4, 1], [1, 2]])) == {"max_over_mean": 2.0, "padded_over_actual": 1.25}


def test_more_ranks_than_rows_is_one_clear_error(tmp_path):
    data = make_dataset(tmp_path / "d", n_users=3, n_items=40, per_user=10)
    with pytest.raises(ConfigError, match="4 ranks but the data has only 3 users"):
        Blocks(job(data, tmp_path / "r", model__dim=4, data__resident="off"), DistEnv(0, 4, 0, CPU), Dataset(data),
               batch_size=16)


def test_blocks_on_one_rank_trains_every_rating_once_per_epoch(small_data, tmp_path):
    tr = Trainer(job(small_data, tmp_path, train__tables="blocks", train__batch_size=500), DistEnv(0, 1, 0, CPU))
    data = Dataset(small_data)
    pairs = [tr.layout.global_ids(b) for b in tr.layout.batches(0, 0)]
    got = np.sort(np.concatenate([u * data.n_items + i for u, i in pairs]))
    train = data.read_split("train")
    assert np.array_equal(got, np.sort(train["user"].astype(np.int64) * data.n_items + train["item"]))
    assert len(pairs) == tr.layout.steps_per_epoch == -(-len(train["user"]) // 500)


def _torchrun_cmd(args: list[str], nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "mfscale.train", *args]


def _torchrun(args: list[str], nproc: int, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_cmd(args, nproc), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _torchrun_together(jobs: list[list[str]], nproc: int, timeout: int = 240) -> list[subprocess.CompletedProcess]:
    """``_torchrun`` of each job's args, all at once (each --standalone: its own rendezvous and ports); most of a
    small job's time is its processes' start-up, which overlaps."""
    procs = [subprocess.Popen(_torchrun_cmd(args, nproc), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True) for args in jobs]
    try:
        deadline = monotonic() + timeout
        out = [p.communicate(timeout=max(0.1, deadline - monotonic())) for p in procs]
        return [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(procs, out, strict=True)]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()


def test_blocks_checkpoint_resumes_at_other_world_sizes_and_tools_read_it(small_data, tmp_path):
    """2 blocks ranks write one part each; the whole model assembled from them equals what 1 process loads;
    it trains on, and its checkpoint continues on 3 ranks (2 -> 1 -> 3); recommend reads the partitioned run."""
    two = tmp_path / "two"
    common = ["--data", str(small_data), "--batch-size", "200", "--train.ranking_k", "5"]
    r = _torchrun([*common, "--run-dir", str(two), "--epochs", "2", "--train.tables", "blocks"], 2)
    assert r.returncode == 0, r.stderr[-3000:]
    m2 = json.loads((two / "metrics.json").read_text())
    assert m2["tables"] == "blocks" and m2["world_size"] == 2 and m2["test_rmse"] < 1.0
    state, path = checkpoint.load_latest(two)
    assert state["layout"] == "blocks" and len(state["parts"]) == 2 and state["epoch"] == 2
    whole = checkpoint.assemble(path, state, optimizer=True)
    assert not any(torch.isnan(v).any() for v in whole.values())

    # 2 -> 1: a one-process (replicated) trainer loads exactly those tables and moments
    one = tmp_path / "one"
    (one / "checkpoints").mkdir(parents=True)
    for f in (two / "checkpoints").iterdir():
        os.link(f, one / "checkpoints" / f.name)
    tr = Trainer(job(small_data, one, train__batch_size=400, train__epochs=3), DistEnv(0, 1, 0, CPU))
    assert tr.resume() and tr.progress.epoch == 2 and tr.layout.name == "replicated"
    loaded = trainer_tensors(tr)
    for name in ("users", "items"):
        for key in ("weight", *state_keys(tr.cfg)):
            assert torch.equal(torch.from_numpy(loaded[f"{name}.{key}"]), whole[f"{name}.{key}"]), (name, key)
    metrics = run(job(small_data, one, train__batch_size=400, train__epochs=3))
    assert metrics["epochs"] == 3 and metrics["world_size"] == 1 and metrics["test_rmse"] < m2["test_rmse"] + 0.05

    # 1 -> 3 ranks: the one-process run's checkpoint (replicated, epoch 3) continues on 3 blocks ranks
    three = tmp_path / "three"
    (three / "checkpoints").mkdir(parents=True)
    for f in (one / "checkpoints").iterdir():
        os.link(f, three / "checkpoints" / f.name)
    # (recommend on the 2-rank run, checked below, reads only that run: it starts now, beside the 3 ranks)
    tool = subprocess.Popen([sys.executable, "-m", "mfscale.recommend", "--run", str(two), "--user", "1", "-k", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        r = _torchrun([*common, "--run-dir", str(three), "--epochs", "4"], 3)
        tool_out, tool_err = tool.communicate(timeout=120)
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.communicate()
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "epoch 3 step 0" in r.stderr
    m3 = json.loads((three / "metrics.json").read_text())
    assert m3["world_size"] == 3 and m3["tables"] == "blocks" and m3["epochs"] == 4
    assert m3["history"][:3] == metrics["history"]

    # the user-facing tools read a partitioned run
    assert tool.returncode == 0, tool_err
    assert len([line for line in tool_out.splitlines() if line.strip()]) >= 3


def test_mid_epoch_resume_at_another_world_size_is_refused(small_data, tmp_path, reference_run):
    """A 2-rank run's mid-epoch checkpoint: the restart tests' reference run (conftest.reference_run: 2 gloo
    ranks, a checkpoint every 3 steps), its checkpoint files linked into this test's run directory (the
    reference's own stay as they are)."""
    ref_dir, _, _ = reference_run
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for f in (ref_dir / "checkpoints").iterdir():
        os.link(f, run_dir / "checkpoints" / f.name)
    # drop the epoch-end checkpoint so the newest one is mid-epoch
    for p in checkpoint.list_checkpoints(run_dir)[-1:]:
        p.unlink()
    (run_dir / "checkpoints" / "best.pt").unlink()
    state, _ = checkpoint.load_latest(run_dir)
    assert state["step_in_epoch"] > 0
    batch = int(RESTART_ARGS[RESTART_ARGS.index("--batch-size") + 1])  # the run's own, as before
    assert state["batch_size"] == batch
    with pytest.raises(ConfigError, match="stopped mid-epoch with world size 2"):
        Trainer(job(small_data, run_dir, train__batch_size=batch), DistEnv(0, 1, 0, CPU)).resume()


def _crash_step(ref_dir: Path, num: int, den: int) -> int:
    """Global step ``steps + steps * num // den + 1`` (epoch 1) of the finished run in ``ref_dir``, ``steps`` its
    steps per epoch."""
    state, _ = checkpoint.load_latest(ref_dir)
    steps = state["global_step"] // state["epoch"]
    return steps + steps * num // den + 1


def _jobs_rank(rank: int, ports: list[int], jobs: list[tuple[list[str], int | list]], out: str) -> None:
    """Rank ``rank`` of 2 running ``jobs`` one after another, each through run() (which joins a process group of
    its own, on port ``ports[k]``, and leaves it). A job is (argv, crash_at): every rank raises at global step
    ``crash_at`` (-1, or 0 on a resumed run: never), or at ``_crash_step(*crash_at)`` when it is a list (a
    reference run dir, written by an earlier job of the list, num, den). Each job's outcome, "done" or "crashed",
    goes to ``out/rank{rank}.json``."""
    as_rank(rank, 2, ports[0])
    original = Trainer.train_step
    outcomes = []
    for (argv, crash_at), port in zip(jobs, ports, strict=True):
        os.environ["MASTER_PORT"] = str(port)
        at = _crash_step(Path(crash_at[0]), *crash_at[1:]) if isinstance(crash_at, list) else crash_at

        def crashing(self, batch, at=at):
            if self.progress.global_step == at:
                raise RuntimeError("simulated crash")
            return original(self, batch)

        Trainer.train_step = crashing
        try:
            run(config.from_args(argv))
            outcomes.append("done")
        except RuntimeError as exc:
            assert "simulated crash" in str(exc)
            outcomes.append("crashed")
    Path(out, f"rank{rank}.json").write_text(json.dumps(outcomes))


def _spawn_jobs(jobs: list[tuple[list[str], int | list]], out: Path) -> list[str]:
    """``_jobs_rank``'s jobs on 2 spawned ranks (one launch); each job's outcome, the same on both ranks."""
    out.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in jobs]
    assert spawn_ranks(_jobs_rank, 2, (ports, jobs, str(out)), 240) == [0, 0]
    outcomes = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert outcomes[0] == outcomes[1], outcomes
    return outcomes[0]


def crash_then_resume(crashes: dict[str, tuple[list[str], int | list]], references: list[list[str]],
                      out: Path) -> dict[str, dict]:
    """Two launches of 2 ranks for several crash/resume tests (start-up is most of a launch's time). The first
    runs the ``references`` uninterrupted, then each crash job, whose ranks all raise at its step (see
    ``_jobs_rank``); the second resumes each crashed run dir, from its newest checkpoint, to the end, in fresh
    processes (only what the checkpoint holds carries over). Per crash job: the newest checkpoint's metadata as
    the crash left it."""
    names = list(crashes)
    got = _spawn_jobs([*((argv, -1) for argv in references), *(crashes[n] for n in names)], out / "crash")
    assert got == ["done"] * len(references) + ["crashed"] * len(names), got
    states = {n: checkpoint.load_latest(Path(crashes[n][0][crashes[n][0].index("--run-dir") + 1]))[0]
              for n in names}
    assert _spawn_jobs([(crashes[n][0], 0) for n in names], out / "resume") == ["done"] * len(names)
    return states


def assert_crashed_inside(state: dict, position: dict) -> None:
    """The newest checkpoint a crash in epoch 1 left holds ``position``, mid-epoch."""
    assert state["epoch"] == 1 and state["layout_position"] == position
    assert state["step_in_epoch"] > 0


PIECES_ARGS = [*RESTART_ARGS, "--epochs", "3", "--train.block_pieces", "2"]


@pytest.fixture(scope="module")
def crashed_and_resumed(small_data, reference_run, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """The two blocks crash/resume tests below, in 2 launches instead of 5: (base dir, each crash's checkpoint
    metadata). "whole": the restart tests' job (conftest.reference_run's, 1 piece) crashed in sub-epoch 1 of epoch
    1 (each rank holding another rank's movie block); "pieces": 2 pieces, 3 epochs, crashed in the middle of phase
    (1, 1) of epoch 1, its uninterrupted run (base/pieces-reference) in the same launch before it."""
    base = tmp_path_factory.mktemp("crash-resume")
    ref_dir = reference_run[0]
    # epoch 1, sub-epoch 1 (of 2, about equal), not on a checkpoint step
    whole = ["--data", str(small_data), "--run-dir", str(base / "whole"), *RESTART_ARGS]
    # epoch 1, the middle of phase (1, 1); not on a checkpoint step
    pieces = ["--data", str(small_data), "--run-dir", str(base / "pieces"), *PIECES_ARGS]
    pieces_ref = ["--data", str(small_data), "--run-dir", str(base / "pieces-reference"), *PIECES_ARGS]
    states = crash_then_resume({"whole": (whole, _crash_step(ref_dir, 3, 4)),
                                "pieces": (pieces, [str(base / "pieces-reference"), 7, 8])}, [pieces_ref],
                               base / "launches")
    return base, states


def test_blocks_resume_inside_a_later_sub_epoch_equals_uninterrupted(reference_run, crashed_and_resumed):
    """Crash both ranks in sub-epoch 1 of epoch 1 (each holding another rank's movie block), resume from the
    newest checkpoint: the run ends bit-identical to the uninterrupted reference run (blocks, 2 ranks, the whole
    block rotating at once). (Launched by the crashed_and_resumed fixture.)"""
    from .test_train import assert_same_run

    ref_dir, ref_metrics, _ = reference_run
    ref_state, _ = checkpoint.load_latest(ref_dir)
    assert ref_state["layout"] == "blocks" and ref_state["config"]["train"]["block_pieces"] == 1
    base, states = crashed_and_resumed
    assert_crashed_inside(states["whole"], {"held": 1, "phase": 0, "pieces": 1})
    run_dir = base / "whole"
    assert_same_run(ref_dir, run_dir, ref_metrics, json.loads((run_dir / "metrics.json").read_text()))


def test_blocks_in_pieces_resume_inside_phase_1_of_a_later_sub_epoch_equals_uninterrupted(crashed_and_resumed):
    """2 pieces, so 4 phases per epoch of about equal steps: crash both ranks in the middle of phase (1, 1) of
    epoch 1 and resume from the newest checkpoint, written inside that phase. It holds piece 0 of the next block
    (sent at the end of phase (1, 0) and received behind phase 1's training: the save waits for it) and piece 1 of
    this one; the resumed run takes the exchanges up from there and ends bit-identical to the uninterrupted run.
    (Launched by the crashed_and_resumed fixture.)"""
    from .test_train import assert_same_run

    base, states = crashed_and_resumed
    assert_crashed_inside(states["pieces"], {"held": 1, "phase": 1, "pieces": 2})
    ref_dir, run_dir = base / "pieces-reference", base / "pieces"
    assert_same_run(ref_dir, run_dir, json.loads((ref_dir / "metrics.json").read_text()),
                    json.loads((run_dir / "metrics.json").read_text()))


def _old_positions(rank: int, env: DistEnv, data: str, tmp: str) -> None:
    """Takes up positions of checkpoints written before pieces ({"held": s}) under 1 and 2 pieces, on rank
    ``rank`` of a 2-rank process group (run by ``_epoch_worker`` after its epochs: the ``epochs_w2`` launch)."""
    assert env.world_size == 2
    out: dict[str, object] = {}
    for pieces in (1, 2):
        lay = Trainer(job(Path(data), Path(tmp) / f"p{pieces}", train__tables="blocks", train__batch_size=200,
                          train__block_pieces=pieces), env).layout
        out[f"canonical{pieces}"] = sorted(lay.held_ids(lay.position())[1].tolist())
        for held in (0, 1):
            try:
                lay.set_position({"held": held})
                out[f"{pieces}-{held}"] = (lay.position(), sorted(lay.held_ids(lay.position())[1].tolist()))
                next(lay.batches(0, int(lay.phase_start[lay.held * lay.pieces]) + 5))  # mid-epoch
                out[f"{pieces}-{held}-mid"] = "ok"
            except ConfigError as exc:
                out[f"{pieces}-{held}-error"] = str(exc)
    torch.save(out, Path(tmp) / f"rank{rank}.pt")


def test_checkpoints_from_before_pieces_resume_exactly_or_are_refused(epochs_w2):
    """{"held": s} (the whole-block rotation) is 1 piece: taken up as is under 1 piece. Under 2 pieces a block holds
    the same movies (so an epoch boundary's parts load), but a mid-epoch custody and step schedule are another
    P's: one clear line, at the position when it is past sub-epoch 0, else when the epoch would resume midway.
    (The 2 ranks ran ``_old_positions`` in the ``epochs_w2`` launch.)"""
    for r in range(2):
        got = torch.load(epochs_w2["old-positions"] / f"rank{r}.pt", weights_only=False)
        assert got["canonical1"] == got["canonical2"]  # the same movies per block, any P
        assert got["1-0"] == ({"held": 0, "phase": 0, "pieces": 1}, got["canonical1"])
        assert got["1-1"][0] == {"held": 1, "phase": 0, "pieces": 1} and got["1-1"][1] != got["canonical1"]
        assert got["1-0-mid"] == got["1-1-mid"] == "ok"
        assert got["2-0"] == ({"held": 0, "phase": 0, "pieces": 2}, got["canonical2"])
        for key in ("2-0-error", "2-1-error"):
            assert got[key].startswith("the checkpoint stopped mid-epoch with --train.block_pieces 1 (this run: 2); "
                                       "resume with --train.block_pieces 1"), key


def test_checkpoint_from_before_parts_is_refused_for_training_and_read_by_the_tools(small_data, tmp_path):
    """A run written before table parts existed (whole tables in the checkpoint): resuming is one clear error,
    recommend/analyze/export still load its model."""
    from mfscale.model import BiasedMF
    from mfscale.runs import load_run

    data = Dataset(small_data)
    model = BiasedMF(data.n_users, data.n_items, 4, init_std=0.1)
    state = {"model": model.state_dict(), "config": {"data": {"path": str(small_data)}}, "global_step": 7,
             "model_shape": {"n_users": data.n_users, "n_items": data.n_items, "dim": 4},
             "data_fingerprint": data.fingerprint, "step_in_epoch": 0}
    checkpoint.save_checkpoint(tmp_path / "old", state, step=7, is_best=True)
    with pytest.raises(ConfigError, match="written by an older mfscale"):
        Trainer(job(small_data, tmp_path / "old", model__dim=4), DistEnv(0, 1, 0, CPU)).resume()
    run_ = load_run(tmp_path / "old")
    assert torch.equal(run_.model.items.weight, model.items.weight) and run_.step == 7


def test_blocks_collectives_per_epoch_grow_with_ranks_not_steps(small_data, tmp_path):
    """Under blocks the ranks meet only at sub-epoch ends: per epoch W sync points (reconcile the global bias,
    sum the loss (log_every 1: at each of them), vote on stopping), W block rotations (P point-to-point
    exchanges each, overlapped with training), and validation's 2;
    whatever the number of steps. Each rank's start-up read is counted in metrics.json too: its own user
    buckets' ratings (user, movie, rating: 12 bytes each), about half the training split each."""
    got = {}
    batches = (50, 200)
    runs = _torchrun_together([["--data", str(small_data), "--run-dir", str(tmp_path / f"b{batch}"), "--batch-size",
                                str(batch), "--epochs", "2", "--train.ranking_k", "0", "--train.tables", "blocks",
                                "--train.log_every", "1", "--train.block_pieces", "2"] for batch in batches], 2)
    for batch, r in zip(batches, runs, strict=True):
        assert r.returncode == 0, r.stderr[-3000:]
        got[batch] = json.loads((tmp_path / f"b{batch}" / "metrics.json").read_text())
    assert got[50]["steps"] > 3 * got[200]["steps"]
    for m in got.values():
        # W sync points x 3, W rotations in P = 2 pieces (one send/recv each), validation's 2
        assert m["collectives_per_epoch"] == 3 * 2 + 2 * 2 + 2
        assert m["collectives_by_kind"]["send_recv"] == 2 * 2 * 2  # W x P per epoch, 2 epochs
        decoded, n_train = m["decoded_bytes_per_rank"], Dataset(small_data).split_rows("train")
        per = 16  # user, movie, rating, timestamp (for the user-day biases, on by default)
        assert sum(decoded) == per * n_train and max(decoded) <= 1.1 * per * n_train / 2, decoded

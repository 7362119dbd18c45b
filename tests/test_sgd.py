"""``--optim.optimizer sgd``: one plain SGD update per rating (the C++ op ``mfscale::sgd_step``), checked against a
NumPy loop written from the documented update (``mfscale/csrc/fused_step.cpp``, ``cpu_step.sgd_step``), on one
thread: the op's threads update shared rows without locks (Hogwild), so only one thread repeats exactly.

- the op alone: every term (biases, the user-day biases and their reg_day / n, plain MF), its returned sums;
- the blocks layout on two ranks (DSGD: each rank updates the rows of its stratum) against the same loop fed each
  rank's batches, with the global bias's per-rank Adam copies averaged at the sync points;
- a job end to end: fits the synthetic structure, resumes exactly, and refuses what it cannot run in one line.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mfscale import checkpoint, config, cpu_step
from mfscale.distributed import DistEnv
from mfscale.errors import ConfigError
from mfscale.shards import Dataset
from mfscale.step import SgdStep
from mfscale.train import run

from .test_layout import global_bias_step, run_ranks
from .test_train import job

try:
    cpu_step.load()
    HAVE_OP = True
except cpu_step.KernelUnavailable:
    HAVE_OP = False
needs_op = pytest.mark.skipif(not HAVE_OP, reason="the C++ op could not be built here (no compiler)")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def numpy_sgd(p: np.ndarray, q: np.ndarray, user, item, rating, mu: float, lr: float, reg_f: float, reg_b: float,
              biases: bool, day: tuple[np.ndarray, np.ndarray, np.ndarray, float] | None = None) -> tuple[float, float]:
    """The documented update, rating by rating in batch order, float64, in place: e = prediction - rating;
    p -= lr (e q + reg_f p), q -= lr (e p_old + reg_f q), b -= lr (e + reg_b b) for both biases, and the user-day
    bias b -= lr (e + reg_day / n b) (``day`` = (biases, each rating's key index or -1, n per key, reg_day))."""
    d = p.shape[1] - 1
    e_sum = e_sq = 0.0
    for k in range(len(user)):
        u, i = int(user[k]), int(item[k])
        at = int(day[1][k]) if day is not None else -1
        b_day = day[0][at] if at >= 0 else 0.0
        e = mu + p[u, :d] @ q[i, :d] + (p[u, d] + q[i, d] if biases else 0.0) + b_day - float(rating[k])
        e_sum, e_sq = e_sum + e, e_sq + e * e
        pu, qi = p[u, :d].copy(), q[i, :d].copy()
        p[u, :d] = pu - lr * (e * qi + reg_f * pu)
        q[i, :d] = qi - lr * (e * pu + reg_f * qi)
        if biases:
            p[u, d] -= lr * (e + reg_b * p[u, d])
            q[i, d] -= lr * (e + reg_b * q[i, d])
        if at >= 0:
            day[0][at] = b_day - lr * (e + day[3] / day[2][at] * b_day)
    return e_sum, e_sq


@needs_op
@pytest.mark.parametrize(("biases", "days"), [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("d", [6, 32, 64, 128])  # 6: the op's loop for any width; the others compiled for theirs
def test_sgd_op_equals_numpy_from_its_definition(one_thread, biases, days, d):
    """Repeated users and movies within the batch (each rating sees the rows its predecessors updated), a day row
    that is "missing" (predicts with 0 and never moves), float64."""
    rng = np.random.default_rng(0)
    n_u, n_i, n = 40, 25, 600
    std = 0.3 * (6 / d) ** 0.5  # the same scale of dot products at every width
    p0, q0 = rng.normal(0, std, (n_u, d + 1)), rng.normal(0, std, (n_i, d + 1))
    if not biases:
        p0[:, d] = q0[:, d] = 0.0
    user, item = rng.integers(0, n_u, n), rng.integers(0, n_i, n)
    rating = rng.integers(1, 11, n) / 2.0
    mu, lr, reg_f, reg_b, reg_day = (3.4 if biases else 0.0), 0.03, 0.05, 0.02, 7.0
    n_days = 30
    rows = rng.integers(0, n_days + 1, n)  # n_days: the "missing" row
    counts = np.bincount(rows, minlength=n_days + 1).astype(float)
    table = torch.zeros(n_days + 1, 4, dtype=torch.float64)
    table[:, 0] = torch.from_numpy(rng.normal(0, 0.2, n_days + 1))
    table[n_days, 0] = 0.0
    table[:n_days, 2] = torch.from_numpy(1.0 / np.maximum(counts[:n_days], 1))
    table[:, 3] = float("nan")
    before = table.clone()
    ref_day = (table[:, 0].numpy().copy(), np.where(rows == n_days, -1, rows), np.maximum(counts, 1), reg_day)

    P, Q = torch.from_numpy(p0.copy()), torch.from_numpy(q0.copy())
    got = cpu_step.sgd_step(P, Q, torch.from_numpy(user), torch.from_numpy(item), torch.from_numpy(rating), mu, lr,
                            reg_f, reg_b, biases=biases,
                            days=(table, torch.from_numpy(rows), reg_day) if days else None)
    p, q = p0.copy(), q0.copy()
    want = numpy_sgd(p, q, user, item, rating, mu, lr, reg_f, reg_b, biases, ref_day if days else None)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    np.testing.assert_allclose(P.numpy(), p, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(Q.numpy(), q, rtol=1e-10, atol=1e-12)
    assert not np.allclose(P.numpy(), p0)
    if not biases:  # plain MF: the bias columns stay 0
        assert (P[:, d] == 0).all() and (Q[:, d] == 0).all()
    if days:
        np.testing.assert_allclose(table[:, 0].numpy(), ref_day[0], rtol=1e-10, atol=1e-12)
        assert table[n_days, 0] == 0.0 and not torch.equal(table[:n_days, 0], before[:n_days, 0])
        # the columns it must not touch: RMSprop state, 1 / n, scratch
        assert torch.equal(table[:, 1:3], before[:, 1:3]) and torch.isnan(table[:, 3]).all()
    else:
        torch.testing.assert_close(table, before, rtol=0, atol=0, equal_nan=True)


@needs_op
def test_sgd_op_refuses_out_of_range_ids():
    P, Q = torch.zeros(3, 4), torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="sgd_step: item id out of range"):
        cpu_step.sgd_step(P, Q, torch.tensor([0]), torch.tensor([2]), torch.tensor([4.0]), 3.5, 0.01, 0.0, 0.0)


def sgd_blocks_reference(ranks: list[dict], cfg: config.JobConfig, initial: dict[str, np.ndarray],
                         day_index: dict[int, int], day_n: np.ndarray) -> dict[str, np.ndarray]:
    """Blocks + sgd written out from the config: each step, each rank's batch rating by rating (numpy_sgd; the ranks'
    rows are disjoint within a step), and per rank a copy of the global bias stepped by Adam on W x 2 (sum of e) / G,
    the copies and their moments averaged at the sync points (as the other steps' reference, test_layout)."""
    o, w = cfg.optim, len(ranks)
    p, q = initial["users.weight"].copy(), initial["items.weight"].copy()
    day_b = np.zeros(len(day_n))
    bias = np.full(w, float(initial["global_bias"]))
    bias_m, bias_v = np.zeros(w), np.zeros(w)
    sync = set(ranks[0]["sync_steps"])
    for t, step in enumerate(zip(*(r["batches"] for r in ranks), strict=True), start=1):
        g_rows = step[0]["global_rows"]
        g_bias = np.zeros(w)
        for r, b in enumerate(step):
            rows = np.array([day_index[int(k)] for k in b["day"]])
            e_sum, _ = numpy_sgd(p, q, b["user"], b["item"], b["rating"].astype(np.float64), bias[r], o.lr,
                                 o.reg_factor, o.reg_bias, True, (day_b, rows, day_n, o.reg_day))
            g_bias[r] = w * 2 * e_sum / g_rows
        bias, bias_m, bias_v = global_bias_step(bias, bias_m, bias_v, g_bias, t, o.dense_lr, t in sync)
    return {"users": p, "items": q, "days": day_b, "bias": bias}


@needs_op
def test_sgd_blocks_on_two_ranks_equal_numpy_per_rating_sgd(small_data, tmp_path, monkeypatch):
    """DSGD: two ranks, blocks tables, user-day biases on (the default), one thread per rank. Each rank's rows, its
    users' day biases and its global bias equal the reference; only the rows travel (no optimizer state)."""
    from mfscale.daybias import day_key
    from mfscale.distributed import DistEnv as Env
    from mfscale.train import Trainer

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks' threads: one, so they repeat exactly
    cfg = job(small_data, tmp_path / "a", train__batch_size=97, optim__optimizer="sgd", optim__lr=0.02,
              train__seed=3, optim__schedule="none", train__tables="blocks", train__block_pieces=2)
    (ranks,) = run_ranks([cfg], 2, tmp_path)
    data = Dataset(small_data)
    torch.set_default_dtype(torch.float64)
    try:
        initial = Trainer(config.replace(cfg, train__tables="replicated"), Env(0, 1, 0, torch.device("cpu"))).model
    finally:
        torch.set_default_dtype(torch.float32)
    start = {k: v.detach().numpy() for k, v in initial.state_dict().items()}
    train = data.read_split("train")
    keys, counts = np.unique(day_key(train["user"], train["timestamp"]), return_counts=True)
    want = sgd_blocks_reference(ranks, cfg, start, {int(k): j for j, k in enumerate(keys)}, counts.astype(float))
    assert ranks[0]["local_bias"] and len(ranks[0]["sync_steps"]) == 2
    for r, rank in enumerate(ranks):
        t = rank["tensors"]
        for name in ("users", "items"):
            assert sorted(k for k in t if k.startswith(f"{name}.")) == [f"{name}.ids", f"{name}.weight"]  # no state
            np.testing.assert_allclose(t[f"{name}.weight"], want[name][t[f"{name}.ids"]], rtol=1e-7, atol=1e-10,
                                       err_msg=f"rank {r} {name}")
        pos = np.searchsorted(keys, t["days.ids"])
        np.testing.assert_allclose(t["days.weight"], want["days"][pos], rtol=1e-7, atol=1e-10, err_msg=f"rank {r}")
        np.testing.assert_allclose(t["global_bias"], want["bias"][r], rtol=1e-9, err_msg=f"rank {r} global bias")
    assert np.abs(want["days"]).max() > 0
    # each movie row travels once per epoch per rank, alone: dim + 1 float64
    assert {r["bytes_sent"] for r in ranks} == {data.n_items * (cfg.model.dim + 1) * 8}


@needs_op
def test_a_job_trains_with_sgd_fits_the_structure_and_resumes_exactly(small_data, tmp_path, one_thread):
    """Eight epochs in one go equal five, a restart and three more (no schedule: a cosine spans the run), and the
    fit is within 0.03 of the default optimizer's on this rank-3 data (0.3 noise before rounding). Plain SGD grows
    factors from a small init slowly on 32 ratings per user (at lr 0.02, init 0.01: 0.67 against 0.44), hence the
    larger step and init here."""
    def cfg(run_dir, **kw):
        return job(small_data, run_dir, optim__optimizer="sgd", optim__lr=0.05, model__init_std=0.1,
                   train__batch_size=128, optim__schedule="none", **kw)

    whole = run(cfg(tmp_path / "whole", train__epochs=8))
    run(cfg(tmp_path / "split", train__epochs=5))
    split = run(cfg(tmp_path / "split", train__epochs=8))
    assert split["test_rmse"] == whole["test_rmse"]
    default = run(job(small_data, tmp_path / "default", train__batch_size=128, train__epochs=8))
    assert whole["test_rmse"] < default["test_rmse"] + 0.03, (whole["test_rmse"], default["test_rmse"])
    state, path = checkpoint.load_latest(tmp_path / "split")
    assert state["config"]["optim"]["optimizer"] == "sgd"
    assert "users.row_sq" not in checkpoint.assemble(path, state, optimizer=True)


@pytest.mark.parametrize(("flags", "blocker"), [
    ({"model__dropout": 0.1}, "model.dropout > 0"), ({"model__max_norm": 1.0}, "model.max_norm > 0"),
    ({"train__step": "autograd"}, "train.step autograd"), ({"train__cpu_kernel": "off"}, "train.cpu_kernel off"),
    ({"optim__gravity": 0.1}, "optim.gravity > 0")])
def test_sgd_with_what_it_cannot_run_is_one_config_error(tmp_path, flags, blocker):
    with pytest.raises(ConfigError, match=f"--optim.optimizer sgd .* cannot be used with {blocker}"):
        job(Path(tmp_path), tmp_path / "r", optim__optimizer="sgd", **flags)


def test_sgd_on_a_gpu_or_replicated_ranks_is_one_config_error():
    """No torch-ops form: on a GPU, or where ranks exchange summed row gradients, the step says what to use."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    layout = types.SimpleNamespace(rows_complete=True)
    with pytest.raises(ConfigError, match="on a GPU use --optim.optimizer row_rmsprop"):
        SgdStep(DistEnv(0, 1, 0, cuda), layout, None, None)
    with pytest.raises(ConfigError, match="needs one process or --train.tables blocks"):
        SgdStep(DistEnv(0, 2, 0, cpu), types.SimpleNamespace(rows_complete=False), None, None)


@needs_op
def test_sgd_warns_of_a_learning_rate_meant_for_row_rmsprop_but_not_on_resume(small_data, tmp_path, capsys):
    """--optim.lr 0.003 (RowRMSprop's default) with sgd: one warning. A run started at 0.05 and resumed with flags
    that leave --optim.lr at its default trains at the checkpoint's 0.05: no warning."""
    run(job(small_data, tmp_path / "low", optim__optimizer="sgd", train__batch_size=512, train__epochs=1))
    assert "--optim.optimizer sgd with --optim.lr 0.003: per-rating steps want about 0.03" in capsys.readouterr().err
    run(job(small_data, tmp_path / "r", optim__optimizer="sgd", optim__lr=0.05, train__batch_size=512,
            train__epochs=1))
    run(job(small_data, tmp_path / "r", optim__optimizer="sgd", train__batch_size=512, train__epochs=2))
    assert "per-rating steps want" not in capsys.readouterr().err

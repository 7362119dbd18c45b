"""RowRMSprop (``--optim.optimizer row_rmsprop``): its update against NumPy written from the documented formula,
a job trained and resumed with it end to end (keeping its optimizer); its state across a save and load is in
tests/test_optim.py.
The C++ step's version is checked against this one in tests/test_cpu_step.py and both layouts on 2 ranks against
a NumPy reference of the whole step in tests/test_layout.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mfscale import checkpoint
from mfscale.errors import ConfigError
from mfscale.optim import RowRMSprop
from mfscale.train import run

from .test_optim import SHAPES, float64, sparse_grads, tables, train  # noqa: F401 (float64: a fixture)
from .test_train import job

LR, BETA2, EPS = 0.05, 0.95, 1e-6  # test_optim.train's settings


def numpy_row_rmsprop(steps: int, schedule: bool) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """The update from its definition (optim's docstring), float64, on test_optim's gradients: duplicate rows
    summed, a table without gradient not stepped, an empty gradient counted as a step."""
    params = [p.detach().numpy().astype(np.float64).copy() for p in tables()]
    state = [np.zeros((n, 2)) for n, _ in SHAPES]
    count = [0, 0]
    for s in range(steps):
        lr = LR / (1 + 0.3 * s) if schedule else LR
        for k, g in enumerate(sparse_grads(s)):
            if g is None:
                continue
            count[k] += 1
            n, w = SHAPES[k]
            summed = np.zeros((n, w))
            np.add.at(summed, g._indices()[0].numpy(), g._values().numpy())
            rows = np.unique(g._indices()[0].numpy())
            if not len(rows):
                continue
            gr = summed[rows]
            d = w - 1
            sq = np.c_[(gr[:, :d] ** 2).mean(1), gr[:, d] ** 2]
            state[k][rows] += (sq - state[k][rows]) * (1 - BETA2)
            size = lr * np.sqrt(1 - BETA2 ** count[k])
            denom = np.sqrt(state[k][rows]) + EPS
            params[k][rows, :d] -= size * gr[:, :d] / denom[:, :1]
            params[k][rows, d] -= size * gr[:, d] / denom[:, 1]
    return params, state, count


@pytest.mark.parametrize("schedule", [False, True])
def test_row_rmsprop_equals_numpy_from_its_definition(float64, schedule):  # noqa: F811 (the fixture)
    got, opt, _ = train(RowRMSprop, 30, schedule=schedule)
    want, want_state, want_count = numpy_row_rmsprop(30, schedule)
    for p, ref, init in zip(got, want, tables(), strict=True):
        assert not torch.equal(p, init)
        np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-12, atol=1e-14)
    for st, ref, n in zip(opt.state.values(), want_state, want_count, strict=True):
        assert st["step"] == n and sorted(st) == ["row_sq", "step"] and st["row_sq"].shape[1] == 2
        np.testing.assert_allclose(st["row_sq"].numpy(), ref, rtol=1e-12, atol=1e-16)


def test_a_job_trains_with_row_rmsprop_resumes_exactly_and_keeps_its_optimizer(small_data, tmp_path, capsys):
    """Two epochs in one go equal one epoch, a restart, and one more (no schedule: a cosine spans the run); the
    checkpoint holds two floats of state per row. A restart whose flags name the other optimizer keeps the one
    the run started with, with a warning, both ways: a RowRMSprop run asked for Adam, and a run started with Adam
    (as every run before RowRMSprop became the default) resumed with today's defaults."""
    def cfg(run, optimizer="row_rmsprop", **kw):
        return job(small_data, run, optim__optimizer=optimizer, train__batch_size=128, optim__schedule="none", **kw)

    for started, then in (("row_rmsprop", "lazy_adam"), ("lazy_adam", "row_rmsprop")):
        whole = run(cfg(tmp_path / f"whole-{started}", started, train__epochs=2))
        run(cfg(tmp_path / f"split-{started}", started, train__epochs=1))
        capsys.readouterr()
        split = run(cfg(tmp_path / f"split-{started}", then, train__epochs=2))
        assert f"keeps the tables' optimizer it started with, {started}, not {then}" in capsys.readouterr().err
        assert split["test_rmse"] == whole["test_rmse"] and whole["test_rmse"] < 1.2
        state, path = checkpoint.load_latest(tmp_path / f"split-{started}")
        assert state["config"]["optim"]["optimizer"] == started
        tables_ = checkpoint.assemble(path, state, optimizer=True)
        if started == "row_rmsprop":
            assert tables_["users.row_sq"].shape[1] == 2 and "users.exp_avg" not in tables_
            assert not torch.isnan(tables_["items.row_sq"]).any()
        else:
            assert "users.exp_avg_sq" in tables_ and "users.row_sq" not in tables_


def test_a_resume_whose_flags_conflict_with_the_started_optimizer_is_one_clear_error(small_data, tmp_path):
    """A run started with SparseAdam keeps it on resume; with ``--train.step fused`` (which SparseAdam cannot
    run) that is the config's own one-line error, not a traceback from the step."""
    run(job(small_data, tmp_path, optim__optimizer="sparse_adam", train__batch_size=128, train__epochs=1))
    with pytest.raises(ConfigError, match="--train.step fused cannot be used with optim.optimizer sparse_adam"):
        run(job(small_data, tmp_path, train__batch_size=128, train__epochs=2, train__step="fused"))


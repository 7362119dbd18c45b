"""User-day biases (``--model.day_bias``, mfscale/daybias.py): the lookup and its "no such day" row, a signal they
find where the data has one, every step kind agreeing, and runs resumed exactly, keeping the setting they started
with. Their step against a NumPy reference written from the config, on 1-3 ranks of both layouts, is in
tests/test_layout.py."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mfscale import checkpoint, prepare
from mfscale.daybias import DAY_SECONDS, DayBias, day_key
from mfscale.shards import find_sorted
from mfscale.train import run

from .test_optim import float64  # noqa: F401 (a fixture)
from .test_train import job


def test_rows_find_each_users_days_and_a_missing_day_predicts_without_a_bias():
    user = np.array([3, 3, 3, 7, 7])
    ts = np.array([0, 100, DAY_SECONDS * 5 + 7, 40, DAY_SECONDS * 2])
    days = DayBias(day_key(user, ts))
    assert len(days.keys) == 4  # user 3: days 0 and 5; user 7: days 0 and 2
    rows = days.rows(user, ts)
    assert rows[0] == rows[1] and len(set(rows.tolist())) == 4 and rows.max() < days.missing
    # another user's day, or a day of this user without training ratings: the empty row, bias 0
    unseen = days.rows(np.array([3, 7, 9]), np.array([DAY_SECONDS * 2, DAY_SECONDS * 5, 0]))
    assert (unseen == days.missing).all()
    ids = torch.tensor([rows[0], days.missing])
    days.update(ids, torch.tensor([0.5, 0.5]), torch.tensor([2.0, 1.0]), lr=0.1, beta2=0.9, eps=1e-8, l2=0.0)
    assert days.value[rows[0]] < 0 and days.value[days.missing] == 0  # the empty row never moves
    assert torch.equal(days.offset(torch.from_numpy(unseen)), torch.zeros(3))


def _sessions_csv(path: Path, n_users: int = 150, n_items: int = 120, days: int = 4, per_day: int = 15,
                  seed: int = 0) -> Path:
    """ratings.csv where each user rates in a few sessions (days) and a session moves all its ratings by an offset
    N(0, 0.5): mean + biases + <p, q> + offset + N(0, 0.3), rounded to half stars."""
    rng = np.random.default_rng(seed)
    p, q = rng.normal(0, 0.5, (n_users, 2)), rng.normal(0, 0.5, (n_items, 2))
    bu, bi = rng.normal(0, 0.3, n_users), rng.normal(0, 0.3, n_items)
    lines = ["userId,movieId,rating,timestamp"]
    for u in range(n_users):
        items = rng.choice(n_items, days * per_day, replace=False)
        for k, i in enumerate(items):
            day = k // per_day
            offset = np.random.default_rng([seed, u, day]).normal(0, 0.5)
            score = 3.3 + bu[u] + bi[i] + p[u] @ q[i] + offset + rng.normal(0, 0.3)
            ts = 1_200_000_000 + (u * 50 + day * 7) * DAY_SECONDS + k * 60
            lines.append(f"{u + 1},{i + 1},{np.clip(np.round(score * 2) / 2, 0.5, 5.0):.1f},{ts}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def session_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sessions")
    out = root / "data"
    assert prepare.main(["--input", str(_sessions_csv(root / "ratings.csv")), "--out", str(out), "--quiet"]) == 0
    return out


def test_find_sorted_agrees_with_a_dict_lookup():
    """The one sorted-id lookup (day keys, checkpoint parts, recommend): position and found flag of every id, against
    a Python dict; ids not there, a read-only table (Arrow's, memory maps), int32 ids and an empty table."""
    rng = np.random.default_rng(0)
    table = np.unique(rng.integers(0, 1 << 40, 5000))
    ids = np.concatenate([rng.choice(table, 3000), rng.integers(0, 1 << 40, 2000), [0, table[0], table[-1], 1 << 41]])
    where = {int(k): r for r, k in enumerate(table)}
    table.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy warns on a read-only array: it is copied first
        pos, found = find_sorted(table, ids)
    assert found.tolist() == [int(x) in where for x in ids]
    assert (pos[found] == [where[int(x)] for x in ids[found]]).all()
    assert ((pos >= 0) & (pos < len(table))).all()  # a miss still indexes the table
    pos, found = find_sorted(np.array([2, 5, 9], np.int32), np.array([5, 4, 9, 10], np.int32))
    assert pos.tolist()[::2] == [1, 2] and found.tolist() == [True, False, True, False]
    pos, found = find_sorted(np.empty(0, np.int64), np.array([1, 2]))
    assert not found.any() and len(pos) == 2


def test_day_biases_find_a_session_signal_and_every_step_kind_agrees(session_data, tmp_path):
    """Where ratings move with the day they were made (by N(0, 0.5) a day, over noise 0.3 and half-star rounding),
    the biases take part of that out of the test error, more with less damping (reg_day 30 against 12 training
    ratings a day keeps about a third of a day's mean error). The C++ step, the torch-ops step and autograd train
    the same model."""
    def fit(name, **kw):
        return run(job(session_data, tmp_path / name, train__epochs=30, train__patience=0, **kw))["test_rmse"]

    on, off, light = fit("on"), fit("off", model__day_bias=False), fit("light", optim__reg_day=1.0)
    assert on < off - 0.05 and light < on - 0.02, (on, off, light)
    assert abs(fit("eager", train__cpu_kernel="off") - on) < 1e-4
    assert abs(fit("autograd", train__step="autograd") - on) < 1e-4


def test_runs_resume_exactly_and_keep_the_day_bias_setting_they_started_with(small_data, tmp_path, capsys):
    """Two epochs in one go equal one, a restart and one more, with the biases and without; a restart whose flags
    say otherwise keeps what the run started with, with a warning, both ways (a run from before the biases existed
    resumes without them). The checkpoint carries every training (user, day) once."""
    def cfg(name, day_bias, **kw):
        return job(small_data, tmp_path / name, model__day_bias=day_bias, train__batch_size=128,
                   optim__schedule="none", **kw)

    train = prepare_keys(small_data)
    for started in (True, False):
        whole = run(cfg(f"whole-{started}", started, train__epochs=2))
        run(cfg(f"split-{started}", started, train__epochs=1))
        capsys.readouterr()
        split = run(cfg(f"split-{started}", not started, train__epochs=2))
        on_off = {True: "on", False: "off"}
        assert (f"keeps --model.day_bias {on_off[started]}, as it started, not {on_off[not started]}"
                in capsys.readouterr().err)
        assert split["test_rmse"] == whole["test_rmse"] and whole["test_rmse"] < 1.2
        state, path = checkpoint.load_latest(tmp_path / f"split-{started}")
        assert state["config"]["model"]["day_bias"] is started
        parts = [checkpoint.read_part(p, d) for p, d in checkpoint.part_paths(path, state)]
        if started:
            keys = np.sort(np.concatenate([p.days.ids.numpy() for p in parts]))
            assert np.array_equal(keys, train) and all(p.days.state["sq"].shape[1] == 1 for p in parts)
        else:
            assert all(p.days is None for p in parts)


def prepare_keys(data: Path) -> np.ndarray:
    from mfscale.shards import Dataset

    train = Dataset(data).read_split("train")
    return np.unique(day_key(train["user"], train["timestamp"]))


@pytest.mark.parametrize("major", ["users", "items"])
def test_the_cpp_op_steps_the_day_biases_as_torch_ops_do(float64, major):  # noqa: F811 (the fixture)
    """The C++ table step with the biases inside (their targets read with each rating, their step in the pass when
    users are the major side, at the op's end when movies are) against the torch-ops path (targets, the table step's
    errors, ``DayBias.update``), float64, three steps: one where the batch touches more users than movies, one more
    movies than users."""
    from mfscale import cpu_step
    from mfscale.daybias import group

    from .test_cpu_step import adam, twin_models

    g = torch.Generator().manual_seed(1)
    n_users, n_items = 60, 40
    users_of = n_users - 5 if major == "users" else 4  # few users: movies are the major side
    days_of = torch.randint(0, 3, (n_users * 3,), generator=g)
    key_user = np.repeat(np.arange(n_users), 3)
    keys = day_key(key_user, days_of.numpy() * DAY_SECONDS)
    models = twin_models(torch.float64, n_users, n_items)
    days = [DayBias(keys), DayBias(keys)]
    opts = [adam(m, 0.05, "row_rmsprop") for m in models]
    reg = torch.full((models[0].dim + 1,), 0.02, dtype=torch.float64)
    lr, beta2, eps, reg_day = 0.05, 0.999, 1e-8, 3.0
    for _ in range(3):
        n = 300
        user = torch.randint(0, users_of, (n,), generator=g)
        item = torch.randint(0, n_items, (n,), generator=g)
        rating = torch.rand(n, generator=g, dtype=torch.float64) * 4 + 1
        ts = torch.randint(0, 3, (n,), generator=g).numpy() * DAY_SECONDS
        rows = [torch.from_numpy(d.rows(user.numpy(), ts)) for d in days]
        assert (rows[0] < days[0].missing).sum() > n // 2  # most ratings have a day among the keys
        l2 = 2 * reg_day / n
        # torch ops: the table step on rating - b, then the biases from its errors
        model, opt, d = models[0], opts[0], days[0]
        gu, gi, _, _, err = model.closed_form_grads(user, item, d.targets(rows[0], rating), n, return_errors=True)
        opt.step(rows=[(t.ids, t.rows, t.counts.to(reg.dtype), reg * (2.0 / n)) for t in (gu, gi)])
        ids, grad, counts = group(rows[0], err * (2.0 / n), len(d.value))
        d.update(ids, grad, counts, lr=lr, beta2=beta2, eps=eps, l2=l2)
        # the op
        model, opt, d = models[1], opts[1], days[1]
        tables = [p.detach() for p in model.sparse_parameters()]

        def update(steps, user=user, item=item, rating=rating, n=n, d=d, r=rows[1], l2=l2, model=model,
                   tables=tables):
            (su, lu), (si, li) = steps
            cpu_step.fused_step(*tables, (su["row_sq"], None), (si["row_sq"], None), user, item, rating,
                                float(model.global_bias.detach()), 2.0 / n, reg * (2.0 / n), (lu, li), (0.9, beta2),
                                eps, {}, row_wise=True, days=d.op_args(r, lr=lr, beta2=beta2, l2=l2))

        opt.step(update=update)
        assert (user.unique().numel() >= item.unique().numel()) == (major == "users")
    for a, b in zip(models[0].sparse_parameters(), models[1].sparse_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert days[0].steps == days[1].steps == 3 and days[0].value.abs().max() > 0
    for a, b in ((days[0].value, days[1].value), (days[0].sq, days[1].sq)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert torch.isnan(days[1].table[:, 3]).all()  # every scratch back to "not touched"

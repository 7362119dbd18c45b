"""Time-aware biases (``--model.time_bins``, ``--model.user_drift``; mfscale/timebias.py): the bins and the drift
as documented, a signal they find where the data has one, every step kind agreeing, runs resumed exactly and
keeping the setting they started with, and the export predicting as the job does. Their step against a NumPy
reference written from the config, on 2 ranks of the blocks layout (the bins rotating with their movies), is in
tests/test_layout.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mfscale import checkpoint, export, prepare
from mfscale.errors import ConfigError
from mfscale.runs import load_run
from mfscale.shards import DAY_SECONDS, Dataset
from mfscale.timebias import TimeBias, user_mean_days
from mfscale.train import run

from .test_train import job

DAYS = 1000  # the span of the drifting data's ratings


def test_bins_and_drift_follow_the_documented_formulas():
    """bin(t) = clip((day - first) B // (last - first + 1), 0, B - 1) (days outside the span in the end bins) and
    dev_u(t) = sign(day - t_u) |day - t_u|^0.4, written out here from the module's text; t_u is the mean day of the
    user's ratings (0 without any)."""
    mean = user_mean_days(np.array([0, 0, 2]), np.array([10, 21, 40]), 4)
    assert mean.tolist() == [15.5, 0.0, 40.0, 0.0]
    t = TimeBias(4, 3, 7, True, first=10, last=40, mean_day=mean, user_count=np.array([2, 0, 1, 0]),
                 dtype=torch.float64)
    day = torch.tensor([10, 14, 15, 40, 41, 3, 100, 25])
    want = [min(max((x - 10) * 7 // 31, 0), 6) for x in day.tolist()]
    assert t.bin_of(day).tolist() == want and want[:5] == [0, 0, 1, 6, 6]
    user = torch.tensor([0, 0, 2, 2, 1, 0, 2, 3])
    item = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    feats = t.rating_features(user.numpy(), day.numpy())
    assert feats["time_bin"].tolist() == want
    dev = feats["time_dev"].astype(np.float64)
    x = day.numpy() - mean[user.numpy()]
    np.testing.assert_allclose(dev, np.sign(x) * np.abs(x) ** 0.4, rtol=1e-6)  # float32 in the batches, as ratings
    t.bin_view(t.bins)[:, :, 0] = torch.arange(21, dtype=torch.float64).reshape(3, 7)  # movie i, bin b: 7 i + b
    t.users[:, 0] = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    rating = torch.full((8,), 3.0, dtype=torch.float64)
    want_target = [3.0 - (int(item[k]) * 7 + want[k]) - t.users[user[k], 0].item() * dev[k] for k in range(8)]
    for op in (True, False):  # the C++ op and torch ops
        got = t.target(user, item, *(torch.from_numpy(feats[k]) for k in ("time_bin", "time_dev")), rating, op)
        np.testing.assert_allclose(got.numpy(), want_target, rtol=1e-12)


def test_the_cpp_time_step_and_torch_ops_step_alike():
    """The C++ ``time_step`` (each rating's share added in batch order, then each touched row once) and the torch-ops
    step (a unique and an index_add, for replicas that sum their gradients first) give the same biases, RMSprop
    state and scratch (NaN again), float64, three steps of 400 ratings over few rows (many repeats)."""
    g = torch.Generator().manual_seed(0)
    tb = [TimeBias(30, 20, 6, True, first=0, last=99, mean_day=np.full(30, 50.0), user_count=np.arange(30),
                   dtype=torch.float64) for _ in range(2)]
    for t in tb:
        t.set_bin_counts(np.arange(20), np.arange(120).reshape(20, 6) % 7)
    for _ in range(3):
        user, item = torch.randint(0, 30, (400,), generator=g), torch.randint(0, 20, (400,), generator=g)
        feats = {k: torch.from_numpy(v) for k, v in tb[0].rating_features(user.numpy(), np.random.default_rng(
            int(torch.randint(0, 1000, (1,), generator=g))).integers(-5, 110, 400)).items()}
        err = torch.randn(400, generator=g, dtype=torch.float64)
        for t, op in zip(tb, (True, False), strict=True):
            t.update(user, item, feats["time_bin"], feats["time_dev"], err, global_rows=512, lr=0.05, beta2=0.9,
                     eps=1e-8, reg=30.0, reg_drift=300.0, op=op)
    for a, b in ((tb[0].bins, tb[1].bins), (tb[0].users, tb[1].users)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, equal_nan=True)
    assert tb[0].bin_view(tb[0].bins)[:, :, 0].abs().max() > 0 and tb[0].users[:, 0].abs().max() > 0
    assert torch.isnan(tb[0].bin_rows[:, 3]).all() and torch.isnan(tb[0].users[:, 3]).all()


def _drifting_csv(path: Path, n_users: int = 150, n_items: int = 120, per_user: int = 60, seed: int = 0) -> Path:
    """ratings.csv over DAYS days where each movie's bias moves linearly with time (slope N(0, 1.5) over the span)
    and each user's ratings drift as alpha_u dev_u(t), alpha N(0, 0.03): mean + biases + <p, q> + both + N(0, 0.3),
    rounded to half stars."""
    rng = np.random.default_rng(seed)
    p, q = rng.normal(0, 0.5, (n_users, 2)), rng.normal(0, 0.5, (n_items, 2))
    bu, bi, slope = rng.normal(0, 0.3, n_users), rng.normal(0, 0.3, n_items), rng.normal(0, 1.5, n_items)
    alpha = rng.normal(0, 0.03, n_users)
    lines = ["userId,movieId,rating,timestamp"]
    for u in range(n_users):
        items = rng.choice(n_items, per_user, replace=False)
        days = rng.integers(0, DAYS, per_user)
        x = days - days.mean()
        dev = np.sign(x) * np.abs(x) ** 0.4
        for i, day, d in zip(items, days, dev, strict=True):
            score = (3.3 + bu[u] + bi[i] + p[u] @ q[i] + slope[i] * (day / DAYS - 0.5) + alpha[u] * d
                     + rng.normal(0, 0.3))
            ts = 1_200_000_000 + int(day) * DAY_SECONDS + int(rng.integers(0, DAY_SECONDS))
            lines.append(f"{u + 1},{i + 1},{np.clip(np.round(score * 2) / 2, 0.5, 5.0):.1f},{ts}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def drift_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("drift")
    out = root / "data"
    assert prepare.main(["--input", str(_drifting_csv(root / "ratings.csv")), "--out", str(out), "--quiet"]) == 0
    return out


def test_time_biases_find_a_drift_signal_and_every_step_kind_agrees(drift_data, tmp_path):
    """Where movies' biases move with time and users drift, the bins and the drift take part of that out of the
    test error, each alone and more together; with the user-day biases on (the default) too. The C++ step (the
    errors written by the op), the torch-ops step and autograd train the same model."""
    def fit(name, **kw):
        base = dict(train__epochs=25, train__patience=0, model__day_bias=False)
        return run(job(drift_data, tmp_path / name, **(base | kw)))["test_rmse"]

    off = fit("off")
    bins, drift = fit("bins", model__time_bins=5), fit("drift", model__user_drift=True)
    both = fit("both", model__time_bins=5, model__user_drift=True)
    assert bins < off - 0.01 and drift < off - 0.03 and both < min(bins, drift) - 0.01, (off, bins, drift, both)
    days = dict(model__time_bins=5, model__user_drift=True, model__day_bias=True)
    on = fit("days", **days)
    assert on < off - 0.02, (on, off)
    assert abs(fit("eager", train__cpu_kernel="off", **days) - on) < 1e-4
    assert abs(fit("autograd", train__step="autograd", **days) - on) < 1e-4


def test_runs_resume_exactly_and_keep_the_time_setting_they_started_with(drift_data, tmp_path, capsys):
    """Two epochs in one go equal one, a restart and one more; a restart whose flags say otherwise keeps what the
    run started with, with a warning. The checkpoint carries each movie's bins and each user's drift, with the ids
    of the table rows."""
    def cfg(name, **kw):
        return job(drift_data, tmp_path / name, train__batch_size=256, optim__schedule="none", **kw)

    on = dict(model__time_bins=6, model__user_drift=True)
    whole = run(cfg("whole", train__epochs=2, **on))
    run(cfg("split", train__epochs=1, **on))
    capsys.readouterr()
    split = run(cfg("split", train__epochs=2))  # the flags left out: the run keeps its bins and drift
    err = capsys.readouterr().err
    assert "keeps --model.time_bins 6, as it started, not 0" in err and "keeps --model.user_drift True" in err
    assert split["test_rmse"] == whole["test_rmse"] and whole["test_rmse"] < 1.2
    state, path = checkpoint.load_latest(tmp_path / "split")
    (part,) = [checkpoint.read_part(p, d) for p, d in checkpoint.part_paths(path, state)]
    data = Dataset(drift_data)
    assert part.time["items"].weight.shape == (data.n_items, 6) and part.time["users"].weight.shape == (data.n_users, 1)
    assert torch.equal(part.time["items"].ids, part.tables["items"].ids)
    assert part.time["items"].weight.abs().max() > 0 and part.time["users"].weight.abs().max() > 0
    assert part.time["span"].tolist()[2] == 6


def test_export_predicts_with_the_time_biases_as_the_job_does(drift_data, tmp_path):
    """The export's files and its README's formula (meta.json's span) give the job's own test RMSE."""
    metrics = run(job(drift_data, tmp_path / "r", train__epochs=3, model__time_bins=8, model__user_drift=True))
    meta = export.export(load_run(tmp_path / "r"), tmp_path / "out")
    d = tmp_path / "out"
    assert meta["time_bias"]["bins"] == 8 and json.loads((d / "meta.json").read_text())["time_bias"] is not None
    assert "item_time_bias" in (d / "README.txt").read_text()
    arr = {n: np.load(d / f"{n}.npy") for n in ("user_factors", "item_factors", "user_bias", "item_bias",
                                               "global_mean", "user_ids", "item_time_bias", "user_drift",
                                               "user_mean_day", "user_day_user_ids", "user_day_days",
                                               "user_day_bias")}
    test = Dataset(drift_data).read_split("test")
    u, i = test["user"].astype(np.int64), test["item"].astype(np.int64)
    day = test["timestamp"].astype(np.int64) // 86400
    day_bias = dict(zip(zip(arr["user_day_user_ids"].tolist(), arr["user_day_days"].tolist(), strict=True),
                        arr["user_day_bias"].tolist(), strict=True))
    t = meta["time_bias"]
    b = np.clip((day - t["first_day"]) * t["bins"] // (t["last_day"] - t["first_day"] + 1), 0, t["bins"] - 1)
    x = day - arr["user_mean_day"][u]
    pred = (arr["global_mean"] + arr["user_bias"][u] + arr["item_bias"][i]
            + (arr["user_factors"][u] * arr["item_factors"][i]).sum(1)
            + np.array([day_bias.get((int(arr["user_ids"][a]), int(y)), 0.0) for a, y in zip(u, day, strict=True)])
            + arr["item_time_bias"][i, b] + arr["user_drift"][u] * np.sign(x) * np.abs(x) ** 0.4)
    rmse = float(np.sqrt(np.mean((np.clip(pred, 0.5, 5.0) - test["rating"]) ** 2)))
    assert abs(rmse - metrics["test_rmse"]) < 1e-5, (rmse, metrics["test_rmse"])


@pytest.mark.parametrize(("flags", "message"), [
    (dict(model__time_bins=4, model__biases=False), "need --model.biases on"),
    (dict(model__user_drift=True, optim__optimizer="sgd", optim__lr=0.03), "model.time_bins or model.user_drift"),
    (dict(model__time_bins=-1), "model.time_bins must be in"),
    (dict(model__time_bins=5, optim__reg_time=-1.0), "optim.reg_time"),
])
def test_settings_it_cannot_train_are_one_clear_line(small_data, tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        job(small_data, tmp_path, **flags)


def test_recommend_ranks_with_each_movies_latest_bin(drift_data, tmp_path, capsys):
    """Without a time, recommend scores with the movie's bias plus its last bin's (its latest popularity), and
    leaves the user drift out: the top-N printed is the order of mean + b_u + b_i + b_{i,last} + <p_u, q_i>."""
    from mfscale import recommend

    run(job(drift_data, tmp_path / "r", train__epochs=3, model__time_bins=4, model__user_drift=True))
    raw = load_run(tmp_path / "r")
    time = raw.time_biases()
    p, bu, q, bi = (t.detach().numpy().astype(np.float64) for t in raw.model.factors())
    latest = load_run(tmp_path / "r").at_latest_time()
    np.testing.assert_allclose(latest.model.factors()[3].detach().numpy(), bi + time["bins"][:, 3], rtol=1e-6)
    assert np.abs(time["bins"][:, 3]).max() > 0.01
    assert recommend.main(["--run", str(tmp_path / "r"), "--user", "7", "-k", "5"]) == 0
    out = capsys.readouterr().out
    u = raw.user_index(7)
    indptr, items = raw.train_pairs()
    seen = set(items[indptr[u]:indptr[u + 1]].tolist())
    score = float(raw.model.global_bias) + bu[u] + bi + time["bins"][:, 3] + q @ p[u]
    n_train = raw.movies["n_train"].to_numpy()
    order = [int(i) for i in np.argsort(-score) if int(i) not in seen and n_train[i] > 0][:5]
    want = [int(raw.movies["movie_id"][i]) for i in order]
    got = [int(line.split("[")[1].split("]")[0]) for line in out.splitlines() if "[" in line][:5]
    assert got == want, (got, want, out)


def test_two_ranks_equal_the_numpy_reference_and_one_process(drift_data, tmp_path):
    """Blocks on 2 ranks, the rotation in 2 pieces: every rank's rows, bins (which travel with their movies) and
    drift equal the NumPy reference written from the config (tests/test_layout.py: each term of the objective, the
    user-day biases too, every L2 weight), float64, one epoch. Replicated tables on 2 ranks (the biases' gradients
    summed over the ranks, torch ops) equal one process fed the union of their batches."""
    from .test_layout import assert_numpy_reference, assert_union_equal, row_floats, run_ranks

    base = dict(train__batch_size=97, optim__lr=0.02, train__seed=3, optim__schedule="none", model__time_bins=5,
                model__user_drift=True)
    cfg = job(drift_data, tmp_path / "a", **base, train__tables="blocks", train__block_pieces=2)
    replicated = job(drift_data, tmp_path / "b", **base, train__tables="replicated")
    ranks, replicas = run_ranks([cfg, replicated], 2, tmp_path)
    data = Dataset(drift_data)
    assert_union_equal(replicas, replicated, data)
    assert_numpy_reference(ranks, cfg, data)
    # a movie row travels with its 5 bins: their biases, state, 1 / count and scratch, 4 x 5 float64 more per movie
    assert {r["bytes_sent"] for r in ranks} == {data.n_items * (row_floats(cfg) + 4 * 5) * 8}


def test_blocks_resumed_inside_a_phase_end_as_if_uninterrupted(drift_data, tmp_path):
    """Blocks on 2 ranks in 2 pieces, both ranks crashed in phase (1, 1) of epoch 1 and resumed from the checkpoint
    written there (each rank holding a piece of another rank's block: its bins, their state and counts, and its
    implicit rows y in the slot it came to; the users' z and half-gathered z'): the run ends bit-identical to the
    uninterrupted one, its time-aware biases and implicit rows included (one crash for both options: a 2-rank
    launch costs more than a job's training; the reference and the crash share one, the resume has its own)."""
    from .test_layout import assert_crashed_inside, crash_then_resume
    from .test_train import assert_same_run

    argv = ["--workers", "0", "--batch-size", "64", "--epochs", "3", "--train.patience", "0",
            "--checkpoint.every_steps", "3", "--train.tables", "blocks", "--train.block_pieces", "2",
            "--model.time_bins", "5", "--model.user_drift", "on", "--model.implicit", "on"]
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    # the reference and the crash in one launch (the crash at epoch 1's step steps * 7 // 8 + 1, from the
    # reference's steps per epoch), the resume in a second
    states = crash_then_resume({"run": (["--data", str(drift_data), "--run-dir", str(run_dir), *argv],
                                        [str(ref_dir), 7, 8])},
                               [["--data", str(drift_data), "--run-dir", str(ref_dir), *argv]], tmp_path / "launches")
    assert_crashed_inside(states["run"], {"held": 1, "phase": 1, "pieces": 2})
    assert_same_run(ref_dir, run_dir, json.loads((ref_dir / "metrics.json").read_text()),
                    json.loads((run_dir / "metrics.json").read_text()))
    a, b = (checkpoint.time_biases(*reversed(checkpoint.load_latest(d))) for d in (ref_dir, run_dir))
    assert np.abs(a["bins"]).max() > 0 and np.abs(a["alpha"]).max() > 0
    for key in ("bins", "alpha", "mean_day"):
        assert np.array_equal(a[key], b[key]), key
    a, b = (checkpoint.implicit_rows(*reversed(checkpoint.load_latest(d))) for d in (ref_dir, run_dir))
    assert np.abs(a).max() > 0 and np.array_equal(a, b)

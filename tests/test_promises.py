"""README promises of the trainer: mid-epoch resume refusal, collective timeout, compile fallback, auto batch
size, learning-rate schedules, resident auto, cold-start predictions."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch

from mfscale import checkpoint, config, model, optim, stream
from mfscale import step as step_module
from mfscale.distributed import DistEnv
from mfscale.layout import auto_batch_size
from mfscale.monitor import read_scalars
from mfscale.runs import load_run
from mfscale.shards import Dataset
from mfscale.train import Trainer, main, run

from .conftest import as_rank, free_port, start_ranks, write_lowrank_csv
from .test_train import fail, job

CPU = torch.device("cpu")


def trainer_is_resident(tr: Trainer) -> bool:
    """Whether the trainer holds the training split in memory (an internal: adapt here if it moves)."""
    return tr.layout.resident


def test_mid_epoch_resume_with_another_batch_or_world_size_is_refused(odd_data, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "r"
    args = ["--data", str(odd_data), "--run-dir", str(run_dir), "--workers", "0", "--batch-size", "256",
            "--epochs", "2", "--checkpoint.every_steps", "5", "--train.ranking_k", "0"]
    original = Trainer.train_step

    def crashing(self, batch):
        if self.progress.global_step == 7:  # mid-epoch 0 (10 steps), after the step-5 checkpoint
            raise RuntimeError("simulated crash")
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args)
    monkeypatch.setattr(Trainer, "train_step", original)
    assert "stopped mid-epoch with world size 1, batch size 256" in fail([*args, "--batch-size", "128"],
                                                                             capsys)
    # The same checkpoint as if 2 ranks had written it: refused by 1 process at the same batch size.
    state, path = checkpoint.load_latest(run_dir)
    assert state["step_in_epoch"] == 5
    checkpoint.save_checkpoint(run_dir, {**state, "world_size": 2}, step=state["global_step"])
    assert "stopped mid-epoch with world size 2" in fail(args, capsys)
    checkpoint.save_checkpoint(run_dir, state, step=state["global_step"])
    assert main(args) == 0  # the same world size and batch size resume

    # At an epoch boundary no batch position is lost: another batch size continues.
    other = tmp_path / "epoch-end"
    assert main([*args[:3], str(other), *args[4:], "--epochs", "1"]) == 0
    assert main([*args[:3], str(other), *args[4:], "--epochs", "2", "--batch-size", "128"]) == 0


def _stalling_rank(rank: int, port: int, cfg_dict: dict, how: str) -> None:
    as_rank(rank, 2, port)
    original = Trainer.train_step

    def faulty(self, batch):
        if self.env.rank == 1 and self.progress.global_step == 3:
            if how == "dead":
                os._exit(9)  # like a kill -9: no exception, no goodbye to the other rank
            time.sleep(3600)  # stuck
        return original(self, batch)

    Trainer.train_step = faulty
    run(config.from_dict(cfg_dict))


STALL_TIMEOUT_S = 5  # --train.timeout_s: above the ranks' start-up skew (rendezvous also waits this long), far below
# the default; tests/test_faults.py's stuck peer under torchrun waits as long


@pytest.fixture(scope="module")
def stalled(odd_data, tmp_path_factory) -> dict[str, int | None]:
    """Rank 0's exit code in a 2-rank job whose rank 1 dies (os._exit) or gets stuck (sleeps) at step 3, None if it
    is still running 60 s after the start. The two jobs run side by side (start-up, and the stuck job's wait for
    the timeout, overlap), each its own process group."""
    base = tmp_path_factory.mktemp("stalled")
    procs = {}
    for how in ("stuck", "dead"):
        cfg = job(odd_data, base / how, train__batch_size=64, train__timeout_s=STALL_TIMEOUT_S)
        procs[how] = start_ranks(_stalling_rank, 2, (free_port(), cfg.to_dict(), how))
    for p in (p for pair in procs.values() for p in pair):
        p.start()
    deadline = time.monotonic() + 60
    try:
        for pair in procs.values():
            pair[0].join(max(0.0, deadline - time.monotonic()))
        return {how: pair[0].exitcode for how, pair in procs.items()}
    finally:
        for p in (p for pair in procs.values() for p in pair):
            if p.is_alive():
                p.kill()
                p.join()


@pytest.mark.parametrize("how", ["stuck", "dead"])
def test_a_dead_or_stuck_rank_fails_the_job_instead_of_hanging(stalled, how):
    """(The jobs: the stalled fixture.)"""
    assert stalled[how] not in (None, 0), "rank 0 hung or succeeded"


def test_compile_auto_falls_back_to_eager_when_compiling_fails(small_data, tmp_path, monkeypatch, capsys):
    calls = []

    def broken_compile(fn, **kwargs):
        def compiled(*args, **kw):
            calls.append(fn.__name__)
            raise RuntimeError("no working C++ compiler")  # inductor fails at the first call, not at compile()

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(model, "_COMPILED", {})
    monkeypatch.setattr(optim, "_COMPILED", {})
    monkeypatch.setattr(step_module, "COMPILE_MIN_ROWS", 1)  # auto compiles from this size: here, this small data
    # the torch-ops step (the C++ op, where it applies, replaces the compiled kernels)
    changes = {"train__epochs": 2, "train__batch_size": 1024, "train__ranking_k": 0, "train__cpu_kernel": "off"}
    auto = run(job(small_data, tmp_path / "auto", train__compile="auto", **changes))
    assert calls  # compiling was attempted, failed, and the job still trained
    eager = run(job(small_data, tmp_path / "off", train__compile="off", **changes))
    assert auto["history"] == eager["history"] and auto["test_rmse"] == eager["test_rmse"]  # same math
    err = fail(["--data", str(small_data), "--run-dir", str(tmp_path / "on"), "--workers", "0",
                "--train.compile", "on", "--train.cpu_kernel", "off"], capsys)
    assert "--train.compile on: torch.compile failed (RuntimeError: no working C++ compiler)" in err


def test_auto_batch_size_keeps_about_200_steps_or_100_on_large_data_and_one_global_batch_for_any_world_size(
        small_data, tmp_path):
    # neither bound applies: about 200 steps, or 100 from 20M training ratings (session 17)
    for n, steps in ((1_000_000, 200), (2_000_000, 200), (10_000_000, 200), (19_999_999, 200), (20_000_000, 100),
                     (25_000_000, 100)):
        global_batch = auto_batch_size(n, 1)
        assert global_batch % 1024 == 0 and steps <= math.ceil(n / global_batch) < steps * 1.25, n
        assert auto_batch_size(n, 1, steps=50) == min(262_144, n // 50 // 1024 * 1024)  # --train.auto_steps
        for world in (2, 4, 8):  # the same global batch (the same updates), split over the ranks
            assert auto_batch_size(n, world) * world == global_batch, (n, world)
    assert auto_batch_size(10_000, 1) == 1024  # at least 1Ki per step
    assert auto_batch_size(32_000_000, 1) == auto_batch_size(10**10, 1) == 262_144  # at most 256Ki
    assert auto_batch_size(10_000, 8) == 256  # and at least 256 per rank
    m = run(job(small_data, tmp_path / "r", train__epochs=1, train__ranking_k=0))  # batch_size 0 = auto
    n_train = Dataset(small_data).split_rows("train")
    assert m["batch_size"] == auto_batch_size(n_train, 1) and m["steps"] == math.ceil(n_train / m["batch_size"])


def simulated_visits(rows: np.ndarray, batch: int, rng: np.random.Generator, epochs: int = 3) -> float:
    """Rows touched per epoch, summed over the steps of shuffled epochs cut into batches (a NumPy reference)."""
    total = 0
    for _ in range(epochs):
        order = rows[rng.permutation(len(rows))]
        total += sum(len(np.unique(order[i:i + batch])) for i in range(0, len(order), batch))
    return total / epochs


def test_batch_lr_scales_keep_each_tables_row_visits_per_epoch_of_a_shuffled_epoch():
    """The factor on a table's lr is its row visits per epoch at the reference batch over those at the batch:
    checked against epochs actually shuffled and cut, for a long-tailed table (users) and a short, dense one
    (movies, nearly every row in every step)."""
    rng = np.random.default_rng(0)
    users = np.minimum(rng.lognormal(3.0, 1.2, 2000).astype(np.int64) + 1, 3000)
    movies = np.full(50, 0)
    movies[:] = users.sum() // 50
    movies[0] += users.sum() - movies.sum()
    for counts in (users, movies):
        rows = np.repeat(np.arange(len(counts)), counts)
        for ref, batch in ((1024, 2048), (2048, 1024), (1024, 4096)):
            (scale,) = optim.batch_lr_scales([counts], batch, ref)
            want = simulated_visits(rows, ref, rng) / simulated_visits(rows, batch, rng)
            assert scale == pytest.approx(want, rel=0.02), (len(counts), ref, batch)
    # every row in every step either way (the movies here): the factor is the ratio of steps; the same batch: 1
    n = int(movies.sum())
    assert optim.batch_lr_scales([movies], 4096, 1024)[0] == pytest.approx(math.ceil(n / 1024) / math.ceil(n / 4096),
                                                                           rel=1e-6)
    assert optim.batch_lr_scales([users, movies], 1024, 1024) == (1.0, 1.0)


def test_a_larger_auto_batch_scales_each_tables_lr_an_explicit_batch_and_sgd_take_it_as_given(
        small_data, tmp_path, monkeypatch):
    from mfscale import layout
    from mfscale.layout import auto_global_batch, train_counts

    # The tiny data's auto batch is the 1Ki floor: a reference of 4 steps makes it 2Ki, --train.auto_steps 2 4Ki.
    monkeypatch.setattr(layout, "AUTO_STEPS_PER_EPOCH", 4)
    data = Dataset(small_data)
    n = data.split_rows("train")
    ref, batch = auto_global_batch(n, 4), auto_global_batch(n, 2)
    assert (ref, batch) == (2048, 4096)
    su, si = optim.batch_lr_scales(train_counts(data), batch, ref)
    assert 1.0 < su < si <= 2.0  # movies (200 rows, 48 ratings each) nearly all in every step; users fewer
    lr = 0.004
    common = dict(train__epochs=1, train__ranking_k=0, train__log_every=1, optim__lr=lr, optim__schedule="none")
    m = run(job(small_data, tmp_path / "auto", train__auto_steps=2, **common))
    assert m["batch_size"] == batch
    scalars = read_scalars(tmp_path / "auto" / "tb")
    assert scalars["lr/sparse"][-1][1] == pytest.approx(lr * su, rel=1e-6)
    assert scalars["lr/sparse_movies"][-1][1] == pytest.approx(lr * si, rel=1e-6)
    # the torch-op step (what CUDA runs) takes the same two step sizes as the C++ op
    torch_ops = run(job(small_data, tmp_path / "torch", train__auto_steps=2, train__cpu_kernel="off", **common))
    assert torch_ops["test_rmse"] == pytest.approx(m["test_rmse"], rel=1e-5)
    for name, changes in (("explicit", dict(train__batch_size=batch)),
                          ("sgd", dict(train__auto_steps=2, optim__optimizer="sgd")),
                          ("ref", dict())):  # the reference batch itself
        m = run(job(small_data, tmp_path / name, **{**common, **changes}))
        assert m["batch_size"] == (ref if name == "ref" else batch)
        scalars = read_scalars(tmp_path / name / "tb")
        assert scalars["lr/sparse"][-1][1] == scalars["lr/sparse_movies"][-1][1] == pytest.approx(lr), name


@pytest.mark.parametrize("schedule", ["cosine", "linear", "none"])
def test_learning_rate_schedules_end_at_min_lr_frac(small_data, tmp_path, schedule):
    lr, dense_lr, frac = 0.02, 0.03, 0.2
    m = run(job(small_data, tmp_path / "r", train__epochs=2, train__batch_size=2048, train__log_every=1,
                train__ranking_k=0, optim__lr=lr, optim__dense_lr=dense_lr, optim__schedule=schedule,
                optim__min_lr_frac=frac))
    total = m["steps"]
    scalars = read_scalars(tmp_path / "r" / "tb")

    def factor(step: int) -> float:  # the README's schedules, from 1 down to min_lr_frac over the run
        t = step / total
        return {"cosine": frac + (1 - frac) * (1 + math.cos(math.pi * t)) / 2, "linear": 1 - (1 - frac) * t,
                "none": 1.0}[schedule]

    for tag, base in (("lr/sparse", lr), ("lr/dense", dense_lr)):
        series = scalars[tag]  # logged after each step: the rate the next step uses
        assert [s for s, _ in series] == list(range(1, total + 1))
        for step, value in series:
            assert math.isclose(value, base * factor(step), rel_tol=1e-6), (tag, step)
        assert math.isclose(series[-1][1], base * (frac if schedule != "none" else 1.0), rel_tol=1e-6)


def test_resident_auto_follows_the_memory_rule(small_data, tmp_path, monkeypatch):
    gib = 1 << 30
    # CPU: at most 1 GiB per rank and an eighth of RAM for all local ranks.
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 64 * gib // 4096}[name])
    rows_1gib = gib // 12
    assert stream.resident_fits(rows_1gib, CPU) and not stream.resident_fits(rows_1gib + 1, CPU)
    assert stream.resident_fits(rows_1gib, CPU, local_world_size=8)  # 8 GiB = RAM / 8
    assert not stream.resident_fits(rows_1gib, CPU, local_world_size=9)
    # CUDA: at most a quarter of the free GPU memory.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (48 * gib, 80 * gib))
    cuda = torch.device("cuda", 0)
    assert stream.resident_fits(12 * gib // 12, cuda) and not stream.resident_fits(12 * gib // 12 + 1, cuda)
    monkeypatch.undo()
    # The trainer: auto holds small data with --workers 0, streams with workers or when the rule says no.
    assert trainer_is_resident(Trainer(job(small_data, tmp_path / "a"), DistEnv(0, 1, 0, CPU)))
    assert not trainer_is_resident(Trainer(job(small_data, tmp_path / "b", data__workers=1), DistEnv(0, 1, 0, CPU)))
    monkeypatch.setattr(stream, "RESIDENT_CPU_MAX_BYTES", 1000)
    assert not trainer_is_resident(Trainer(job(small_data, tmp_path / "c"), DistEnv(0, 1, 0, CPU)))


COLD_USER, COLD_MOVIE = 9001, 9999  # rated only in the test file


def test_cold_start_users_and_movies_predict_the_mean_plus_the_known_bias(tmp_path):
    from mfscale import prepare

    base = write_lowrank_csv(tmp_path / "base.csv", n_users=40, n_items=30, per_user=10, seed=2)
    (tmp_path / "test.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        f"{COLD_USER},1,4.0,2000000001\n1,{COLD_MOVIE},3.0,2000000002\n{COLD_USER},{COLD_MOVIE},2.0,2000000003\n")
    data = tmp_path / "data"
    assert prepare.main(["--input", str(base), "--test-input", str(tmp_path / "test.csv"), "--out", str(data),
                         "--quiet"]) == 0
    cfg = job(data, tmp_path / "r", train__epochs=3, model__dim=8, train__batch_size=64, train__ranking_k=0)
    run(cfg)
    r = load_run(tmp_path / "r")
    p, bu, q, bi = (t.detach() for t in r.model.factors())
    mean = float(r.model.global_bias.detach())
    u_cold, u_known = r.user_index(COLD_USER), r.user_index(1)
    i_cold = int(r.movies.filter(r.movies["movie_id"] == COLD_MOVIE)["item_idx"][0])
    i_known = int(r.movies.filter(r.movies["movie_id"] == 1)["item_idx"][0])
    # Never trained: no bias and no factors (zero from the start, and no gradient ever reaches them).
    assert bu[u_cold] == 0 and bi[i_cold] == 0
    assert not p[u_cold].any() and not q[i_cold].any()
    assert bi[i_known] != 0 and bu[u_known] != 0
    for u, i, known_bias in ((u_cold, i_known, bi[i_known]), (u_known, i_cold, bu[u_known]), (u_cold, i_cold, 0.0)):
        pred = float(r.model.predict(torch.tensor([u]), torch.tensor([i])))
        assert math.isclose(pred, mean + float(known_bias), rel_tol=1e-6), (u, i)

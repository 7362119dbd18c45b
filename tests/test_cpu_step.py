"""The C++ training step (mfscale/csrc/fused_step.cpp): the torch-ops fused step's numbers, whatever the thread
count, with a clear error on bad ids, and a trainer that falls back when it cannot be built."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import pytest
import torch

from mfscale import cpu_step
from mfscale.distributed import DistEnv
from mfscale.errors import ConfigError
from mfscale.model import BiasedMF
from mfscale.optim import LazyAdam, RowOptimizer, RowRMSprop
from mfscale.step import ClosedFormStep, CppStep
from mfscale.train import Trainer

from .test_optim import float64, one_epoch  # noqa: F401 (float64: a fixture)
from .test_train import job

CPU = torch.device("cpu")
BETAS = (0.9, 0.999)


@pytest.fixture(scope="module", autouse=True)
def built():
    cpu_step.load()  # a build failure here fails the module's tests with the compiler's message


def batches(n_users: int, n_items: int, sizes: list[int], seed: int = 0, dtype=torch.float64):
    """Batches with repeated rows (skewed movies), rows never touched, and an empty batch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        user = torch.randint(0, n_users - 5, (n,), generator=g)  # the last 5 users never appear
        item = (torch.rand(n, generator=g, dtype=torch.float64) ** 3 * n_items).long()  # popular movies repeat
        out.append((user, item, (torch.rand(n, generator=g, dtype=torch.float64) * 4 + 1).to(dtype)))
    return out


def adam(model: BiasedMF, lr: float | tuple[float, float], kind: str = "lazy_adam") -> RowOptimizer:
    """LazyAdam (or RowRMSprop) over [users, items]; a pair of learning rates gives each table its own (group)."""
    users, items = model.sparse_parameters()
    lr_u, lr_i = lr if isinstance(lr, tuple) else (lr, lr)
    cls = RowRMSprop if kind == "row_rmsprop" else LazyAdam
    return cls([{"params": [users], "lr": lr_u}, {"params": [items], "lr": lr_i}], betas=BETAS)


def torch_steps(model: BiasedMF, batch_list, reg: torch.Tensor, lr: float | tuple[float, float],
                kind: str = "lazy_adam") -> RowOptimizer:
    """The torch-ops fused step: closed_form_grads + LazyAdam or RowRMSprop (the reference)."""
    opt = adam(model, lr, kind)
    for user, item, rating in batch_list:
        n = max(user.numel(), 1)
        gu, gi, _, _ = model.closed_form_grads(user, item, rating, n)
        opt.step(rows=[(g.ids, g.rows, g.counts.to(reg.dtype), reg * (2.0 / n)) for g in (gu, gi)])
    return opt


def kernel_steps(model: BiasedMF, batch_list, reg: torch.Tensor, lr: float | tuple[float, float],
                 kind: str = "lazy_adam") -> tuple[RowOptimizer, list, dict]:
    opt = adam(model, lr, kind)
    row_wise = kind == "row_rmsprop"
    users, items = (p.detach() for p in model.sparse_parameters())
    scratch: dict[str, torch.Tensor] = {}
    sums = []
    for user, item, rating in batch_list:
        n = max(user.numel(), 1)

        def update(steps, user=user, item=item, rating=rating, n=n):
            (su, lu), (si, li) = steps
            state_u, state_i = ((st["row_sq"], None) if row_wise else (st["exp_avg"], st["exp_avg_sq"])
                                for st in (su, si))
            sums.append(cpu_step.fused_step(users, items, state_u, state_i, user, item, rating,
                                            float(model.global_bias.detach()), 2.0 / n, reg * (2.0 / n), (lu, li),
                                            BETAS, 1e-8, scratch, row_wise=row_wise))

        opt.step(update=update)
    return opt, sums, scratch


def twin_models(dtype: torch.dtype, n_users: int = 60, n_items: int = 40, dim: int = 8
                ) -> tuple[BiasedMF, BiasedMF]:
    torch.manual_seed(0)
    a = BiasedMF(n_users, n_items, dim).to(dtype)
    b = BiasedMF(n_users, n_items, dim).to(dtype)
    b.load_state_dict(a.state_dict())
    return a, b


# (users, movies, batch sizes): which side the op streams and how it orders the rows both change with these.
SHAPES = {
    "users-streamed": (60, 40, [500, 1, 0, 333, 500]),  # more touched users; many rows: table order
    "movies-streamed": (40, 3000, [2000, 700]),  # more touched movies than users
    "few-rows-touched": (20000, 5000, [300, 300]),  # under 1/16 of the rows: order of first appearance
}


@pytest.mark.parametrize("kind", ["lazy_adam", "row_rmsprop"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dim", [8, 32, 64, 128])  # 8: the op's loop for any width; the others compiled for theirs
def test_kernel_equals_torch_fused_step(dtype, shape, kind, dim):
    """Tables and the optimizer's state (both Adam moments, or RowRMSprop's row state) after several steps equal
    closed_form_grads + the optimizer's (float64 to
    rounding; float32 within float32 rounding), with another learning rate per table; rows never touched stay
    exactly as they were, the scratch marks end all zero, and the returned sums are the global bias's gradient
    and the squared error."""
    n_users, n_items, sizes = SHAPES[shape]
    ref, got = twin_models(dtype, n_users, n_items, dim)
    reg = torch.tensor([0.05] * dim + [0.01], dtype=dtype)
    data = batches(n_users, n_items, sizes, dtype=dtype)
    before = got.users.weight.detach().clone()
    lrs = (0.02, 0.013)
    opt_ref = torch_steps(ref, data, reg, lr=lrs, kind=kind)
    opt_got, sums, scratch = kernel_steps(got, data, reg, lr=lrs, kind=kind)
    # float32: Adam divides by sqrt(v), which magnifies last-bit differences of sums where v is tiny; over 32+ values
    # the op's dot rounds differently from torch's, and a few elements in 100,000 (Adam's, movies streamed) land
    # 2e-6 to 2e-5 apart (the op before session 17 too)
    tol = ({"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64
           else {"rtol": 1e-4, "atol": 1e-6 if dim == 8 else 5e-5})
    for p_ref, p_got in zip(ref.sparse_parameters(), got.sparse_parameters(), strict=True):
        torch.testing.assert_close(p_got, p_ref, **tol)
        s_ref, s_got = opt_ref.state[p_ref], opt_got.state[p_got]
        assert s_got["step"] == s_ref["step"] == len(data)  # an empty batch counts a step, as in SparseAdam
        assert list(opt_got.state_keys) == [k for k in s_got if k != "step"]
        for key in opt_got.state_keys:
            torch.testing.assert_close(s_got[key], s_ref[key], **tol)
    assert torch.equal(got.users.weight[-5:], before[-5:])  # untouched rows: bit for bit
    assert all(int(t.abs().sum()) == 0 for k, t in scratch.items() if k.startswith("mark"))
    # The first step's sums from the initial tables.
    fresh, _ = twin_models(dtype, n_users, n_items, dim)
    user, item, rating = data[0]
    e = fresh.predict(user, item) - rating
    coef_sum, sse = sums[0]
    assert coef_sum == pytest.approx(float((e * (2.0 / len(user))).sum()), rel=1e-5)
    assert sse == pytest.approx(float(e.square().sum()), rel=1e-5)


@pytest.mark.parametrize("threads", [1, 3, 4])
@pytest.mark.parametrize("shape", ["users-streamed", "movies-streamed"])
def test_kernel_groups_the_batch_right_on_any_thread_count(shape, threads):
    """The op groups the batch one way on 1-2 threads (halves filling each row's ratings from both ends) and another on
    more (a counting sort per part): float64 tables equal the torch-ops step to rounding either way."""
    n_users, n_items, sizes = SHAPES[shape]
    ref, got = twin_models(torch.float64, n_users, n_items)
    reg = torch.tensor([0.05] * 8 + [0.01], dtype=torch.float64)
    data = batches(n_users, n_items, sizes, dtype=torch.float64)
    torch_steps(ref, data, reg, lr=0.02, kind="row_rmsprop")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kernel_steps(got, data, reg, lr=0.02, kind="row_rmsprop")
    finally:
        torch.set_num_threads(before)
    for p_ref, p_got in zip(ref.sparse_parameters(), got.sparse_parameters(), strict=True):
        torch.testing.assert_close(p_got, p_ref, rtol=1e-12, atol=1e-14)


def test_kernel_repeats_bit_for_bit_and_other_thread_counts_agree_to_rounding():
    """A fixed thread count gives the same bits every run (resume equals uninterrupted training); 1, 2 and 3
    threads (chunks of equal work, not equal rows) differ only in the summation order of the minor side's
    gradient."""
    def run(n_threads: int) -> list[torch.Tensor]:
        threads = torch.get_num_threads()
        torch.set_num_threads(n_threads)
        try:
            torch.manual_seed(0)
            model = BiasedMF(3000, 400, 8)
            # Large enough batches for both parallel loops to split the rows between the threads.
            kernel_steps(model, batches(3000, 400, [20_000, 20_000], dtype=torch.float32), torch.full((9,), 0.05),
                         lr=0.01)
            return [t.detach().clone() for t in model.sparse_parameters()]
        finally:
            torch.set_num_threads(threads)

    one, two, two_again, three = run(1), run(2), run(2), run(3)
    for a, b, c, d in zip(one, two, two_again, three, strict=True):
        assert torch.equal(b, c)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # Adam magnifies rounding where v is tiny
        torch.testing.assert_close(a, d, rtol=1e-4, atol=1e-6)


def test_kernel_rejects_bad_ids_before_touching_anything():
    model, _ = twin_models(torch.float32)
    users, items = (p.detach() for p in model.sparse_parameters())
    before = users.clone()
    moments = (torch.zeros_like(users), torch.zeros_like(users)), (torch.zeros_like(items), torch.zeros_like(items))
    for user, item in ((torch.tensor([0, 60]), torch.tensor([0, 1])), (torch.tensor([0, 1]), torch.tensor([-1, 1]))):
        with pytest.raises(RuntimeError, match="out of range"):
            cpu_step.fused_step(users, items, *moments, user, item, torch.ones(2), 3.5, 1.0, torch.zeros(9),
                                (0.1, 0.1), BETAS, 1e-8, {})
    assert torch.equal(users, before)


def test_kernel_takes_int32_ids_as_they_are_and_int64_ids_to_the_same_bits():
    """The job's batches hold int32 ids and the op reads them as they are; int64 ids (any other caller) give the same
    bits. An int64 id that int32 cannot hold is out of range, not wrapped onto another row (2**32 + 1 would be 1)."""
    n_users, n_items, sizes = SHAPES["users-streamed"]
    reg = torch.tensor([0.05] * 8 + [0.01])
    data = batches(n_users, n_items, sizes, dtype=torch.float32)
    a, b = twin_models(torch.float32, n_users, n_items)
    _, sums64, _ = kernel_steps(a, data, reg, lr=0.02, kind="row_rmsprop")
    _, sums32, _ = kernel_steps(b, [(u.int(), i.int(), r) for u, i, r in data], reg, lr=0.02, kind="row_rmsprop")
    assert sums32 == sums64
    for p64, p32 in zip(a.sparse_parameters(), b.sparse_parameters(), strict=True):
        assert torch.equal(p64, p32)
    users, items = (p.detach() for p in a.sparse_parameters())
    before = users.clone()
    moments = (torch.zeros_like(users), torch.zeros_like(users)), (torch.zeros_like(items), torch.zeros_like(items))
    with pytest.raises(RuntimeError, match="user id out of range"):
        cpu_step.fused_step(users, items, *moments, torch.tensor([0, 2**32 + 1]), torch.tensor([0, 1]), torch.ones(2),
                            3.5, 1.0, torch.zeros(9), (0.1, 0.1), BETAS, 1e-8, {})
    with pytest.raises(RuntimeError, match="int32 or int64"):
        cpu_step.fused_step(users, items, *moments, torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), torch.ones(2),
                            3.5, 1.0, torch.zeros(9), (0.1, 0.1), BETAS, 1e-8, {})
    assert torch.equal(users, before)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("optimizer", ["row_rmsprop", "lazy_adam"])
def test_trainer_uses_the_kernel_where_rows_are_local_and_matches_torch_ops(small_data, tmp_path, optimizer,
                                                                            float64):  # noqa: F811 (the fixture)
    """One epoch of the trainer (cosine LR every step, L2, the global bias, the user-day biases) with the C++ ops
    and with torch ops (float64: the two sum a day's gradient and its L2 share in different orders)."""
    tr_k, got = one_epoch(small_data, tmp_path / "k", train__cpu_kernel="on", optim__optimizer=optimizer)
    tr_t, ref = one_epoch(small_data, tmp_path / "t", train__cpu_kernel="off", optim__optimizer=optimizer)
    assert isinstance(tr_k.step_fn, CppStep) and isinstance(tr_t.step_fn, ClosedFormStep)
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-9, atol=1e-12)
    opt_k, opt_t = tr_k.optims.tables, tr_t.optims.tables
    for p_k, p_t in zip(opt_k.param_groups[0]["params"], opt_t.param_groups[0]["params"], strict=True):
        assert opt_k.state[p_k]["step"] == opt_t.state[p_t]["step"] == tr_k.layout.steps_per_epoch
        for key in opt_k.state_keys:
            torch.testing.assert_close(opt_k.state[p_k][key], opt_t.state[p_t][key], rtol=1e-9, atol=1e-15)
    days_k, days_t = tr_k.layout.day_bias, tr_t.layout.day_bias
    assert days_k.steps == days_t.steps == tr_k.layout.steps_per_epoch and days_k.value.abs().max() > 0
    for a, b in ((days_k.value, days_t.value), (days_k.sq, days_t.sq)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)
    # The LR schedule saw every step (LambdaLR counts optimizer steps): both end at the same learning rate.
    assert tr_k.optims.tables.param_groups[0]["lr"] == tr_t.optims.tables.param_groups[0]["lr"]
    assert math.isclose(tr_k.optims.tables.param_groups[0]["lr"], tr_t.optims.tables.param_groups[0]["lr"])


def test_trainer_falls_back_to_torch_ops_when_the_kernel_cannot_be_built(small_data, tmp_path, monkeypatch,
                                                                         caplog):
    def broken(verbose=False):
        raise cpu_step.KernelUnavailable("no C++ compiler")

    monkeypatch.setattr(cpu_step, "load", broken)
    with caplog.at_level(logging.WARNING):
        tr = Trainer(job(small_data, tmp_path / "a"), DistEnv(0, 1, 0, CPU))
    assert isinstance(tr.step_fn, ClosedFormStep) and "no C++ compiler" in caplog.text
    with pytest.raises(ConfigError, match="--train.cpu_kernel on: .*no C\\+\\+ compiler"):
        Trainer(job(small_data, tmp_path / "b", train__cpu_kernel="on"), DistEnv(0, 1, 0, CPU))


def test_kernel_on_is_refused_where_ranks_exchange_gradient_rows(small_data, tmp_path):
    with pytest.raises(ConfigError, match="cpu_kernel on needs"):
        Trainer(job(small_data, tmp_path, train__cpu_kernel="on", train__tables="replicated"),
                DistEnv(0, 2, 0, CPU))



def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next_job(tmp_path):
    """torch's builder waits, without a limit, for another process's lock file: one left by a build killed
    mid-way (kill -9, a job's time limit) must not make every later job hang."""
    import subprocess
    import sys

    from torch.utils import cpp_extension

    build = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    lock = build / cpu_step._build_name() / "lock"
    lock.touch()  # the module fixture built the op here, so loading it again is quick
    out = subprocess.run([sys.executable, "-c", "from mfscale import cpu_step; cpu_step.load(); print('loaded')"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "loaded" in out.stdout, out.stderr[-2000:]
    assert not lock.exists()


def test_an_unusable_build_directory_is_a_build_failure_not_a_crash(monkeypatch):
    """auto then falls back to torch ops (the trainer catches KernelUnavailable only)."""
    monkeypatch.setattr(cpu_step, "_LOADED", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/dev/null/extensions")
    with pytest.raises(cpu_step.KernelUnavailable, match="NotADirectoryError|FileExistsError|PermissionError"):
        cpu_step.load()

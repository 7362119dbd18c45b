"""LazyAdam computes torch.optim.SparseAdam's update: alone, with schedules, across resume, in the trainer."""

from __future__ import annotations

import io
import mmap
import sys
import warnings

import pytest
import torch

from mfscale import config
from mfscale.distributed import DistEnv
from mfscale.model import BiasedMF
from mfscale.optim import LazyAdam, RowRMSprop, sum_rows
from mfscale.train import Trainer

from .test_train import assert_two_ranks_equal_union, job

CPU = torch.device("cpu")
SHAPES = ((50, 7), (30, 7))


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def tables(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in SHAPES]


def sparse_grads(step: int, unique: bool = False) -> list[torch.Tensor | None]:
    """Row gradients with duplicate rows, rows absent this step, a table without gradient, an empty one."""
    g = torch.Generator().manual_seed(1000 + step)
    out: list[torch.Tensor | None] = []
    for k, (n, d) in enumerate(SHAPES):
        if k == 1 and step % 5 == 3:
            out.append(None)  # no gradient at all: SparseAdam does not count the step for this table
            continue
        nnz = 0 if (k == 0 and step % 7 == 6) else 40
        lo = step % 3 * (n // 4)  # a shifting window: many rows are absent from any one step
        if unique:
            idx = lo + torch.randperm(n - lo, generator=g)[: min(nnz, n - lo)]
        else:
            idx = torch.randint(lo, n, (nnz,), generator=g)
        out.append(torch.sparse_coo_tensor(idx.unsqueeze(0), torch.randn((idx.numel(), d), generator=g), (n, d)))
    return out


def train(opt_cls, steps: int, *, schedule: bool = False, unique: bool = False, start=None, first_step: int = 0):
    params = tables()
    opt = opt_cls(params, lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.3 * s)) if schedule else None
    if start is not None:
        with torch.no_grad():
            for p, v in zip(params, start["params"], strict=True):
                p.copy_(v)
        opt.load_state_dict(start["opt"])
        if sched is not None:
            sched.load_state_dict(start["sched"])
    for s in range(first_step, first_step + steps):
        for p, grad in zip(params, sparse_grads(s, unique), strict=True):
            p.grad = grad
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
    return params, opt, sched


@pytest.mark.parametrize("schedule", [False, True])
def test_equals_sparse_adam_with_duplicate_and_absent_rows(float64, schedule):
    ref, ref_opt, _ = train(torch.optim.SparseAdam, 30, schedule=schedule)
    got, opt, _ = train(LazyAdam, 30, schedule=schedule)
    for a, b, init in zip(ref, got, tables(), strict=True):
        assert not torch.equal(a, init)
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    for a, b in zip(ref_opt.state.values(), opt.state.values(), strict=True):
        assert a["step"] == b["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-12, atol=1e-14)


def test_bit_identical_to_sparse_adam_when_rows_are_unique():
    ref, ref_opt, _ = train(torch.optim.SparseAdam, 20, unique=True, schedule=True)
    got, opt, _ = train(LazyAdam, 20, unique=True, schedule=True)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ref_opt.state.values(), opt.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_pre_deduped_rows_equal_reading_grad():
    a, b = tables(), tables()
    opts = [LazyAdam(a, lr=0.01), LazyAdam(b, lr=0.01)]
    for s in range(6):
        grads = [g for g in sparse_grads(s) if g is not None and g._nnz()]
        deduped = [sum_rows(g._indices()[0], g._values(), g.shape[0]) for g in grads]
        for p, g in zip(a, grads, strict=False):
            p.grad = g
        opts[0].step()
        opts[0].zero_grad()
        opts[1].step(rows=deduped + [None] * (2 - len(deduped)))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("cls", [LazyAdam, RowRMSprop])
def test_state_dict_round_trip_then_continue_equals_uninterrupted(cls):
    full, _, _ = train(cls, 16, schedule=True)
    half, opt, sched = train(cls, 8, schedule=True)
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in half], "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buf)
    buf.seek(0)
    resumed, opt2, _ = train(cls, 8, schedule=True, start=torch.load(buf), first_step=8)
    for a, b in zip(full, resumed, strict=True):
        assert torch.equal(a, b)
    assert sorted(opt2.state_dict()["state"][0]) == sorted([*cls.state_keys, "step"])


def test_sparse_adam_checkpoint_loads_into_lazy_adam(float64):
    full, _, _ = train(torch.optim.SparseAdam, 12)
    half, opt, _ = train(torch.optim.SparseAdam, 6)
    start = {"params": [p.detach().clone() for p in half], "opt": opt.state_dict()}
    resumed, _, _ = train(LazyAdam, 6, start=start, first_step=6)
    for a, b in zip(full, resumed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_grad_scaler_unscales_sparse_grads_before_lazy_adam():
    plain, scaled = tables(), tables()
    opt_p, opt_s = LazyAdam(plain, lr=0.01), LazyAdam(scaled, lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert scaler.scale(torch.ones(())).item() == 1024.0  # the grads below stand for a scaled loss's
    idx = torch.tensor([[0, 3, 3, 7]])
    for _ in range(3):
        for params, scale in ((plain, 1.0), (scaled, 1024.0)):
            vals = torch.arange(4 * SHAPES[0][1], dtype=torch.float32).reshape(4, -1) * 0.01 * scale
            params[0].grad = torch.sparse_coo_tensor(idx, vals, SHAPES[0])
        opt_p.step()
        scaler.step(opt_s)  # unscales (a power of two: exact), checks for inf, then steps
        scaler.update()
    assert torch.equal(plain[0], scaled[0])
    assert not torch.equal(plain[0], tables()[0])


def one_epoch(data, run_dir, **overrides) -> tuple[Trainer, dict[str, torch.Tensor]]:
    cfg = job(data, run_dir, train__batch_size=1024, optim__lr=0.02, **overrides)
    tr = Trainer(cfg, DistEnv(0, 1, 0, CPU))
    tr.layout.stream.set_epoch(0)
    for batch in tr.layout.stream:
        tr.train_step(batch)  # cosine schedule over the run: the LR changes every step
    return tr, tr.model.state_dict()


def test_fused_step_and_lazy_adam_equal_sparse_adam_after_one_epoch(small_data, tmp_path, float64):
    """The issue's check: the fast path gives SparseAdam's parameters (float64, rounding-level tolerance), with
    --optim.beta1/beta2 reaching every path (neither torch's defaults nor mfscale's)."""
    betas = {"optim__beta1": 0.8, "optim__beta2": 0.95}
    ref_tr, ref = one_epoch(small_data, tmp_path / "ref", optim__optimizer="sparse_adam", **betas)
    assert isinstance(ref_tr.optims.tables, torch.optim.SparseAdam) and ref_tr.step_fn.kind == "autograd"
    assert ref_tr.optims.tables.param_groups[0]["betas"] == (0.8, 0.95)
    for step, kernel in (("autograd", "off"), ("fused", "off"), ("fused", "on")):  # on: the C++ op
        tr, got = one_epoch(small_data, tmp_path / f"{step}-{kernel}", optim__optimizer="lazy_adam", train__step=step,
                            train__cpu_kernel=kernel, **betas)
        assert isinstance(tr.optims.tables, LazyAdam) and (tr.step_fn.kind != "autograd") == (step == "fused") \
            and (tr.step_fn.kind == "cpp") == (kernel == "on")
        assert all(g["betas"] == (0.8, 0.95) for g in tr.optims.tables.param_groups)
        for k, v in ref.items():
            # The global bias's gradient sums to nearly zero; Adam divides by its RMS, which magnifies
            # rounding in the sum, hence rtol 1e-8 rather than 1e-10.
            torch.testing.assert_close(got[k], v, rtol=1e-8, atol=1e-10)


def test_fused_is_the_default_and_falls_back_where_it_does_not_apply(small_data, tmp_path):
    assert Trainer(job(small_data, tmp_path / "a"), DistEnv(0, 1, 0, CPU)).step_fn.kind != "autograd"
    for overrides in ({"model__dropout": 0.1}, {"optim__gravity": 0.01}, {"optim__optimizer": "sparse_adam"}):
        assert Trainer(job(small_data, tmp_path / "b", **overrides), DistEnv(0, 1, 0, CPU)).step_fn.kind == "autograd"
        with pytest.raises(Exception, match="--train.step fused cannot be used with"):
            job(small_data, tmp_path / "c", train__step="fused", **overrides).validate()


def test_two_gloo_ranks_with_lazy_adam_equal_one_process(odd_data, tmp_path):
    cfg = job(odd_data, tmp_path / "run", optim__optimizer="lazy_adam", optim__lr=0.02, train__tables="replicated",
              model__day_bias=False)  # the union's batches carry no day rows (user-day biases: test_layout)
    single = assert_two_ranks_equal_union(odd_data, cfg, 90, tmp_path)
    assert isinstance(single.optims.tables, LazyAdam) and single.step_fn.kind != "autograd"


def test_config_accepts_the_optimizers_and_names_them_on_error(tmp_path):
    assert config.JobConfig().optim.optimizer == "row_rmsprop"
    for name in ("lazy_adam", "row_rmsprop", "sparse_adam"):
        config.replace(config.JobConfig(), data__path=".", optim__optimizer=name).validate()
    with pytest.raises(Exception, match="lazy_adam, row_rmsprop, sparse_adam or sgd"):
        config.replace(config.JobConfig(), data__path=".", optim__optimizer="adagrad").validate()
    assert (config.JobConfig().optim.beta1, config.JobConfig().optim.beta2) == (0.9, 0.98)
    for beta in ({"optim__beta1": 1.0}, {"optim__beta2": -0.1}):
        with pytest.raises(Exception, match=r"optim.beta1 and optim.beta2 must be in \[0, 1\)"):
            config.replace(config.JobConfig(), data__path=".", **beta).validate()


@pytest.mark.parametrize("cls", [LazyAdam, RowRMSprop])
def test_dense_form_equals_row_form(cls):
    check_dense_form_equals_row_form(compiled=False, cls=cls)


def check_dense_form_equals_row_form(compiled: bool, cls: type = LazyAdam) -> None:
    """Whole-table gradients with touch counts update exactly the touched rows, as the row form does.

    Shared with test_zz_compiled (a helper, not a test function, so pytest does not collect it twice)."""
    torch.manual_seed(0)
    results, forms = [], set()
    # rows form; dense form; dense where a step touches at least 15 of the 40 user rows (the 20 users are
    # all drawn) and at least 24 of the 30 movie rows (some of the 25 are not): both forms in one step.
    for dense_min in (None, (0, 0), (15, 24)):
        torch.manual_seed(0)
        model = BiasedMF(40, 30, 6)
        opt = cls(model.sparse_parameters(), lr=0.05, compile=compiled)
        w = torch.full((7,), 0.01)
        for s in range(4):
            g = torch.Generator().manual_seed(s)
            user, item = torch.randint(0, 20, (50,), generator=g), torch.randint(5, 30, (50,), generator=g)
            rating = torch.rand(50, generator=g) * 4 + 1
            grads = model.closed_form_grads(user, item, rating, 50, dense_min=dense_min)[:2]
            forms.add((dense_min, grads[0].ids is None, grads[1].ids is None))
            if grads[0].ids is None:
                assert grads[0].rows.shape == (40, 7)
                assert torch.count_nonzero(grads[0].rows[20:]) == 0  # rows no rating touched
            opt.step(rows=[(t.ids, t.rows, t.counts.to(w.dtype), w) for t in grads])
        state = {f"{i}.{k}": v for i, p in enumerate(model.sparse_parameters()) for k, v in opt.state[p].items()
                 if k in opt.state_keys}  # the optimizer's state too: untouched rows keep theirs
        results.append({**model.state_dict(), **state})
    assert forms == {(None, False, False), ((0, 0), True, True), ((15, 24), True, False)}
    init = BiasedMF(40, 30, 6).state_dict()
    for other in results[1:]:
        assert torch.equal(other["users.weight"][20:], results[0]["users.weight"][20:])
        assert not other[f"0.{cls.state_keys[-1]}"][20:].any()  # never touched: state still zero
        for k, v in results[0].items():
            if compiled:  # two generated kernels may contract multiply-adds differently
                torch.testing.assert_close(other[k], v, rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(other[k], v), k
    assert not torch.equal(results[0]["users.weight"][:20], init["users.weight"][:20])


def _advised_huge(t: torch.Tensor) -> bool:
    """Whether the mapping holding t's middle byte carries MADV_HUGEPAGE ('hg' in /proc/self/smaps VmFlags)."""
    addr, inside = t.data_ptr() + t.numel() * t.element_size() // 2, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return "hg" in line.split()[1:]
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"),
                    reason="transparent huge pages are a Linux feature")
def test_large_tables_and_their_adam_moments_ask_for_huge_pages():
    # A 5.3 MB user table is advised. (Whether the 2.6 MB movie table, below the threshold, sits in advised
    # memory depends on what the allocator hands out, so it is not checked.)
    model = BiasedMF(40_000, 20_000, 32)
    assert _advised_huge(model.users.weight)
    opt = LazyAdam(model.sparse_parameters())
    ids = torch.tensor([0, 7, 39_999])
    opt.step(rows=[(ids, torch.ones(3, 33)), None])
    assert _advised_huge(opt.state[model.users.weight]["exp_avg"])
    sd = opt.state_dict()
    opt2 = LazyAdam(model.sparse_parameters())
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf))
    for key in ("exp_avg", "exp_avg_sq"):
        assert _advised_huge(opt2.state[model.users.weight][key])
        assert torch.equal(opt2.state[model.users.weight][key], opt.state[model.users.weight][key])


def test_one_group_per_table_and_a_checkpoint_with_one_group_loads_into_both():
    """The tables' optimizer has a param group per table (their step sizes may differ: the auto batch's scaling);
    a checkpoint from before, with one group for both tables, resumes with its learning rate on both."""
    from mfscale.optim import Optimizers, build_tables

    cfg = config.OptimConfig(lr=0.004)
    users, items = tables()
    bias = torch.nn.Parameter(torch.zeros(()))
    scaled = Optimizers(cfg, build_tables(cfg, [users, items], (1.5, 2.0)), [bias], total_steps=10)
    assert scaled.lrs[:2] == pytest.approx((0.006, 0.008))
    old = Optimizers(cfg, RowRMSprop([users, items], lr=0.003), [bias], total_steps=10)  # the old single group
    again = Optimizers(cfg, build_tables(cfg, [users, items]), [bias], total_steps=10)
    assert len(again.tables.param_groups) == 2 and again.lrs[:2] == pytest.approx((0.004, 0.004))
    with warnings.catch_warnings():  # a schedule step before any optimizer step, on purpose
        warnings.simplefilter("ignore", UserWarning)
        old.schedule_step()
    again.load_state_dict(old.state_dict())
    assert again.lrs[:2] == pytest.approx(old.lrs[:2]) and again.lrs[0] < 0.003  # cosine: a step down already
    for _ in range(3):  # the schedule goes on for both tables, as it did for the old group
        old.schedule_step()
        again.schedule_step()
        assert again.lrs == pytest.approx((old.lrs[0], old.lrs[0], old.lrs[2]))
    again.load_state_dict(scaled.state_dict())  # and a scaled run's two groups come back as they were
    assert again.lrs[:2] == pytest.approx((0.006, 0.008))


def test_the_global_biass_cpu_step_is_torchs_adam_with_its_state_and_schedule():
    """Optimizers.step_dense_cpu (the global bias's Adam in Python floats, session 17) follows torch.optim.Adam
    step by step through a cosine schedule, keeps the state under Adam's names (checkpoints load either way), and
    the schedule sees optimizer steps (no warning)."""
    from mfscale.optim import Optimizers, build_tables

    cfg = config.OptimConfig(dense_lr=0.05, schedule="cosine")
    grads = [0.3, -1.2, 0.7, 0.0, 2.5, -0.4, 0.9, -0.05]
    runs = []
    for fast in (True, False):
        bias = torch.nn.Parameter(torch.tensor(0.25))
        opts = Optimizers(cfg, build_tables(cfg, list(tables())), [bias], total_steps=len(grads))
        values = []
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # LambdaLR warns when it steps before the optimizer
            for g in grads:
                opts.tables.step(update=lambda steps: None)  # the tables' step, as the job's (no rows here)
                if fast:
                    opts.step_dense_cpu(g)
                else:
                    bias.grad = torch.tensor(g)
                    opts.dense.step()
                opts.schedule_step()
                values.append(float(bias.detach()))
        runs.append((values, opts.dense.state_dict()))
    (fast_values, fast_state), (torch_values, torch_state) = runs
    assert fast_values == pytest.approx(torch_values, rel=1e-6)
    assert fast_state["state"].keys() == torch_state["state"].keys()
    for key, value in torch_state["state"][0].items():
        assert float(fast_state["state"][0][key]) == pytest.approx(float(value), rel=1e-6), key
        assert fast_state["state"][0][key].dtype == value.dtype, key

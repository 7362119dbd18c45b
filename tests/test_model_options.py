"""Issue 24's model options: plain MF (``--model.biases off``) and ``nn.Embedding``'s ``max_norm``
(``--model.max_norm``). Every CPU step variant against what a notebook computes with ``nn.Embedding`` in float64,
the C++ op against the torch ops, 2 ranks against 1 process, evaluation and the tools on such runs, and the
one-line refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mfscale import checkpoint, config, cpu_step
from mfscale.analyze import cluster_movies
from mfscale.distributed import DistEnv
from mfscale.errors import ConfigError
from mfscale.evaluate import evaluate
from mfscale.export import main as export_main
from mfscale.model import BiasedMF, renorm_rows_
from mfscale.optim import LazyAdam
from mfscale.recommend import Recommender
from mfscale.runs import load_run
from mfscale.shards import Dataset
from mfscale.train import Trainer, run

from .test_optim import float64  # noqa: F401 (a fixture)
from .test_train import job

CPU = torch.device("cpu")

# The CPU step variants (mfscale.step) and the flags that pick each; sparse_adam is autograd with torch's SparseAdam.
VARIANTS = {
    "cpp": {"train__cpu_kernel": "on"},
    "eager": {"train__cpu_kernel": "off", "train__compile": "off"},
    "autograd": {"train__step": "autograd"},
    "sparse_adam": {"optim__optimizer": "sparse_adam"},
}
KIND = {"cpp": "cpp", "eager": "eager", "autograd": "autograd", "sparse_adam": "autograd"}
# (biases, max_norm): plain MF, biased MF with the bound, and both. Factors start with norms around 0.85
# (init_std 0.3, dim 8), so a bound of 0.8 renormalizes about half of the rows a batch touches.
OPTIONS = {"plain": (False, 0.0), "max_norm": (True, 0.8), "plain+max_norm": (False, 0.8)}
STEPS = 6


def short_job(data: Path, run_dir: Path, biases: bool, max_norm: float, **flags) -> config.JobConfig:
    flags.setdefault("optim__optimizer", "lazy_adam")  # Adam, the notebook's optimizer
    # no user-day biases: the notebook's model has two embeddings and a mean
    return job(data, run_dir, model__dim=8, model__init_std=0.3, model__biases=biases, model__max_norm=max_norm,
               model__day_bias=False,
               train__batch_size=400, optim__lr=0.05, optim__schedule="none", **flags)


def trained_steps(cfg: config.JobConfig) -> tuple[Trainer, dict[str, torch.Tensor], list[dict]]:
    """A one-process trainer after STEPS steps of its own batches: (trainer, its initial state, the batches)."""
    tr = Trainer(cfg, DistEnv(0, 1, 0, CPU))
    initial = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    batches = []
    for batch in tr.layout.batches(0, 0):
        if len(batches) == STEPS:
            break
        batches.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
        tr.train_step(batch)
    return tr, initial, batches


def notebook(initial: dict[str, torch.Tensor], batches: list[dict], cfg: config.JobConfig) -> dict[str, torch.Tensor]:
    """What a notebook computes: ``nn.Embedding`` tables of the factors (``max_norm`` as configured) and, with
    biases, bias embeddings and a global bias; the summed squared error plus the per-rating L2, over the batch's
    ratings; SparseAdam on the embeddings and Adam on the global bias. Returns the tables in mfscale's layout
    ``[factors, bias]`` and the global bias."""
    d, o, m = cfg.model.dim, cfg.optim, cfg.model
    max_norm = m.max_norm or None

    def emb(w: torch.Tensor, bound: float | None) -> nn.Embedding:
        return nn.Embedding.from_pretrained(w.clone(), freeze=False, sparse=True, max_norm=bound)

    p, q = emb(initial["users.weight"][:, :d], max_norm), emb(initial["items.weight"][:, :d], max_norm)
    tables = [p.weight, q.weight]
    if m.biases:
        bu, bi = emb(initial["users.weight"][:, d:], None), emb(initial["items.weight"][:, d:], None)
        g = nn.Parameter(initial["global_bias"].clone())
        tables += [bu.weight, bi.weight]
        dense = torch.optim.Adam([g], lr=o.dense_lr)
    opt = torch.optim.SparseAdam(tables, lr=o.lr, betas=(o.beta1, o.beta2))
    for b in batches:
        u, i, r = b["user"].long(), b["item"].long(), b["rating"].double()
        pu, qi = p(u), q(i)
        pred = (pu * qi).sum(1)
        reg = o.reg_factor * (pu.square().sum() + qi.square().sum())
        if m.biases:
            ub, ib = bu(u)[:, 0], bi(i)[:, 0]
            pred = pred + g + ub + ib
            reg = reg + o.reg_bias * (ub.square().sum() + ib.square().sum())
        ((((pred - r) ** 2).sum() + reg) / b["global_rows"]).backward()
        opt.step()
        opt.zero_grad()
        if m.biases:
            dense.step()
            dense.zero_grad()
    with torch.no_grad():
        if m.biases:
            return {"users.weight": torch.cat([p.weight, bu.weight], 1),
                    "items.weight": torch.cat([q.weight, bi.weight], 1), "global_bias": g.detach().clone()}
        zero = torch.zeros(1, dtype=torch.float64)
        return {"users.weight": torch.cat([p.weight, zero.expand(p.weight.shape[0], 1)], 1),
                "items.weight": torch.cat([q.weight, zero.expand(q.weight.shape[0], 1)], 1),
                "global_bias": torch.zeros((), dtype=torch.float64)}


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_step_variant_equals_a_notebooks_embeddings(small_data, tmp_path, variant, option):
    """float64, a few steps: tables and global bias equal nn.Embedding + SparseAdam's; without biases the bias
    columns and the global bias stay exactly 0 (and ratings are not centred: the global bias starts at 0)."""
    if variant == "cpp":
        cpu_step.load()
    biases, max_norm = OPTIONS[option]
    cfg = short_job(small_data, tmp_path, biases, max_norm, **VARIANTS[variant])
    tr, initial, batches = trained_steps(cfg)
    assert tr.step_fn.kind == KIND[variant]
    if max_norm:  # the bound binds: rows the first batch touches start above it
        norms = initial["users.weight"][batches[0]["user"].long(), :8].norm(dim=1)
        assert 0.2 < float((norms > max_norm).double().mean()) < 0.8
    want = notebook(initial, batches, cfg)
    got = {k: v.detach() for k, v in tr.model.state_dict().items()}
    for key, ref in want.items():
        torch.testing.assert_close(got[key], ref, rtol=1e-9, atol=1e-12, msg=f"{variant} {option} {key}")
    if not biases:
        assert float(initial["global_bias"]) == 0.0 and float(got["global_bias"]) == 0.0
        assert not got["users.weight"][:, -1].any() and not got["items.weight"][:, -1].any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_options_equal_torch_ops(dtype, monkeypatch):
    """The C++ op's renorm and bias-free gradient against renorm_rows_ + closed_form_grads + LazyAdam, on both
    streaming orders (more touched users, more touched movies) and with rows untouched."""
    from .test_cpu_step import BETAS, batches, kernel_steps

    cpu_step.load()
    real = cpu_step.fused_step
    monkeypatch.setattr(cpu_step, "fused_step", lambda *a, **kw: real(*a, **kw, max_norm=1.0, biases=False))
    for n_users, n_items, sizes in ((60, 40, [500, 1, 333]), (40, 3000, [2000, 700])):
        torch.manual_seed(0)
        ref = BiasedMF(n_users, n_items, 8, init_std=0.5, biases=False).to(dtype)
        got = BiasedMF(n_users, n_items, 8, init_std=0.5, biases=False).to(dtype)
        got.load_state_dict(ref.state_dict())
        reg = torch.tensor([0.05] * 8 + [0.01], dtype=dtype)
        data = batches(n_users, n_items, sizes, dtype=dtype)
        opt = LazyAdam(ref.sparse_parameters(), lr=0.02, betas=BETAS)
        for user, item, rating in data:
            n = max(user.numel(), 1)
            for table, ids in zip(ref.sparse_parameters(), (user, item), strict=True):
                renorm_rows_(table.detach(), ids, 1.0)
            gu, gi, g_mean, _ = ref.closed_form_grads(user, item, rating, n)
            assert float(g_mean) == 0.0
            opt.step(rows=[(g.ids, g.rows, g.counts.to(dtype), reg * (2.0 / n)) for g in (gu, gi)])
        kernel_steps(got, data, reg, lr=0.02)  # the op, with both options (the patched fused_step)
        tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
        for a, b in zip(got.sparse_parameters(), ref.sparse_parameters(), strict=True):
            torch.testing.assert_close(a, b, **tol)
            assert not a[:, -1].any()


def test_two_ranks_equal_one_process_with_both_options(small_data, tmp_path):
    """Blocks (C++ op and autograd) and replicated (torch ops and autograd) on 2 gloo ranks, one epoch, float64:
    the union of the ranks' batches in one process, or the NumPy reference of the blocks step (which keeps a
    global bias per rank). Replicas renormalize every rank's rows (an all_gather of the ids)."""
    from .test_layout import assert_numpy_reference, assert_union_equal, run_ranks

    base = dict(train__batch_size=149, optim__lr=0.02, train__seed=3, optim__schedule="none", model__init_std=0.1,
                model__max_norm=0.5, model__day_bias=False)  # the union's batches carry no day rows
    cfgs = [job(small_data, tmp_path / "a", **base, train__tables="blocks", model__biases=False),
            job(small_data, tmp_path / "b", **base, train__tables="blocks"),
            job(small_data, tmp_path / "c", **base, train__tables="blocks", train__step="autograd",
                model__biases=False),
            job(small_data, tmp_path / "d", **base, train__tables="replicated"),
            job(small_data, tmp_path / "e", **base, train__tables="replicated", train__step="autograd",
                model__biases=False)]
    data = Dataset(small_data)
    for cfg, ranks in zip(cfgs, run_ranks(cfgs, 2, tmp_path), strict=True):
        if ranks[0]["local_bias"]:
            assert_numpy_reference(ranks, cfg, data)
        else:
            assert_union_equal(ranks, cfg, data)
        if not cfg.model.biases:
            for r in ranks:
                t = r["tensors"]
                assert not t["users.weight"][:, -1].any() and not t["items.weight"][:, -1].any()
                assert float(t["global_bias"]) == 0.0


def test_evaluation_uses_the_capped_vectors_and_no_biases(small_data, tmp_path):
    """Validation RMSE of a max_norm, biases-off layout is clip(<cap(p_u), cap(q_i)>) against the ratings, and the
    tables themselves are not changed by evaluating."""
    tr = Trainer(short_job(small_data, tmp_path, False, 0.8), DistEnv(0, 1, 0, CPU))
    users, items = (t.detach().clone() for t in tr.model.sparse_parameters())
    got = evaluate(tr.layout, "val", batch_size=100)
    assert torch.equal(users, tr.model.users.weight) and torch.equal(items, tr.model.items.weight)
    val = Dataset(small_data).read_split("val")
    p = nn.Embedding.from_pretrained(users[:, :8].clone(), max_norm=0.8)
    q = nn.Embedding.from_pretrained(items[:, :8].clone(), max_norm=0.8)
    u, i = torch.from_numpy(val["user"].astype(np.int64)), torch.from_numpy(val["item"].astype(np.int64))
    pred = (p(u) * q(i)).sum(1).clamp(0.5, 5.0)
    rmse = float(((pred - torch.from_numpy(val["rating"])) ** 2).double().mean().sqrt())
    assert got["rmse"] == pytest.approx(rmse, rel=1e-5)
    assert got["rmse"] != pytest.approx(evaluate(Trainer(short_job(small_data, tmp_path / "x", False, 0.0),
                                                         DistEnv(0, 1, 0, CPU)).layout, "val", batch_size=100)["rmse"])


@pytest.fixture(scope="module")
def plain_run(small_data, tmp_path_factory) -> Path:
    """A short run trained without biases and with max_norm 0.6 (dim 8)."""
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    run(job(small_data, run_dir, model__dim=8, model__init_std=0.1, model__biases=False, model__max_norm=0.6,
            train__epochs=2, train__batch_size=500, optim__lr=0.02, train__ranking_k=5))
    return run_dir


def test_a_plain_mf_run_saves_no_biases_and_the_tools_use_none(small_data, plain_run, tmp_path):
    """Checkpoint: global bias 0, bias columns 0, config biases off. recommend scores clip(<p_u, q_i>); the export
    says so and its files reproduce the run's test RMSE with dot products alone; analyze clusters the vectors."""
    assert "biases = false" in (plain_run / "config.toml").read_text()
    state, path = checkpoint.load_best(plain_run)
    whole = checkpoint.assemble(path, state)
    assert float(whole["global_bias"]) == 0.0 and not whole["users.weight"][:, -1].any()
    assert not whole["items.weight"][:, -1].any()

    run_ = load_run(plain_run)
    assert not run_.model.biases and run_.max_norm == 0.6
    p, _, q, _ = (t.detach() for t in run_.model.factors())
    # the vectors predicted with (float32: a renormed row's norm is 0.6 to within its rounding)
    assert float(p.norm(dim=1).max()) <= 0.6 * (1 + 1e-6) and float(q.norm(dim=1).max()) <= 0.6 * (1 + 1e-6)
    rec = Recommender(run_)
    top = rec.top_k(np.array([0, 5]), 4)
    for row, user in enumerate((0, 5)):
        want = (q[torch.from_numpy(top.items[row])] @ p[user]).clamp(0.5, 5.0).numpy()
        np.testing.assert_allclose(top.scores[row], want, rtol=1e-6)

    out = tmp_path / "export"
    assert export_main(["--run", str(plain_run), "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["biases"] is False and meta["max_norm"] == 0.6 and "bias" not in meta["prediction"]
    assert meta["day_bias"] is None and not list(out.glob("user_day_*"))  # plain MF has no user-day biases
    assert "without biases" in (out / "README.txt").read_text()
    assert not np.load(out / "user_bias.npy").any() and float(np.load(out / "global_mean.npy")) == 0.0
    pu, qi = np.load(out / "user_factors.npy"), np.load(out / "item_factors.npy")
    test = Dataset(small_data).read_split("test")
    pred = np.clip((pu[test["user"]] * qi[test["item"]]).sum(1), 0.5, 5.0)
    metrics = json.loads((plain_run / "metrics.json").read_text())
    assert math.sqrt(float(((pred - test["rating"]) ** 2).mean())) == pytest.approx(metrics["test_rmse"], rel=1e-5)

    result = cluster_movies(run_, 3, min_ratings=5)
    assert sum(c.size for c in result.clusters) == result.movies.height > 0


def test_loaders_honour_the_saved_options_whatever_the_tables_hold(small_data, tmp_path):
    """A checkpoint whose config says biases off and max_norm 0.5 but whose tables hold biases and long vectors:
    the loaded model has no biases and capped vectors (the config saved with the run is what it was trained as)."""
    data = Dataset(small_data)
    torch.manual_seed(0)
    model = BiasedMF(data.n_users, data.n_items, 4, init_std=1.0)
    with torch.no_grad():
        model.users.weight[:, -1] = 0.3
        model.items.weight[:, -1] = -0.2
    state = {"config": {"data": {"path": str(small_data)}, "model": {"biases": False, "max_norm": 0.5}},
             "model_shape": {"n_users": data.n_users, "n_items": data.n_items, "dim": 4}, "global_step": 1}
    checkpoint.save_whole_model(tmp_path / "r", state, model.users.weight.detach(), model.items.weight.detach(),
                                torch.tensor(3.5), step=1, is_best=True)
    loaded = load_run(tmp_path / "r").model
    assert not loaded.biases and float(loaded.global_bias) == 0.0 and not loaded.users.weight[:, -1].any()
    ref = nn.Embedding.from_pretrained(model.items.weight[:, :4].detach().clone(), max_norm=0.5)
    torch.testing.assert_close(loaded.items.weight[:, :4], ref(torch.arange(data.n_items)))


def test_flags_and_refusals(small_data, tmp_path):
    """--model.biases on|off and --model.max_norm parse; a bad value, a negative bound and resuming a run with the
    other biases setting are one-line ConfigErrors."""
    argv = ["--data", str(small_data), "--model.biases", "off", "--model.max_norm", "1"]
    cfg = config.from_args(argv)
    assert cfg.model.biases is False and cfg.model.max_norm == 1.0
    assert config.from_args(["--data", str(small_data)]).model.biases is True
    for bad, match in ((["--model.biases", "maybe"], "model.biases: expected bool"),
                       (["--model.max_norm", "-1"], "model.max_norm must be"),
                       (["--model.max_norm", "nan"], "model.max_norm must be")):
        with pytest.raises(ConfigError, match=match):
            config.from_args(["--data", str(small_data), *bad])
    run_dir = tmp_path / "run"
    run(job(small_data, run_dir, model__dim=4, train__epochs=1, train__batch_size=2000, train__ranking_k=0,
            model__biases=False))
    with pytest.raises(ConfigError, match="trained with --model.biases off, this run has --model.biases on") as err:
        Trainer(job(small_data, run_dir, model__dim=4, train__epochs=2), DistEnv(0, 1, 0, CPU)).resume()
    assert "\n" not in str(err.value)

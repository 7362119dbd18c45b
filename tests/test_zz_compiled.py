"""torch.compile'd kernels. This file runs last on purpose: compiled CPU kernels start OpenMP threads in the
pytest process, and GNU OpenMP is not fork-safe, so tests that fork gloo ranks afterwards could hang."""

from __future__ import annotations

import torch

from mfscale.model import batch_errors
from mfscale.optim import RowRMSprop

from .test_optim import check_dense_form_equals_row_form, one_epoch


def test_compiled_dense_form_equals_row_form():
    check_dense_form_equals_row_form(compiled=True)
    check_dense_form_equals_row_form(compiled=True, cls=RowRMSprop)  # its masked sweep: no sync on a GPU


def test_compiled_fused_step_equals_eager(small_data, tmp_path):
    """torch.compile'd kernels (fused arithmetic, other rounding) track the eager fused step closely: tables, the
    global bias and the optimizer's state (the default RowRMSprop's row state)."""
    from .test_train import trainer_tensors

    eager_tr, _ = one_epoch(small_data, tmp_path / "eager", train__compile="off", train__cpu_kernel="off")
    tr, _ = one_epoch(small_data, tmp_path / "compiled", train__compile="on", train__cpu_kernel="off")
    assert tr.optims.tables.compile and tr.step_fn.errors is not batch_errors
    eager, compiled = trainer_tensors(eager_tr), trainer_tensors(tr)
    assert "users.weight.row_sq" in compiled and compiled.keys() == eager.keys()
    for k, v in eager.items():
        torch.testing.assert_close(compiled[k], v, rtol=1e-4, atol=1e-6)


def test_kernels_compiled_at_warm_up_serve_the_whole_epoch(small_data, tmp_path):
    """After the trainer's warm-up, training on real table sizes and batch positions compiles nothing more
    (a recompile costs seconds inside the first epoch); both optimizer forms occur in the epoch."""
    from mfscale import config
    from mfscale.distributed import DistEnv
    from mfscale.train import Trainer

    from .test_train import job

    torch._dynamo.reset()  # a fresh cache: what the warm-up compiles is all there is
    cfg = job(small_data, tmp_path, train__compile="on", train__batch_size=500, data__resident="on",
              train__cpu_kernel="off")
    tr = Trainer(config.replace(cfg), DistEnv(0, 1, 0, torch.device("cpu")))
    tr.dense_min = (150, 100)  # users: dense when 150 of 300 rows are touched; movies: 100 of 200
    forms = set()
    tr.layout.stream.set_epoch(0, 0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in tr.layout.stream:
            forms.add((batch["user"].unique().numel() >= 150, batch["item"].unique().numel() >= 100))
            tr.train_step(batch)
    assert len(forms) >= 2


def test_compiled_step_with_model_options_equals_eager(small_data, tmp_path):
    """Plain MF with a binding max_norm (issue 24; factor norms start near 0.08) through the compiled kernels: the
    eager step's numbers, and the bias columns and the global bias exactly 0."""
    opts = {"model__biases": False, "model__max_norm": 0.05, "train__cpu_kernel": "off"}
    _, eager = one_epoch(small_data, tmp_path / "eager", train__compile="off", **opts)
    tr, compiled = one_epoch(small_data, tmp_path / "compiled", train__compile="on", **opts)
    assert tr.step_fn.kind == "compiled"
    for k, v in eager.items():
        torch.testing.assert_close(compiled[k], v, rtol=1e-4, atol=1e-6)
    assert float(compiled["global_bias"]) == 0.0
    assert not compiled["users.weight"][:, -1].any() and not compiled["items.weight"][:, -1].any()

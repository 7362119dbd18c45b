"""torch.compile'd kernels. This file runs last on purpose: compiled CPU kernels start OpenMP threads in the
pytest process, and GNU OpenMP is not fork-safe, so tests that fork gloo ranks afterwards could hang."""

from __future__ import annotations

import torch

from mfscale.model import batch_errors

from .test_optim import one_epoch, test_dense_form_equals_row_form


def test_compiled_dense_form_equals_row_form():
    test_dense_form_equals_row_form(compiled=True)


def test_compiled_fused_step_equals_eager(small_data, tmp_path):
    """torch.compile'd kernels (fused arithmetic, other rounding) track the eager fused step closely."""
    _, eager = one_epoch(small_data, tmp_path / "eager", train__compile="off")
    tr, compiled = one_epoch(small_data, tmp_path / "compiled", train__compile="on")
    assert tr.opt_sparse.compile and tr.errors is not batch_errors
    for k, v in eager.items():
        torch.testing.assert_close(compiled[k], v, rtol=1e-4, atol=1e-6)

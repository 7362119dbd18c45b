"""Implicit feedback (``--model.implicit``, SVD++ as a prior on the users; mfscale/implicit.py): the whole epoch on 2
ranks of the blocks layout (y rotating with its movies) and on one process against a NumPy reference written from
the module's formulas and the config; every step kind agreeing; the fold-in and the export's recipe pulling a new
user toward their implicit vector; one-line errors. A blocks run resumed inside a phase ends bit-identical with its
implicit rows: tests/test_time_bias.py (one crash for both options)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from mfscale import export
from mfscale.errors import ConfigError
from mfscale.recommend import fold_in
from mfscale.runs import load_run
from mfscale.shards import Dataset
from mfscale.train import run

from .test_train import job


class ImplicitReference:
    """The implicit rows' epoch in NumPy (float64), from the module docstring and the config: at the first step of
    each phase of each rank, the phase's y rows take ``y_j -= (reg_implicit m_j^r y_j - sum_{u in N(j), u of the
    rank} reg_factor sqrt(n_u) (p_u - z_u)) / D_j``, ``D_j = sum_{u in N(j)} (reg_factor n_u + reg_implicit)`` over
    the whole split, then ``z'_u += n_u^-1/2 sum_{j in N(u), j of the phase} y_j``; at the epoch's end z = z', z' = 0.
    The users' L2 in each step pulls toward z (``prior``: hooked into tests/test_layout.py's numpy_reference)."""

    def __init__(self, cfg, data: Dataset, ranks: list[dict], z0: np.ndarray):
        train = data.read_split("train")
        self.u, self.i = train["user"].astype(np.int64), train["item"].astype(np.int64)
        self.reg, self.reg_y, self.d = cfg.optim.reg_factor, cfg.optim.reg_implicit, cfg.model.dim
        self.n = np.bincount(self.u, minlength=data.n_users).astype(np.float64)
        self.big_d = np.bincount(self.i, weights=self.reg * self.n[self.u] + self.reg_y, minlength=data.n_items)
        self.y = np.zeros((data.n_items, self.d))
        self.z, self.z_next = z0.copy(), np.zeros_like(z0)
        self.groups = [rank["groups"] for rank in ranks]
        self.last = [None] * len(ranks)
        self.visits = 0

    def before_step(self, step: list[dict], tables: dict[str, np.ndarray]) -> None:
        for r, batch in enumerate(step):
            if batch["group"] != self.last[r]:  # the rank's phase starts with this step
                self.last[r] = batch["group"]
                self.visit(r, batch["group"], tables["users"])

    def visit(self, r: int, group, p: np.ndarray) -> None:
        users, movies = self.groups[r][group]
        sel = np.isin(self.u, users) & np.isin(self.i, movies)
        u, i = self.u[sel], self.i[sel]
        residual = p[:, :self.d] - self.z
        grad = np.zeros_like(self.y)
        np.add.at(grad, i, -self.reg * np.sqrt(self.n[u])[:, None] * residual[u])
        grad += self.reg_y * np.bincount(i, minlength=len(self.y))[:, None] * self.y
        has = self.big_d[movies] > 0
        self.y[movies[has]] -= grad[movies[has]] / self.big_d[movies[has], None]
        np.add.at(self.z_next, u, self.y[i] / np.sqrt(self.n[u])[:, None])
        self.visits += 1

    def prior(self, table: str, rows: np.ndarray) -> np.ndarray:
        if table == "items":
            return 0.0
        return np.c_[self.z[rows], np.zeros(rows.sum() if rows.dtype == bool else len(rows))]

    def end_epoch(self) -> dict[str, np.ndarray]:
        self.z, self.z_next = self.z_next, np.zeros_like(self.z_next)
        return {"y": self.y, "z": self.z, "z_next": self.z_next}


def test_an_epoch_on_two_ranks_and_on_one_process_equals_the_numpy_reference(small_data, tmp_path):
    """Blocks on 2 ranks in 2 pieces (y rotating with its movie pieces, 1 / D with it) and one process: every rank's
    rows and state, y by movie, z and z' by user equal the reference after one epoch, float64. The users start from a
    non-zero z, so the steps' pull toward it counts from the first step."""
    from .test_layout import assert_numpy_reference, row_floats, run_ranks, starting_z

    base = dict(train__batch_size=97, optim__lr=0.02, train__seed=3, optim__schedule="none", model__implicit=True,
                optim__reg_implicit=0.5, model__dim=4)
    blocks = job(small_data, tmp_path / "a", **base, train__tables="blocks", train__block_pieces=2)
    one = job(small_data, tmp_path / "b", **base, train__tables="replicated")
    data = Dataset(small_data)
    z0 = starting_z(np.arange(data.n_users), blocks.model.dim)
    (ranks,) = run_ranks([blocks], 2, tmp_path)
    (tmp_path / "one").mkdir()
    (single,) = run_ranks([one], 1, tmp_path / "one")
    for cfg, got, visits in ((blocks, ranks, 2 * 2 * 2), (one, single, 1)):
        ref = ImplicitReference(cfg, data, got, z0)
        want = assert_numpy_reference(got, cfg, data, {"implicit": ref})["implicit"]
        assert ref.visits == visits  # every (rank, phase) of the epoch visited once
        assert np.abs(want["y"]).max() > 1e-3 and np.abs(want["z"]).max() > 1e-4
        for r, rank in enumerate(got):
            t = rank["tensors"]
            items, users = t["implicit.items.ids"], t["implicit.users.ids"]
            assert np.array_equal(items, t["items.ids"]) and np.array_equal(users, t["users.ids"])
            np.testing.assert_allclose(t["implicit.items.weight"][:, :-1], want["y"][items], rtol=1e-6, atol=1e-10,
                                       err_msg=f"rank {r} y")
            np.testing.assert_allclose(1 / t["implicit.items.weight"][:, -1], ref.big_d[items], rtol=1e-9,
                                       err_msg=f"rank {r} D")
            zz = t["implicit.users.weight"]
            np.testing.assert_allclose(zz[:, :cfg.model.dim], want["z"][users], rtol=1e-6, atol=1e-10,
                                       err_msg=f"rank {r} z")
            assert not zz[:, cfg.model.dim:].any()  # z' starts the next epoch at 0
    # a movie row travels with its y and 1 / D: dim + 1 float64 more per movie
    assert {r["bytes_sent"] for r in ranks} == {data.n_items * (row_floats(blocks) + blocks.model.dim + 1) * 8}


def fit(data, run_dir, **kw):
    cfg = job(data, run_dir, **({"train__epochs": 2, "model__dim": 8, "optim__lr": 0.02, "train__batch_size": 512,
                                 "train__device": "cpu", "model__implicit": True, "train__ranking_k": 0} | kw))
    return run(cfg)


def test_every_step_kind_trains_the_same_model(small_data, tmp_path):
    """The C++ op (its user_prior), the torch-ops step and autograd (the L2 written as |u - z|^2) agree."""
    results = {kind: fit(small_data, tmp_path / kind.replace(" ", "_"), **kw)["test_rmse"]
               for kind, kw in (("cpp", {}), ("eager", {"train__cpu_kernel": "off"}),
                                ("autograd", {"train__step": "autograd"}))}
    assert max(results.values()) - min(results.values()) < 1e-4, results
    plain = fit(small_data, tmp_path / "plain", model__implicit=False)["test_rmse"]
    assert plain != results["cpp"]  # the prior moved the model


def test_fold_in_and_the_export_recipe_pull_a_new_user_toward_their_implicit_vector(small_data, tmp_path):
    """A new user's ridge: the gradient of sum e^2 + (n + prior)(reg_factor |p - z|^2 + reg_bias b^2), z = n^-1/2 sum
    of the rated movies' y rows, vanishes at the fold-in's answer (NumPy, from the formula); the export's README
    recipe, run as written, gives the same numbers."""
    from .test_foldin import export_recipe

    fit(small_data, tmp_path / "run")
    run_ = load_run(tmp_path / "run")
    y_rows = run_.implicit_rows()
    assert y_rows is not None and np.abs(y_rows).max() > 0
    train = run_.data.read_split("train")
    mine = train["user"] == 0
    movie_ids = run_.movies["movie_id"].to_numpy()
    ratings = pl.DataFrame({"user_id": np.full(mine.sum(), 10**6), "movie_id": movie_ids[train["item"][mine]],
                            "rating": train["rating"][mine].astype(np.float64)})
    folded = fold_in(run_, ratings, prior=16.0)
    p, b = folded.p[0].double().numpy(), float(folded.bu[0])
    _, _, q, bi = (t.detach().double().numpy() for t in run_.model.factors())
    rows = train["item"][mine].astype(np.int64)
    z = y_rows[rows].sum(0) / np.sqrt(len(rows))
    assert np.abs(z).max() > 1e-4
    err = ratings["rating"].to_numpy() - float(run_.model.global_bias) - bi[rows] - b - q[rows] @ p
    n = len(rows) + 16.0
    grad = np.r_[-2 * (err[:, None] * q[rows]).sum(0) + 2 * n * run_.reg_factor * (p - z),
                 -2 * err.sum() + 2 * n * run_.reg_bias * b]
    assert np.abs(grad).max() < 1e-4 * np.abs(2 * (ratings["rating"].to_numpy()[:, None] * q[rows]).sum(0)).max()
    export.main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "exp")])
    meta = json.loads((tmp_path / "exp" / "meta.json").read_text())
    assert meta["implicit"] is True and (tmp_path / "exp" / "item_implicit.npy").is_file()
    code = export_recipe(tmp_path / "exp")
    keys, _ = run_.day_biases()
    space = {"USER_ID": int(run_.users["user_id"][0]), "MOVIE_ID": int(movie_ids[0]),
             "TIMESTAMP": int(keys[0] & ((1 << 20) - 1)) * 86400,
             "NEW_USER_MOVIE_IDS": ratings["movie_id"].to_list(), "NEW_USER_RATINGS": ratings["rating"].to_list()}
    default = fold_in(run_, ratings)  # the recipe uses the calibrated prior from meta.json
    exec(code, space)  # noqa: S102 - the export's own documentation, run as a user would
    assert np.allclose(space["p_new"], default.p[0].double().numpy(), atol=1e-5)


@pytest.mark.parametrize(("flags", "message"), [
    ({"optim__optimizer": "sgd", "optim__lr": 0.03}, "--optim.optimizer sgd"),
    ({"optim__reg_implicit": -1.0}, "optim.reg_implicit"),
])
def test_settings_it_cannot_train_are_one_clear_line(small_data, tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        job(small_data, tmp_path, model__implicit=True, **flags)

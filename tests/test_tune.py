"""``python -m mfscale.tune`` (issue 23): real searches on small data, resumable, never reading the test split."""

from __future__ import annotations

import sys

import pytest

from mfscale import config, shards, tune

optuna = pytest.importorskip("optuna", reason="the tune extra (optuna) is not installed")


def trials(study_dir):
    return optuna.load_study(study_name=tune.STUDY_NAME, storage=f"sqlite:///{study_dir / 'study.db'}").trials


def test_search_writes_a_best_config_and_resumes(small_data, tmp_path, monkeypatch, capsys):
    read = []
    original = shards.Dataset.read_split

    def recording(self, split, *args, **kwargs):
        read.append(split)
        return original(self, split, *args, **kwargs)

    monkeypatch.setattr(shards.Dataset, "read_split", recording)
    study = tmp_path / "study"
    base = ["--data", str(small_data), "--train.ranking_k", "0", "--train.patience", "2"]
    assert tune.main(["--study", str(study), "--trials", "3", *base]) == 0
    assert "test" not in read and "val" in read  # the search never looks at the test split
    done = trials(study)
    assert len(done) == 3 and all(t.state.name in ("COMPLETE", "PRUNED") for t in done)
    assert all(t.intermediate_values for t in done)  # each epoch's val RMSE reached the pruner
    best = min((t for t in done if t.state.name == "COMPLETE"), key=lambda t: t.value)
    cfg = config.from_args(["--config", str(study / "best.toml"), "--run-dir", str(tmp_path / "run")])
    assert (cfg.optim.lr, cfg.optim.reg_factor, cfg.model.dim, cfg.train.epochs, cfg.model.biases) == (
        best.params["lr"], best.params["reg_factor"], best.params["dim"], best.params["epochs"], best.params["biases"])
    assert cfg.data.path == str(small_data) and cfg.train.patience == 2  # the fixed part of the job is kept
    assert (study / "trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(study.glob("trial-*"))  # trial runs removed (--keep-runs keeps them)
    out = capsys.readouterr().out
    assert f"validation RMSE {best.value:.4f}" in out
    # a second call continues the same study up to --trials finished trials in all, with new draws
    assert tune.main(["--study", str(study), "--trials", "4", *base]) == 0
    again = trials(study)
    assert len(again) == 4 and again[3].params != again[0].params


def test_without_optuna_is_one_line(small_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(SystemExit) as se:
        tune.main(["--study", str(tmp_path / "s"), "--data", str(small_data)])
    assert se.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("mfscale.tune: error: mfscale.tune needs Optuna, which is not installed: "
                   "python -m pip install -e '.[tune]'")


def test_search_chooses_between_optimizers_each_with_its_own_lr_range(small_data, tmp_path):
    """``--optimizers row_rmsprop,sgd``: the optimizer is sampled, sgd's trials draw ``lr_sgd`` (its per-rating
    range) and no max_norm (sgd has none) nor time-aware biases nor implicit feedback, and best.toml replays whichever
    won. An unknown name is one line."""
    study = tmp_path / "study"
    base = ["--data", str(small_data), "--train.ranking_k", "0", "--train.patience", "2", "--device", "cpu"]
    # --tune-seed 1: a sampler seed whose first 4 (random) draws hold both optimizers (seed 0's are all sgd)
    assert tune.main(["--study", str(study), "--trials", "4", "--optimizers", "row_rmsprop,sgd", "--tune-seed", "1",
                      *base]) == 0
    done = trials(study)
    assert {t.params["optimizer"] for t in done} == {"row_rmsprop", "sgd"}
    for t in done:
        sgd = t.params["optimizer"] == "sgd"
        assert ("lr_sgd" in t.params, "lr" in t.params, "max_norm" in t.params) == (sgd, not sgd, not sgd)
        # the time-aware biases are drawn where the trial can train them: bias terms, not in sgd's op
        timed = t.params["biases"] and not sgd
        assert ("time_bins" in t.params, "user_drift" in t.params) == (timed, timed)
        assert ("implicit" in t.params) == (not sgd)  # sgd's op has no prior to pull the users toward
        if sgd:
            assert 5e-3 <= t.params["lr_sgd"] <= 6e-2
    best = min((t for t in done if t.state.name == "COMPLETE"), key=lambda t: t.value)
    cfg = config.from_args(["--config", str(study / "best.toml"), "--run-dir", str(tmp_path / "run")])
    assert cfg.optim.optimizer == best.params["optimizer"]
    assert cfg.optim.lr == best.params["lr_sgd" if cfg.optim.optimizer == "sgd" else "lr"]
    assert (cfg.model.time_bins, cfg.model.user_drift) == (best.params.get("time_bins", 0),
                                                           best.params.get("user_drift", False))
    assert cfg.model.implicit == best.params.get("implicit", False)
    with pytest.raises(SystemExit) as se:
        tune.main(["--study", str(tmp_path / "s2"), "--optimizers", "row_rmsprop,adagrad", *base])
    assert se.value.code == 2

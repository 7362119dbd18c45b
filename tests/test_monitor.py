"""mfscale.monitor: TensorBoard scalars, purge on resume, config text, hparams, projector, disabled mode."""

from __future__ import annotations

from pathlib import Path

import torch

from mfscale.monitor import Monitor, config_to_toml, flatten, read_scalars

TAGS = ["train/loss", "val/rmse", "throughput/ratings_per_s", "time/step_ms", "time/data_wait_pct", "lr/sparse"]


def test_scalars_round_trip(tmp_path):
    log = tmp_path / "tb"
    with Monitor(log, enabled=True) as mon:
        for step in range(1, 4):
            mon.scalars(step, {tag: step * (i + 1) + 0.5 for i, tag in enumerate(TAGS)})
        mon.scalars(4, {"train/loss": torch.tensor(0.25)})  # 0-d tensors are accepted
        mon.flush()
    got = read_scalars(log)
    assert set(got) == set(TAGS)
    assert got["val/rmse"] == [(1, 2.5), (2, 4.5), (3, 6.5)]
    assert got["train/loss"] == [(1, 1.5), (2, 2.5), (3, 3.5), (4, 0.25)]
    assert read_scalars(tmp_path / "missing") == {}


def test_purge_step_on_reopen(tmp_path):
    log = tmp_path / "tb"
    mon = Monitor(log, enabled=True)
    for step in range(10):
        mon.scalars(step, {"train/loss": float(step)})
    mon.close()  # "killed" after step 9; the checkpoint was at step 6

    mon = Monitor(log, enabled=True, purge_step=6)
    for step in range(6, 8):
        mon.scalars(step, {"train/loss": 100.0 + step})
    mon.close()
    assert read_scalars(log)["train/loss"] == [(s, float(s)) for s in range(6)] + [(6, 106.0), (7, 107.0)]


def test_config_hparams_and_embeddings(tmp_path):
    log = tmp_path / "tb"
    config = {
        "model": {"dim": 64, "bias": True, "init": None},
        "optim": {"lr": {"sparse": 0.01, "dense": 1e-3}, "betas": [0.9, 0.999]},
        "data": Path("/data/ml-25m"),
        "seed": 0,
    }
    mon = Monitor(log, enabled=True)
    mon.text_config(config)
    mon.hparams(config, {"hparam/test_rmse": 0.81, "hparam/val_rmse": 0.8})
    labels = [
        {"title": "Toy Story (1995)", "year": 1995, "genres": "Adventure|Animation"},
        {"title": "Tab\there\nnewline", "year": None, "genres": ["Drama", "Comedy"]},
        {"title": "No genres", "year": 2001},
    ]
    mon.embeddings(torch.randn(3, 8), labels, tag="movies", step=0)
    mon.close()

    events = sorted(p.name for p in log.iterdir() if "tfevents" in p.name)
    assert len(events) == 2  # main writer + the hparams record, both directly in the run dir
    scalars = read_scalars(log)
    assert scalars["hparam/test_rmse"] == [(0, 0.8100000023841858)]

    pbtxt = (log / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "movies:00000"' in pbtxt
    meta = (log / "00000" / "movies" / "metadata.tsv").read_text().split("\n")
    assert meta[-1] == "" and len(meta) == 5
    rows = [line.split("\t") for line in meta[:-1]]
    assert rows[0] == ["title", "year", "genres"]
    assert rows[1] == ["Toy Story (1995)", "1995", "Adventure|Animation"]
    assert rows[2] == ["Tab here newline", "", "Drama|Comedy"]
    assert rows[3] == ["No genres", "2001", ""]
    assert all(len(r) == 3 for r in rows)
    tensors = (log / "00000" / "movies" / "tensors.tsv").read_text().splitlines()
    assert len(tensors) == 3 and len(tensors[0].split("\t")) == 8

    # a resumed run adds another embedding without losing the first one's projector entry
    mon = Monitor(log, enabled=True, purge_step=5)
    mon.embeddings(torch.randn(3, 8), labels, tag="movies", step=5)
    mon.close()
    pbtxt = (log / "projector_config.pbtxt").read_text()
    assert pbtxt.count("embeddings {") == 2 and 'tensor_name: "movies:00005"' in pbtxt


def test_hparams_and_config_helpers():
    flat = flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": 2.0})
    assert flat == {"a.b": 1, "a.c.d": "x", "e": 2.0}
    toml = config_to_toml({"seed": 1, "model": {"dim": 8, "init": None, "name": 'a"b'}, "optim": {"lr": {"x": 0.5}}})
    assert toml.splitlines() == [
        "seed = 1",
        "",
        "[model]",
        "dim = 8",
        "# init = (unset)",
        'name = "a\\"b"',
        "",
        "[optim.lr]",
        "x = 0.5",
    ]


def test_disabled_creates_nothing(tmp_path):
    log = tmp_path / "tb"
    mon = Monitor(log, enabled=False, purge_step=3)
    mon.scalars(1, {"train/loss": 1.0})
    mon.text_config({"a": 1})
    mon.hparams({"a": 1}, {"hparam/test_rmse": 1.0})
    mon.embeddings(torch.zeros(2, 2), [{"title": "a"}, {"title": "b"}])
    mon.flush()
    mon.close()
    mon.close()
    assert not log.exists()
    assert list(tmp_path.iterdir()) == []

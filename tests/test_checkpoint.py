"""mfscale.checkpoint: atomic saves, pruning, corrupt-file fallback and failure during save."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import torch

from mfscale import checkpoint as ck
from mfscale.errors import ConfigError, DataError


def make_state(step: int) -> dict:
    torch.manual_seed(step)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = torch.optim.SparseAdam(emb.parameters(), lr=0.01)
    emb(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    return {
        "model": emb.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
        "config": {"dim": 4, "lr": {"sparse": 0.01}, "data": "/tmp/x"},  # plain data: loaded without unpickling
        "epoch": 1,
        "step": step,
        "stream": {"epoch": 1, "group": 7, "offset": 1024},
    }


def steps(run_dir: Path) -> list[int]:
    return [int(p.stem.split("-")[1]) for p in ck.list_checkpoints(run_dir)]


def test_round_trip(tmp_path):
    state = make_state(5)
    random.random()  # advance so the saved state differs from the current one
    path = ck.save_checkpoint(tmp_path, state, step=5)
    assert path == tmp_path / "checkpoints" / "step-0000000005.pt"
    loaded, lpath = ck.load_latest(tmp_path)
    assert lpath == path
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for k, v in state["optimizer"]["state"][0].items():
        assert torch.equal(torch.as_tensor(loaded["optimizer"]["state"][0][k]), torch.as_tensor(v))
    assert loaded["rng"]["python"] == state["rng"]["python"]
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    assert loaded["config"] == state["config"] and loaded["stream"] == state["stream"]

    # the loaded optimizer state is usable again
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb.load_state_dict(loaded["model"])
    opt = torch.optim.SparseAdam(emb.parameters(), lr=0.01)
    opt.load_state_dict(loaded["optimizer"])
    random.setstate(loaded["rng"]["python"])
    assert ck.load_best(tmp_path) is None


def test_nothing_on_disk(tmp_path):
    assert ck.list_checkpoints(tmp_path) == []
    assert ck.load_latest(tmp_path) is None
    assert ck.load_best(tmp_path) is None
    assert not (tmp_path / "checkpoints").exists()


def test_keep_last_prunes_but_keeps_best(tmp_path):
    for s in range(1, 7):
        ck.save_checkpoint(tmp_path, {"step": s}, step=s * 10, keep_last=3, is_best=(s == 2))
        assert len(ck.list_checkpoints(tmp_path)) == min(s, 3)
    assert steps(tmp_path) == [40, 50, 60]
    best, bpath = ck.load_best(tmp_path)
    assert best == {"step": 2} and bpath.name == "best.pt"
    assert ck.load_latest(tmp_path)[0] == {"step": 6}
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.pt", "step-0000000040.pt", "step-0000000050.pt", "step-0000000060.pt"]

    ck.save_checkpoint(tmp_path, {"step": 7}, step=70, keep_last=1, is_best=True)
    assert steps(tmp_path) == [70]
    assert ck.load_best(tmp_path)[0] == {"step": 7}


def test_resaving_earlier_step_drops_abandoned_future(tmp_path):
    for s in (10, 20, 30):
        ck.save_checkpoint(tmp_path, {"s": s}, step=s)
    ck.save_checkpoint(tmp_path, {"s": 25}, step=25)  # resumed from 20 after 30 went bad
    assert steps(tmp_path) == [10, 20, 25]
    assert ck.load_latest(tmp_path)[0] == {"s": 25}


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError):
        ck.save_checkpoint(tmp_path, {}, step=1, keep_last=0)
    with pytest.raises(ValueError):
        ck.save_checkpoint(tmp_path, {}, step=-1)
    with pytest.raises(TypeError):
        ck.save_checkpoint(tmp_path, [1, 2], step=1)  # type: ignore[arg-type]


def test_truncated_and_garbage_are_skipped(tmp_path):
    ck.save_checkpoint(tmp_path, {"s": 1, "w": torch.arange(1000.0)}, step=1)
    p2 = ck.save_checkpoint(tmp_path, {"s": 2, "w": torch.arange(1000.0)}, step=2)
    data = p2.read_bytes()
    p2.write_bytes(data[: len(data) // 2])
    garbage = ck.step_path(tmp_path, 3)
    garbage.write_bytes(b"\x00not a checkpoint at all" * 10)

    with pytest.warns(ck.CorruptCheckpointWarning) as rec:
        state, path = ck.load_latest(tmp_path)
    assert state["s"] == 1 and path == ck.step_path(tmp_path, 1)
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 2
    assert msgs[0].startswith(f"skipping corrupt checkpoint {garbage}: ")
    assert msgs[1].startswith(f"skipping corrupt checkpoint {p2}: ")
    assert all("\n" not in m for m in msgs)


def test_foreign_and_misnamed_files_are_invalid(tmp_path):
    ck.save_checkpoint(tmp_path, {"s": 1}, step=1)
    torch.save({"weight": torch.ones(2)}, ck.step_path(tmp_path, 2))  # no integrity record
    (tmp_path / "checkpoints" / "step-0000000001.pt").rename(ck.step_path(tmp_path, 3))  # wrong step
    with pytest.warns(ck.CorruptCheckpointWarning):
        assert ck.load_latest(tmp_path) is None
    ck.best_path(tmp_path).write_bytes(b"junk")
    with pytest.warns(ck.CorruptCheckpointWarning, match="best.pt"):
        assert ck.load_best(tmp_path) is None


def test_stale_tmp_removed_on_save(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    stale = [d / ".tmp-step-0000000009.pt.1234.abcd", d / ".tmp-best.pt.99.ffff"]
    for p in stale:
        p.write_bytes(b"partial")
    (d / "notes.txt").write_text("keep me")
    ck.save_checkpoint(tmp_path, {"a": 1}, step=10)
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt", "step-0000000010.pt"]


def test_failed_save_leaves_previous_latest(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, {"s": 1}, step=1, keep_last=1)
    ck.save_checkpoint(tmp_path, {"s": 2}, step=2, keep_last=1, is_best=True)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(DataError, match="^no space left in .*checkpoints: writing step-0000000003.pt needs about"):
        ck.save_checkpoint(tmp_path, {"s": 3}, step=3, keep_last=1, is_best=True)
    monkeypatch.setattr(torch, "save", real_save)

    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.pt", "step-0000000002.pt"]  # nothing pruned, no tmp, no partial final name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ck.load_latest(tmp_path)[0] == {"s": 2}
        assert ck.load_best(tmp_path)[0] == {"s": 2}


def test_map_location(tmp_path):
    ck.save_checkpoint(tmp_path, {"t": torch.ones(3)}, step=0)
    state, _ = ck.load_latest(tmp_path, map_location=torch.device("cpu"))
    assert state["t"].device.type == "cpu"


def test_load_checkpoint_file(tmp_path):
    path = ck.save_checkpoint(tmp_path, {"s": 4}, step=4)
    assert ck.load_checkpoint_file(path) == {"s": 4}
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataError, match="cannot load checkpoint .*step-0000000004.pt"):
        ck.load_checkpoint_file(path)
    with pytest.raises(DataError):
        ck.load_checkpoint_file(tmp_path / "missing.pt")

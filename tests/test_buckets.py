"""User buckets (issue 20): a blocks rank decodes only its own users' ratings, about 1/W of the training split;
datasets prepared before buckets still train, every rank reading the whole split, with a one-line note."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from mfscale import config, distributed
from mfscale.layout import deal_rows
from mfscale.layout.rows import deal_users
from mfscale.shards import MANIFEST, Dataset, read_stripe, write_split
from mfscale.train import Trainer

from .conftest import as_rank, free_port, spawn_ranks
from .test_train import job


def unbucket(src: Path, dst: Path) -> Path:
    """A copy of a prepared dataset as mfscale wrote it before user buckets: the training split in one shuffled
    order without bucket row groups, no ``buckets`` in the manifest, no bucket column in users.parquet."""
    shutil.copytree(src, dst)
    (dst / ".verified.json").unlink(missing_ok=True)
    ds = Dataset(src)
    parts = [read_stripe(s) for s in ds.stripes("train")]
    cols = {c: np.concatenate([p[c] for p in parts]) for c in ("user", "item", "rating", "timestamp")}
    shutil.rmtree(dst / "train")
    manifest = dict(ds.manifest)
    manifest["shards"] = {**manifest["shards"], "train": write_split(dst / "train", *cols.values())}
    del manifest["buckets"]
    (dst / MANIFEST).write_text(json.dumps(manifest))
    pq.write_table(pq.read_table(src / "users.parquet").drop(["bucket"]), dst / "users.parquet")
    return dst


def _read_worker(rank: int, world: int, port: int, cfgs: list[dict], out: str) -> None:
    """Builds each config's blocks layout on this rank; saves what it decoded, its ratings (global ids) and the
    log lines of rank 0."""
    as_rank(rank, world, port)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("mfscale").addHandler(handler)
    logging.getLogger("mfscale").setLevel(logging.INFO)
    env = distributed.init("cpu", 60)
    try:
        for k, cfg in enumerate(cfgs):
            lines.clear()
            layout = Trainer(config.from_dict(cfg), env).layout
            users, items = [], []
            for batch in layout.batches(0, 0):
                u, i = layout.global_ids(batch)
                users.append(u)
                items.append(i)
            torch.save({"decoded": layout.decoded_bytes, "user": np.concatenate(users), "item": np.concatenate(items),
                        "log": list(lines)}, Path(out) / f"cfg{k}-rank{rank}.pt")
    finally:
        distributed.destroy()


def test_blocks_ranks_decode_their_buckets_and_older_datasets_still_train(small_data, tmp_path):
    old = unbucket(small_data, tmp_path / "old")
    cfgs = [job(data, tmp_path / name, train__tables="blocks", train__batch_size=200).to_dict()
            for name, data in (("new", small_data), ("old", old))]
    world = 2
    assert spawn_ranks(_read_worker, world, (world, free_port(), cfgs, str(tmp_path)), 180) == [0] * world
    got = [[torch.load(tmp_path / f"cfg{k}-rank{r}.pt", weights_only=False) for r in range(world)] for k in (0, 1)]
    train = Dataset(small_data).read_split("train")
    n = len(train["user"])
    want = np.sort(train["user"].astype(np.int64) * 10**6 + train["item"])
    for k, ranks in enumerate(got):
        # exactly once: the ranks' ratings of the epoch are the training split, whoever read what
        keys = np.sort(np.concatenate([r["user"].astype(np.int64) * 10**6 + r["item"] for r in ranks]))
        assert np.array_equal(keys, want)
        decoded = [r["decoded"] for r in ranks]
        per = 16  # user, movie, rating and the timestamp (the user-day biases, on by default): 16 bytes a rating
        if k == 0:  # its own buckets: about half the split
            assert sum(decoded) == per * n and max(decoded) <= 1.1 * per * n / world, decoded
            assert not any("user buckets" in line for line in ranks[0]["log"])
        else:  # prepared before buckets: every rank decodes the whole split, and says why once
            assert decoded == [per * n] * world
            notes = [line for line in ranks[0]["log"] if "user buckets" in line]
            assert len(notes) == 1 and "re-run python -m mfscale.prepare" in notes[0], ranks[0]["log"]


class _FakeData:
    def __init__(self, root: Path, buckets: dict | None):
        self.root, self.buckets = root, buckets


def test_users_are_dealt_by_bucket_only_where_there_are_buckets_enough(small_data):
    ds = Dataset(small_data)
    counts = np.bincount(ds.read_split("train")["user"], minlength=ds.n_users)
    n = ds.buckets["n"]
    block, bucket_rank = deal_users(ds, counts, 2)
    users = pq.read_table(small_data / "users.parquet").to_pydict()
    bucket = np.array(users["bucket"])[np.argsort(users["user_idx"])]
    assert bucket_rank is not None and np.array_equal(block, bucket_rank[bucket])
    per_rank = np.bincount(block, weights=counts, minlength=2)
    assert per_rank.max() / per_rank.mean() < 1.1  # buckets dealt by their ratings: balanced ranks
    # more ranks than buckets: users dealt one by one, as before buckets
    block, bucket_rank = deal_users(_FakeData(small_data, {**ds.buckets, "n": 2}), counts, 3)
    assert n > 2 and bucket_rank is None and np.array_equal(block, deal_rows(counts, 3))

"""mfscale.stream: exactly-once dealing to ranks, lane layout, worker independence, determinism, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from mfscale import prepare
from mfscale.errors import ConfigError, DataError
from mfscale.shards import Dataset, read_stripe
from mfscale.stream import RatingStream, make_loader

N_USERS, N_ITEMS, N_RATINGS = 2000, 500, 80_000


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Dataset:
    """~68k train rows (64 groups of ~1.06k rows) and ~4k val rows (4 groups of 1024)."""
    tmp = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(1)
    pair = rng.choice(N_USERS * N_ITEMS, N_RATINGS, replace=False)
    pl.DataFrame({
        "userId": pair // N_ITEMS + 1,
        "movieId": pair % N_ITEMS + 1,
        "rating": rng.integers(1, 11, N_RATINGS) / 2,
        "timestamp": rng.integers(10**9, 2 * 10**9, N_RATINGS),
    }).write_csv(tmp / "ratings.csv")
    out = tmp / "data"
    assert prepare.main(["--input", str(tmp / "ratings.csv"), "--out", str(out), "--quiet"]) == 0
    ds = Dataset(out)
    assert len(ds.stripes("train")) >= 64
    return ds


def batches(stream: RatingStream, epoch: int, num_workers: int = 0, start_step: int = 0) -> list[dict]:
    stream.set_epoch(epoch, start_step)
    return list(make_loader(stream, num_workers=num_workers))


def keys(batch: dict) -> np.ndarray:
    return batch["user"].numpy().astype(np.int64) * N_ITEMS + batch["item"].numpy()


def split_keys(ds: Dataset, split: str) -> np.ndarray:
    a = ds.read_split(split)
    return np.sort(a["user"].astype(np.int64) * N_ITEMS + a["item"])


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x["global_rows"], x["epoch"], x["step"]) == (y["global_rows"], y["epoch"], y["step"])
        for c in ("user", "item", "rating"):
            assert torch.equal(x[c], y[c])


def reference_sequence(ds: Dataset, split: str, seed: int, epoch: int) -> dict[str, np.ndarray]:
    """The virtual sequence V_e written straight from the rule: permuted stripes, rotated left."""
    groups = ds.stripes(split)
    n = sum(g.rows for g in groups)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(groups))
    rot = int(rng.integers(0, n))
    parts = [read_stripe(groups[i]) for i in order]
    return {c: np.roll(np.concatenate([p[c] for p in parts]), -rot) for c in ("user", "item", "rating")}


def test_exactly_once_two_ranks_two_workers(data):
    expected = split_keys(data, "train")
    orders = []
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            stream = RatingStream(data, "train", batch_size=1000, rank=rank, world_size=2, seed=3)
            got = batches(stream, epoch, num_workers=2)
            assert [b["step"] for b in got] == list(range(stream.steps_per_epoch))
            assert all(b["epoch"] == epoch for b in got)
            per_rank.append(got)
        assert len(per_rank[0]) == len(per_rank[1])
        seen = np.concatenate([keys(b) for rank in per_rank for b in rank])
        np.testing.assert_array_equal(np.sort(seen), expected)
        orders.append(np.concatenate([keys(b) for b in per_rank[0]]))
    assert not np.array_equal(orders[0][:1000], orders[1][:1000])


def test_ratings_travel_with_their_pairs(data):
    a = data.read_split("train")
    truth = dict(zip((a["user"].astype(np.int64) * N_ITEMS + a["item"]).tolist(), a["rating"].tolist(), strict=True))
    stream = RatingStream(data, "train", batch_size=4096, seed=5)
    for b in batches(stream, 2):
        assert b["user"].dtype == torch.int32 and b["item"].dtype == torch.int32
        assert b["rating"].dtype == torch.float32
        assert [truth[k] for k in keys(b).tolist()] == b["rating"].tolist()


@pytest.mark.parametrize("split,world,batch", [("train", 3, 1000), ("train", 2, 777), ("val", 3, 500),
                                               ("val", 4, 4096), ("train", 1, 100_000)])
def test_equal_steps_sizes_and_global_rows(data, split, world, batch):
    n = data.split_rows(split)
    steps = -(-n // (world * batch))
    plans, seen = [], []
    for rank in range(world):
        stream = RatingStream(data, split, batch_size=batch, rank=rank, world_size=world, seed=1)
        assert stream.steps_per_epoch == steps
        got = batches(stream, 0)
        assert len(got) == steps
        plan = stream.batch_plan(0)
        assert [len(b["user"]) for b in got] == [size for _, size, _ in plan]
        assert [b["global_rows"] for b in got] == [g for _, _, g in plan]
        plans.append(plan)
        seen.extend(keys(b) for b in got)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), split_keys(data, split))
    for s in range(steps):
        g = min(world * batch, n - s * world * batch)
        shares = [plans[r][s][1] for r in range(world)]
        assert all(plans[r][s][2] == g for r in range(world))
        assert shares == [g // world + (1 if r < g % world else 0) for r in range(world)]
        if s < steps - 1:
            assert shares == [batch] * world


def test_empty_batches_keep_ranks_in_step(data):
    n = data.split_rows("val")
    world = n - 3  # last global step has 3 rows: ranks >= 3 get an empty batch there
    plan = RatingStream(data, "val", batch_size=1, rank=world - 1, world_size=world).batch_plan(0)
    assert [size for _, size, _ in plan] == [1, 0]
    stream = RatingStream(data, "val", batch_size=1, rank=world - 1, world_size=world, shuffle=False)
    got = batches(stream, 0)
    assert [len(b["user"]) for b in got] == [1, 0] and [b["global_rows"] for b in got] == [world, 3]
    assert got[1]["user"].dtype == torch.int32 and got[1]["rating"].dtype == torch.float32


def test_batches_follow_the_layout_rule(data):
    """Each batch is V_e[S_r + offset(j) : + size], offsets lane-major; checked against a direct rebuild."""
    world, batch, lanes = 3, 700, 5
    ref = reference_sequence(data, "train", seed=9, epoch=4)
    start = 0
    for rank in range(world):
        stream = RatingStream(data, "train", batch_size=batch, rank=rank, world_size=world, seed=9, lanes=lanes)
        plan = stream.batch_plan(4)
        sizes = [size for _, size, _ in plan]
        order = sorted(range(len(plan)), key=lambda j: (j % lanes, j // lanes))
        offset, expected_offsets = 0, {}
        for j in order:
            expected_offsets[j] = offset
            offset += sizes[j]
        assert [o for o, _, _ in plan] == [expected_offsets[j] for j in range(len(plan))]
        for j, b in enumerate(batches(stream, 4)):
            lo = start + plan[j][0]
            for c in ("user", "item", "rating"):
                np.testing.assert_array_equal(b[c].numpy(), ref[c][lo:lo + sizes[j]])
        start += sum(sizes)
    assert start == data.split_rows("train")


def test_unshuffled_is_file_order(data):
    stream = RatingStream(data, "val", batch_size=300, shuffle=False, lanes=3)
    got = batches(stream, 7)
    by_offset = sorted(zip(stream.batch_plan(7), got, strict=True), key=lambda t: t[0][0])
    users = np.concatenate([b["user"].numpy() for _, b in by_offset])
    np.testing.assert_array_equal(users, data.read_split("val")["user"])
    assert stream.batch_plan(7) == stream.batch_plan(0)


def test_independent_of_num_workers(data):
    stream = RatingStream(data, "train", batch_size=1500, rank=1, world_size=2, seed=4)
    assert_same(batches(stream, 1, num_workers=0), batches(stream, 1, num_workers=2))


def test_deterministic_by_seed(data):
    def run(seed: int) -> list[dict]:
        return batches(RatingStream(data, "train", batch_size=2048, seed=seed), 0)

    a, b, c = run(11), run(11), run(12)
    assert_same(a, b)
    assert not all(torch.equal(x["user"], y["user"]) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch(data, num_workers):
    stream = RatingStream(data, "train", batch_size=1000, rank=0, world_size=2, seed=2)
    full = batches(stream, 3)
    for k in (5, 8, len(full) - 1, len(full)):
        assert_same(batches(stream, 3, num_workers=num_workers, start_step=k), full[k:])


@pytest.mark.parametrize(("split", "world", "batch", "shuffle"),
                         [("train", 1, 4096, True), ("train", 3, 1000, True), ("val", 2, 300, False)])
def test_resident_batches_equal_streamed_ones(data, split, world, batch, shuffle):
    """Holding the split in memory changes where batches come from, never what they contain."""
    for rank in range(world):
        kw = dict(batch_size=batch, rank=rank, world_size=world, seed=5, shuffle=shuffle)
        streamed = RatingStream(data, split, **kw)
        resident = RatingStream(data, split, resident="cpu", **kw)
        for epoch in (0, 1):
            assert_same(batches(resident, epoch), batches(streamed, epoch))
        assert_same(batches(resident, 1, start_step=3), batches(streamed, 1)[3:])


def test_resident_stream_refuses_workers(data):
    stream = RatingStream(data, "val", batch_size=512, resident="cpu")
    stream.set_epoch(0)
    loader = iter(make_loader(stream, num_workers=2))
    try:
        with pytest.raises(ConfigError, match="0 DataLoader workers"):
            next(loader)  # the workers' error, raised here
    finally:
        # Stop the workers now. Left to a later garbage collection (the traceback keeps the iterator in a cycle),
        # the queues' feeder threads are finalized first, the workers never get their stop and each join times
        # out: 10 s lost in whichever test that collection lands in.
        loader._shutdown_workers()


def test_loader_leaves_global_rng_alone(data):
    stream = RatingStream(data, "val", batch_size=4096)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    batches(stream, 0)
    assert torch.equal(torch.rand(3), expected)


def test_errors(data, tmp_path):
    def one_line(exc: pytest.ExceptionInfo) -> None:
        assert len(str(exc.value).splitlines()) == 1

    for kwargs in ({"batch_size": 0}, {"batch_size": 8, "world_size": 0}, {"batch_size": 8, "rank": 2,
                   "world_size": 2}, {"batch_size": 8, "rank": -1}, {"batch_size": 8, "lanes": 0}):
        with pytest.raises(ConfigError) as exc:
            RatingStream(data, "train", **kwargs)
        one_line(exc)
    stream = RatingStream(data, "val", batch_size=8)
    with pytest.raises(ConfigError):
        stream.set_epoch(0, start_step=stream.steps_per_epoch + 1)
    with pytest.raises(ConfigError):
        stream.set_epoch(-1)
    with pytest.raises(DataError) as exc:
        RatingStream(data, "nosuchsplit", batch_size=8)
    one_line(exc)
    with pytest.raises(DataError):
        RatingStream(tmp_path / "missing", batch_size=8)

    csv = tmp_path / "ratings.csv"
    csv.write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{m},3.0,{u * m}\n"
                                                                   for u in range(1, 6) for m in range(1, 6)))
    out = tmp_path / "noval"
    assert prepare.main(["--input", str(csv), "--out", str(out), "--val-frac", "0", "--quiet"]) == 0
    with pytest.raises(DataError, match="no rows") as exc:
        RatingStream(Path(out), "val", batch_size=8)
    one_line(exc)


# -- strata: batches drawn from one user block x movie block at a time (issue 22) -------------------------------
def strata_deal(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Users and movies dealt to k blocks each (seeded, unbalanced on purpose: any deal must work)."""
    rng = np.random.default_rng(7)
    return rng.integers(0, k, N_USERS), rng.integers(0, k, N_ITEMS)


def stratum_of(batch: dict, deal: tuple[np.ndarray, np.ndarray], k: int) -> np.ndarray:
    return deal[0][batch["user"].numpy()] * k + deal[1][batch["item"].numpy()]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_strata_cover_every_rating_once_per_epoch_in_equal_steps(data, world):
    deal = strata_deal(3)
    train = split_keys(data, "train")
    for epoch in (0, 1):
        per_rank = [batches(RatingStream(data, "train", batch_size=1000, rank=r, world_size=world, seed=4,
                                         resident="cpu", strata=deal), epoch) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1  # the same number of steps on every rank
        got = np.sort(np.concatenate([keys(b) for bs in per_rank for b in bs]))
        assert np.array_equal(got, train)
        for step in zip(*per_rank, strict=True):  # global_rows: the step's ratings over all ranks
            assert {b["global_rows"] for b in step} == {sum(len(b["rating"]) for b in step)}


def test_strata_batches_hold_one_stratum_or_two_at_a_boundary(data):
    """What the speed comes from: each batch's rows are a 1/k share of each table (two strata at most where a
    batch straddles a boundary); the strata come in a new seeded order every epoch."""
    k, deal = 3, strata_deal(3)
    stream = RatingStream(data, "train", batch_size=1000, seed=4, resident="cpu", strata=deal)
    firsts = []
    for epoch in (0, 1):
        bs = batches(stream, epoch)
        spans = [np.unique(stratum_of(b, deal, k)) for b in bs]
        assert max(len(s) for s in spans) <= 2
        assert sum(len(s) == 1 for s in spans) > len(bs) // 2  # strata of ~7.5k rows, batches of 1k
        firsts.append([int(stratum_of(b, deal, k)[0]) for b in bs])
    assert firsts[0] != firsts[1]
    assert_same(batches(stream, 1), batches(stream, 1))  # deterministic


def test_strata_resume_mid_epoch(data):
    deal = strata_deal(2)
    stream = RatingStream(data, "train", batch_size=700, rank=1, world_size=2, seed=9, resident="cpu", strata=deal)
    full = batches(stream, 2)
    for start in (1, 17, len(full) - 1, len(full)):
        assert_same(batches(stream, 2, start_step=start), full[start:])


def test_strata_need_a_resident_split(data):
    with pytest.raises(ConfigError, match="strata need a resident split"):
        RatingStream(data, "train", batch_size=1000, strata=strata_deal(2))


def test_train_strata_flag(small_data, tmp_path):
    """--train.strata in the job: the replicated layout's resident stream draws from k x k strata; the blocks
    layout (strata of its own) and a streamed split refuse it in one line; 0 sizes k to the cache (1 for
    tables this small)."""
    from mfscale import config
    from mfscale.distributed import DistEnv
    from mfscale.train import Trainer

    def job(**changes):
        cfg = config.JobConfig()
        cfg.data.path, cfg.run_dir, cfg.data.workers = str(small_data), str(tmp_path / "run"), 0
        return config.replace(cfg, **changes).validate()

    env = DistEnv(0, 1, 0, torch.device("cpu"))
    assert Trainer(job(), env).layout.strata == 1
    assert Trainer(job(train__strata=0), env).layout.strata == 1
    tr = Trainer(job(train__strata=2, train__batch_size=500), env)
    assert tr.layout.strata == 2
    counts = [tr.train_step(b) for b in tr.layout.batches(0, 0)]
    assert len(counts) == tr.layout.steps_per_epoch and all(torch.isfinite(torch.as_tensor(c)) for c in counts)
    with pytest.raises(ConfigError, match="--train.strata applies to the replicated layout"):
        Trainer(job(train__strata=2, train__tables="blocks"), env)
    with pytest.raises(ConfigError, match="it needs a resident split"):
        Trainer(job(train__strata=2, data__resident="off"), env)
    with pytest.raises(ConfigError, match="train.strata must be >= 0"):
        job(train__strata=-1)


def test_auto_strata_sizes_a_stratum_to_the_cache():
    from mfscale.layout import auto_strata
    assert auto_strata(69_878, 10_677, 64, 8_500_046, 41_984) == 8  # ml-10m: 63 MB of tables and moments
    assert auto_strata(200_948, 87_585, 64, 27_200_174, 135_168) == 8  # ml-32m: capped by 2 batches a stratum
    assert auto_strata(6_040, 3_706, 64, 800_167, 4_096) == 1  # ml-1m: 7.6 MB, fits already
    assert auto_strata(610, 9_724, 64, 80_668, 1_024) == 1  # ml-latest-small

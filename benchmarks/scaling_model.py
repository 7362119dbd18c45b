"""How far the table layouts scale: measured stratum balance plus a cost model for 1-16 GPUs.

    python benchmarks/scaling_model.py --synthetic ml-32m          # generates the ratings in memory
    python benchmarks/scaling_model.py --data data/ml-32m            # a prepared dataset's training split

Part 1 is measured: rows are dealt to W blocks exactly as ``mfscale.layout.Blocks`` deals them (movies by
rating count, snake order; users in whole user buckets, as ``prepare`` writes them), and the W x W stratum
sizes are counted. Two numbers per W: the largest stratum over
the mean, and the equal-steps overhead (every rank takes as many steps in a sub-epoch as its largest
stratum needs: sum over sub-epochs of W x the largest stratum / all ratings).

Part 2 is a model, not a measurement: predicted ratings/s for 1, 4, 8 and 16 GPUs on this data and on a
synthetic 1B-rating, 100M-user set, for both layouts. Every assumed number is a flag and is printed with the
result; where the model is fed a measured number (the stratum balance, unique rows per batch) it says so.

- One GPU trains at ``--gpu-rate`` ratings/s (assumed: issue 11's target; the bandwidth bound at d=64 is about
  1.1e9 on an H100, ../DESIGN notes). A rank's compute time is its ratings / gpu-rate.
- Replicated: every step all-gathers each rank's unique gradient rows (4 * (d + 2) bytes + an 8-byte id per
  row, to W - 1 peers) and every rank applies all ranks' rows (7 row passes of 4 * (d + 1) bytes in HBM).
- Blocks: every sub-epoch ends with one movie block (rows + their optimizer state: ``--optimizer``, RowRMSprop's
  two floats per row by default, Adam's two moments of d + 1) sent to the next rank; the
  sub-epoch lasts as long as its largest stratum. No collective between sub-epoch ends (since 2026-12: each
  rank keeps its copy of the global bias between them, mfscale.step); at each of the W sub-epoch ends three
  small collectives (reconcile the global bias, the training loss, the stop vote).
- Replicated: a per-step latency for the dense bias all_reduce and the gathers.
- Links: ``--nvlink-gbs`` per GPU and direction inside a node of ``--gpus-per-node``; ``--ib-gbs`` per GPU
  between nodes (one 400 Gb/s NIC per GPU, as in a DGX H100). A rotation crosses nodes when W > gpus/node.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mfscale.layout import auto_global_batch, auto_steps, deal_rows, stratum_balance  # noqa: E402
from mfscale.optim import row_floats  # noqa: E402
from mfscale.shards import Dataset, auto_buckets  # noqa: E402
from mfscale.synthetic import generate, resolve_spec  # noqa: E402


def load(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, int, int, str]:
    if args.data:
        d = Dataset(args.data)
        train = d.read_split("train")
        return train["user"].astype(np.int64), train["item"].astype(np.int64), d.n_users, d.n_items, str(args.data)
    gen = generate(resolve_spec(args.synthetic), args.seed)
    frame = gen.ratings
    user = frame["user_id"].to_numpy().astype(np.int64)
    item = frame["movie_id"].to_numpy().astype(np.int64)
    _, user = np.unique(user, return_inverse=True)
    _, item = np.unique(item, return_inverse=True)
    return user, item, int(user.max()) + 1, int(item.max()) + 1, f"synthetic {args.synthetic} (all ratings)"


def balance(user: np.ndarray, item: np.ndarray, n_users: int, n_items: int, w: int) -> dict[str, float]:
    # users as prepare and Blocks deal them: into user buckets by rating count, whole buckets to ranks
    # (one by one where there are fewer buckets than ranks)
    counts = np.bincount(user, minlength=n_users)
    n_buckets = auto_buckets(len(user), n_users)
    bucket = deal_rows(counts, n_buckets)
    ub = (deal_rows(np.bincount(bucket, weights=counts, minlength=n_buckets), w)[bucket] if n_buckets >= w
          else deal_rows(counts, w))
    ib = deal_rows(np.bincount(item, minlength=n_items), w)
    strata = np.bincount(ub[user] * w + ib[item], minlength=w * w).reshape(w, w)
    return {"w": w, **stratum_balance(strata),
            "item_rows_max": int(np.bincount(ib, minlength=w).max()),
            "user_rows_max": int(np.bincount(ub, minlength=w).max())}


def unique_rows(user: np.ndarray, item: np.ndarray, batch: int, rng: np.random.Generator) -> float:
    """Measured: unique user + movie rows in a random batch of ``batch`` ratings (mean of 3 batches)."""
    out = []
    for _ in range(3):
        idx = rng.choice(len(user), size=min(batch, len(user)), replace=False)
        out.append(len(np.unique(user[idx])) + len(np.unique(item[idx])))
    return float(np.mean(out))


def state_bytes(dim: int, optimizer: str) -> int:
    """Bytes of a table row's optimizer state: RowRMSprop's two floats, or Adam's two moments of dim + 1."""
    return 4 * (row_floats(optimizer, dim) - (dim + 1))


def predict(n: float, n_items: int, dim: int, w: int, bal: dict, uniq_per_rank: float, a: argparse.Namespace
            ) -> dict[str, float]:
    """Ratings/s of one epoch for each layout on ``w`` GPUs (see the module docstring)."""
    row = 4 * (dim + 1)
    link = a.nvlink_gbs if w <= a.gpus_per_node else a.ib_gbs  # the slowest hop of the ring / the gather
    steps = math.ceil(n / auto_global_batch(int(n), auto_steps(int(n), a.steps_per_epoch)))
    lat = a.latency_us * 1e-6 * max(1, math.ceil(math.log2(max(w, 2))))
    compute = n / w / a.gpu_rate  # perfectly balanced share
    # replicated: all-gather of gradient rows + applying the other ranks' rows, every step
    gather = (w - 1) * uniq_per_rank * (4 * (dim + 2) + 8) / (link * 1e9) if w > 1 else 0.0
    extra_opt = (w - 1) * uniq_per_rank * 7 * row / (a.hbm_gbs * 1e9)
    t_rep = compute + steps * (gather + extra_opt + (lat if w > 1 else 0.0))
    # blocks: sub-epochs last as long as their largest stratum; W rotations of a movie block per epoch
    block_bytes = bal["item_rows_max"] * (row + state_bytes(dim, a.optimizer))
    rotate = w * (block_bytes / (link * 1e9) + lat) if w > 1 else 0.0
    syncs = w * 3 * lat if w > 1 else 0.0  # W sync points per epoch, 3 small collectives each; none per step
    t_blk = compute * bal["padded_over_actual"] + rotate + syncs
    return {"replicated": n / t_rep, "blocks": n / t_blk, "rotate_s": rotate, "gather_s": steps * gather,
            "block_mb": block_bytes / 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="a prepared dataset (its training split)")
    src.add_argument("--synthetic", help="a synthetic preset, generated in memory (e.g. ml-32m)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worlds", default="1,2,4,8,16")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--optimizer", default="row_rmsprop", choices=("row_rmsprop", "lazy_adam"),
                   help="the tables' optimizer, for the state that travels and is held (default: the job's)")
    p.add_argument("--gpu-rate", type=float, default=2e8, help="assumed ratings/s of one GPU (default: 2e8)")
    p.add_argument("--hbm-gbs", type=float, default=3350.0, help="assumed HBM GB/s (H100 SXM)")
    p.add_argument("--nvlink-gbs", type=float, default=450.0, help="assumed NVLink GB/s per GPU and direction")
    p.add_argument("--ib-gbs", type=float, default=50.0, help="assumed InfiniBand GB/s per GPU (400 Gb/s)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--latency-us", type=float, default=20.0, help="assumed latency of one small collective step")
    p.add_argument("--steps-per-epoch", type=int, default=0,
                   help="the auto batch's target steps per epoch (0: the trainer's rule, --train.auto_steps 0)")
    p.add_argument("--big-ratings", type=float, default=1e9)
    p.add_argument("--big-users", type=float, default=1e8)
    p.add_argument("--big-items", type=int, default=1_000_000, help="assumed movies of the 1B-rating set")
    a = p.parse_args(argv)
    worlds = [int(x) for x in a.worlds.split(",")]
    user, item, n_users, n_items, name = load(a)
    n = len(user)
    print(f"## Stratum balance, measured: {name}, {n:,} ratings, {n_users:,} users, {n_items:,} movies\n")
    print("| W | largest stratum / mean | equal-steps overhead | max user rows / block | max movie rows / block |")
    print("|---|---|---|---|---|")
    bals = {w: balance(user, item, n_users, n_items, w) for w in worlds}
    for w, b in bals.items():
        print(f"| {w} | {b['max_over_mean']:.4f} | {b['padded_over_actual']:.4f} | {b['user_rows_max']:,} | "
              f"{b['item_rows_max']:,} |")
    rng = np.random.default_rng(0)
    global_batch = auto_global_batch(int(n), auto_steps(int(n), a.steps_per_epoch))
    print(f"\n## Predicted ratings/s (model; assumptions: gpu-rate {a.gpu_rate:.2e}/s, HBM {a.hbm_gbs:.0f} GB/s, "
          f"NVLink {a.nvlink_gbs:.0f} GB/s, IB {a.ib_gbs:.0f} GB/s per GPU, {a.gpus_per_node} GPUs/node, "
          f"latency {a.latency_us:.0f} us x log2 W per collective, the auto batch (1Ki-256Ki ratings), d={a.dim})\n")
    print("| data | GPUs | replicated | blocks | blocks / (GPUs x 1 GPU) | rotations s/epoch | gathers s/epoch |")
    print("|---|---|---|---|---|---|---|")
    sets = [(name, n, n_items, lambda w, b: b, lambda w: unique_rows(user, item, global_batch // w, rng))]
    # The 1B set: the stratum balance measured here is assumed to carry over; unique rows per rank batch are
    # assumed to be the batch's size (1B ratings over 100M users: nearly every rating touches a new user row,
    # and the movie rows are few next to them).
    big_items = a.big_items

    def big_bal(w: int, b: dict) -> dict:
        return {**b, "item_rows_max": math.ceil(big_items / w)}

    sets.append((f"1B ratings, {a.big_users:.0e} users, {big_items:,} movies", a.big_ratings, big_items, big_bal,
                 lambda w: 262_144 / w * 1.1))
    for label, nn, ni, bal_of, uniq in sets:
        one = None
        for w in worlds:
            pr = predict(nn, ni, a.dim, w, bal_of(w, bals[w]), uniq(w), a)
            one = one or pr["blocks"]
            fits = ""
            if label.startswith("1B"):
                state_gb = (4 * (a.dim + 1) + state_bytes(a.dim, a.optimizer)) * (a.big_users + big_items) / 1e9
                fits = f" (replicated needs {state_gb:.0f} GB of tables + optimizer state per GPU)"
            print(f"| {label}{fits if w == worlds[0] else ''} | {w} | {pr['replicated']:.3g} | {pr['blocks']:.3g} | "
                  f"{pr['blocks'] / (w * one):.2f} | {pr['rotate_s']:.3f} | {pr['gather_s']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

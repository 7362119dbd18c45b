"""Ranks on one node against ranks on simulated nodes behind a capped link: the real training job, one dataset.

    sudo python benchmarks/nodes.py --data data/ml-10m --epochs 3 --plot nodes.png --out-jsonl nodes.jsonl
    sudo python benchmarks/nodes.py --data data/small --epochs 2 --rates 10gbit,1gbit,100mbit --world 2,3

Runs, one after the other, each into a fresh run directory, with every other flag of ``mfscale.train`` at its
default (plus ``--extra``):

- ``1 process``: ``python -m mfscale.train``, default threads (OMP_NUM_THREADS unset): the baseline.
- ``1 node x W``: ``torchrun --standalone --nproc_per_node=W``.
- ``W nodes x 1 @ RATE``, for each rate of ``--rates``: W simulated nodes (tests/netns.py: a network namespace
  and a veth each, on one bridge, the veth capped at RATE with ``tc ... tbf`` in both directions), one torchrun
  agent per node (c10d rendezvous on node 0's address, ``--local-addr``, ``GLOO_SOCKET_IFNAME`` = the node's
  veth). ``none`` as a rate: no cap.

With ``--block-pieces 1,2`` both multi-rank kinds run once per ``--train.block_pieces`` value (the blocks
layout's rotation in pieces, overlapped with training), labelled ``P=...``.

Ranks of both multi-rank kinds get cores/W threads each (torchrun's 1 on 2 cores with W = 2), since the
simulated nodes share this machine's cores; ``--threads`` sets another count. ratings/s is
``train_ratings_per_s`` from each run's metrics.json (training only, no evaluation). The table gives it with
its ratio to ``1 process`` and to ``1 node x W`` of the same W, the test RMSE, node 0's veth bytes (both
directions) and the wall time of each run. Nothing is asserted. Simulated nodes need root and iproute2.
Before the runs the C++ step op is built if this checkout's build is missing or stale (the trainer would
otherwise build it at its first step, inside the timed loop of the first run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import netns  # noqa: E402  (tests/netns.py, the simulated nodes of the test suite)

PROG = "benchmarks/nodes.py"


def die(msg: str) -> None:
    raise SystemExit(f"{PROG}: error: {msg}")


def _env(threads: int | None) -> dict[str, str]:
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    if not path.is_file():
        die(f"no metrics.json in {run_dir}")
    return json.loads(path.read_text())


def run_local(cmd: list[str], threads: int | None, timeout: float) -> tuple[dict, float]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads), timeout=timeout)
    except subprocess.TimeoutExpired:
        die(f"still running after {timeout:.0f} s: {shlex.join(cmd)}")
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        die(f"failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    return _metrics(Path(cmd[cmd.index("--run-dir") + 1])), wall


def run_nodes(world: int, rate: str | None, train_args: list[str], run_dir: Path, threads: int,
              timeout: float) -> tuple[dict, float, dict, str]:
    """W nodes x 1 process; (metrics, wall, node 0's veth byte counts during the run, node 0's command)."""
    args = [*train_args, "--run-dir", str(run_dir)]
    with netns.simulated_nodes(world, rate=rate, skip=False) as nodes:
        before = nodes[0].counters()
        t0 = time.perf_counter()
        logs = [run_dir.parent / f"{run_dir.name}-node{k}.log" for k in range(world)]
        agents = [netns.launch_agent(nodes, k, args, logs[k], env=netns.agent_env(nodes[k], threads=threads))
                  for k in range(world)]
        codes = netns.wait_all(agents, timeout)
        wall = time.perf_counter() - t0
        after = nodes[0].counters()
        command = shlex.join(netns.agent_command(nodes, 0, args))
    if codes != [0] * world:
        tails = "\n".join(f"--- node {k}\n{log.read_text()[-2000:]}" for k, log in enumerate(logs))
        die(f"{world} nodes at {rate or 'no cap'}: agents exited {codes} (None: killed after {timeout:.0f} s)\n"
            f"{tails}")
    return _metrics(run_dir), wall, {k: after[k] - before[k] for k in ("rx_bytes", "tx_bytes")}, command


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = []  # one bar colour per series (1 process, 1 node x W, W nodes x 1 at each cap), first-seen order
    for r in rows:
        if r["series"] not in kinds:
            kinds.append(r["series"])
    ranks = sorted({r["ranks"] for r in rows})
    width = 0.8 / max(1, max(sum(1 for r in rows if r["ranks"] == n) for n in ranks))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows)), 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labelled = set()
    for xi, n in enumerate(ranks):
        group = [r for r in rows if r["ranks"] == n]
        for j, r in enumerate(group):
            x = xi + (j - (len(group) - 1) / 2) * width
            k = kinds.index(r["series"])
            bar = ax.bar(x, r["train_ratings_per_s"] / 1e6, width * 0.95, color=colours[k % len(colours)],
                         label=None if r["series"] in labelled else r["series"])
            labelled.add(r["series"])
            ax.bar_label(bar, labels=[f"{r['train_ratings_per_s'] / 1e6:.2f}M\n{r['vs_1_process']:.2f}x"],
                         fontsize=8)
    ax.set_xticks(range(len(ranks)), [f"{n} rank{'s' if n > 1 else ''}" for n in ranks])
    ax.set_ylabel("train ratings/s (millions)")
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.2)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(kinds))  # clear of the bars
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a prepared dataset")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--world", default="2", help="comma list of rank counts W (default 2)")
    p.add_argument("--rates", default="10gbit,1gbit",
                   help="comma list of link caps for the W-node runs, tc's syntax; 'none' for no cap")
    p.add_argument("--threads", type=int, help="threads per rank of the multi-rank runs (default cores / W)")
    p.add_argument("--block-pieces", default="", help="comma list of --train.block_pieces values: the multi-rank "
                   "runs once per value (default: the trainer's)")
    p.add_argument("--extra", default="", help="more flags for mfscale.train, one string")
    p.add_argument("--timeout-s", type=float, default=3600, help="per run (default 3600)")
    p.add_argument("--out-jsonl", type=Path, help="append one JSON line per run")
    p.add_argument("--plot", type=Path, help="write a PNG of ratings/s per configuration, grouped by ranks")
    a = p.parse_args(argv)
    if a.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            die("--plot needs matplotlib: pip install matplotlib (or the bench extra: pip install -e '.[bench]')")
    if not (a.data / "manifest.json").is_file():
        die(f"not a prepared dataset (no manifest.json): {a.data}")
    try:
        worlds = sorted({int(w) for w in a.world.split(",")})
    except ValueError:
        die(f"--world must be a comma list of integers, got {a.world!r}")
    if any(w < 2 for w in worlds):
        die("--world: every W must be at least 2")
    try:
        pieces: list[int | None] = [int(x) for x in a.block_pieces.split(",") if x.strip()] or [None]
    except ValueError:
        die(f"--block-pieces must be a comma list of integers, got {a.block_pieces!r}")
    rates = [r.strip() for r in a.rates.split(",") if r.strip()]
    if rates and (reason := netns.unavailable_reason()):
        die(f"cannot simulate nodes: {reason}")
    cores = os.cpu_count() or 1
    common = ["--data", str(a.data), "--epochs", str(a.epochs), "--train.ranking_k", "0", *shlex.split(a.extra)]
    rows: list[dict] = []

    def record(kind: str, nodes: int, per_node: int, rate: str | None, threads: int | None, metrics: dict,
               wall: float, command: str, veth: dict | None = None, piece: int | None = None) -> None:
        series = "1 process" if nodes * per_node == 1 else "1 node x W" if nodes == 1 else f"W nodes x 1 @ {rate}"
        if piece is not None:
            series, kind = f"{series} P={piece}", f"{kind} P={piece}"
        rows.append({"config": f"{kind} @ {rate}" if rate else kind, "series": series, "block_pieces": piece,
                     "nodes": nodes, "procs_per_node": per_node, "ranks": nodes * per_node, "rate": rate,
                     "threads_per_rank": threads, "train_ratings_per_s": metrics["train_ratings_per_s"],
                     "test_rmse": metrics["test_rmse"], "epochs": metrics["epochs"],
                     "batch_size": metrics["batch_size"], "tables": metrics.get("tables"),
                     "table_bytes_sent": metrics.get("table_bytes_sent"),
                     "veth_bytes_node0": None if veth is None else veth["rx_bytes"] + veth["tx_bytes"],
                     "wall_s": wall, "command": command})
        print(f"done: {rows[-1]['config']}: {metrics['train_ratings_per_s']:,.0f} ratings/s in {wall:.0f} s",
              file=sys.stderr)

    # Build the C++ step op now if this checkout's build is missing or stale: the trainer loads it at its first
    # step, inside the timed loop, and a build there (seconds) would count as training time of that run.
    subprocess.run([sys.executable, "-c", "from mfscale import cpu_step\ntry:\n    cpu_step.load()\n"
                    "except cpu_step.KernelUnavailable:\n    pass"], env=_env(None), capture_output=True)
    with tempfile.TemporaryDirectory(prefix="mfscale-nodes-") as tmp:
        cmd = [sys.executable, "-m", "mfscale.train", *common, "--run-dir", str(Path(tmp) / "one")]
        metrics, wall = run_local(cmd, None, a.timeout_s)
        record("1 process", 1, 1, None, None, metrics, wall, shlex.join(cmd))
        for w in worlds:
            threads = a.threads or max(1, cores // w)
            for piece in pieces:
                args = [*common, *([] if piece is None else ["--train.block_pieces", str(piece)])]
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={w}",
                       "-m", "mfscale.train", *args, "--run-dir", str(Path(tmp) / f"node-x{w}-p{piece}")]
                metrics, wall = run_local(cmd, threads, a.timeout_s)
                record(f"1 node x {w}", 1, w, None, threads, metrics, wall, shlex.join(cmd), piece=piece)
                for rate in rates:
                    cap = None if rate.lower() == "none" else rate
                    run_dir = Path(tmp) / f"nodes{w}-{rate}-p{piece}"
                    metrics, wall, veth, command = run_nodes(w, cap, args, run_dir, threads, a.timeout_s)
                    record(f"{w} nodes x 1", w, 1, cap or "no cap", threads, metrics, wall, command, veth, piece)

    base = rows[0]["train_ratings_per_s"]
    one_node = {(r["ranks"], r["block_pieces"]): r["train_ratings_per_s"] for r in rows if r["nodes"] == 1}
    for r in rows:
        r["vs_1_process"] = r["train_ratings_per_s"] / base
        r["vs_1_node"] = r["train_ratings_per_s"] / one_node[(r["ranks"], r["block_pieces"])]
    title = (f"{a.data}, {a.epochs} epochs, {platform.processor() or platform.machine()} ({cores} cores), "
             f"{time.strftime('%Y-%m-%d')}")
    print(f"### Nodes: {title}\n")
    print("| configuration | ranks | threads/rank | train ratings/s | vs 1 process | vs 1 node x W | test RMSE | "
          "node 0 veth MB | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        veth = "" if r["veth_bytes_node0"] is None else f"{r['veth_bytes_node0'] / 1e6:,.1f}"
        print(f"| {r['config']} | {r['ranks']} | {r['threads_per_rank'] or 'default'} | "
              f"{r['train_ratings_per_s']:,.0f} | {r['vs_1_process']:.2f}x | {r['vs_1_node']:.2f}x | "
              f"{r['test_rmse']:.4f} | {veth} | {r['wall_s']:.0f} |")
    if a.out_jsonl:
        with open(a.out_jsonl, "a") as f:
            for r in rows:
                f.write(json.dumps({"data": str(a.data), "date": time.strftime("%Y-%m-%dT%H:%M:%S"), **r}) + "\n")
    if a.plot:
        plot(rows, a.plot, f"train ratings/s: {title}")
        print(f"\nplot: {a.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

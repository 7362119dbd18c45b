"""Two simulated nodes (tests/netns.py): one torchrun agent per node, c10d rendezvous on node 0, gloo over the
veth between them. The job's math does not depend on where its ranks run, so 2 nodes x 1 process must end
with the very tables of 1 node x 2 processes, also after a whole node was killed mid-epoch and came back; a
node that never comes back must fail the job within its timeouts.

Skips (with the reason) without root or iproute2. Every namespace, veth and process made here is removed
when a test ends, also when it fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mfscale import checkpoint, prepare

from . import netns

pytestmark = pytest.mark.skipif(netns.unavailable_reason() is not None, reason=str(netns.unavailable_reason()))

TIMEOUT_S = 20  # --train.timeout_s: a collective waiting this long fails
JOIN_TIMEOUT_S = 20  # torchrun's c10d rendezvous: a restarted agent waits this long for the other node
# The small preset (85,000 training ratings), 2 epochs of 333 steps at 2 x 128, a checkpoint every 20 steps.
JOB = ["--epochs", "2", "--batch-size", "128", "--train.patience", "0", "--checkpoint.every_steps", "20",
       "--train.timeout_s", str(TIMEOUT_S)]
STEPS_PER_EPOCH = 333
# A dead agent drops out of the rendezvous after 3 missed keep-alives (2 s apart; torch's default is 5 s).
ELASTIC = {"max_restarts": 2, "rdzv_conf": f"join_timeout={JOIN_TIMEOUT_S},keep_alive_interval=2"}


@pytest.fixture(scope="module")
def small_preset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small-preset") / "data"
    assert prepare.main(["--synthetic", "small", "--out", str(out), "--quiet"]) == 0
    return out


def job(data: Path, run_dir: Path) -> list[str]:
    return ["--data", str(data), "--run-dir", str(run_dir), *JOB]


@pytest.fixture(scope="module")
def one_node(small_preset, tmp_path_factory) -> tuple[Path, dict]:
    """The job as 1 node x 2 processes (torchrun --standalone): (run dir, metrics)."""
    base = tmp_path_factory.mktemp("one-node")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(netns.ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mfscale.train",
           *job(small_preset, base / "run")]
    proc = subprocess.run(cmd, env=env, cwd=base, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "run", json.loads((base / "run" / "metrics.json").read_text())


def tables(run_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The newest checkpoint's metadata and its whole tables with their Adam moments."""
    state, path = checkpoint.load_latest(run_dir)
    return state, checkpoint.assemble(path, state, optimizer=True)


def assert_same_tables(run_a: Path, run_b: Path) -> None:
    (sa, ta), (sb, tb) = tables(run_a), tables(run_b)
    assert (sa["epoch"], sa["global_step"]) == (sb["epoch"], sb["global_step"])
    assert ta.keys() == tb.keys() and "users.exp_avg_sq" in ta
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def assert_same_metrics(a: dict, b: dict) -> None:
    for key in ("test_rmse", "test_mae", "best_val_rmse", "epochs", "steps", "history", "world_size"):
        assert a[key] == b[key], key


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Exit codes, None for an agent still running at the deadline (the nodes' cleanup kills it)."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    return codes


def logs(base: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(base.glob("node*.log")))


def wait_for_checkpoint(run_dir: Path, agents: list[subprocess.Popen], base: Path, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while not (found := checkpoint.list_checkpoints(run_dir)):
        assert all(p.poll() is None for p in agents), f"an agent exited before the first checkpoint\n{logs(base)}"
        assert time.monotonic() < deadline, f"no checkpoint in {timeout} s\n{logs(base)}"
        time.sleep(0.02)
    return found[0]


def test_two_nodes_train_the_tables_of_one_node(small_preset, one_node, tmp_path):
    """2 nodes x 1 process over the veth: the same tables, bit for bit, as 1 node x 2 processes; the table
    traffic crossed the veth."""
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    with netns.simulated_nodes(2) as nodes:
        before = [n.counters() for n in nodes]
        agents = [netns.launch_agent(nodes, k, job(small_preset, run_dir), tmp_path / f"node{k}.log")
                  for k in range(2)]
        assert wait_all(agents, 150) == [0, 0], logs(tmp_path)
        after = [n.counters() for n in nodes]
    print(f"2 nodes x 1 process: {time.monotonic() - t0:.1f} s")
    m = json.loads((run_dir / "metrics.json").read_text())
    ref_dir, ref = one_node
    assert m["world_size"] == 2 and m["tables"] == "blocks"
    assert_same_metrics(m, ref)
    assert_same_tables(run_dir, ref_dir)
    # Ranks follow the agents' addresses: rank 0 on node 0, which wrote the run directory.
    out0 = (tmp_path / "node0.log").read_text()
    assert "[rank 0] done: test rmse" in out0, logs(tmp_path)
    # Rank 0's table blocks went out of node 0 and into node 1 (and rank 1's back the other way).
    sent = m["table_bytes_sent"]
    delta = [{k: b[k] - a[k] for k in a} for a, b in zip(before, after, strict=True)]
    print(f"table_bytes_sent {sent:,}; veth counters {delta}")
    assert sent > 0
    assert delta[0]["tx_bytes"] >= sent and delta[1]["rx_bytes"] >= sent, delta
    assert delta[1]["tx_bytes"] >= sent // 2 and delta[0]["rx_bytes"] >= sent // 2, delta


def test_a_killed_node_comes_back_and_the_job_ends_as_if_uninterrupted(small_preset, one_node, tmp_path):
    """SIGKILL every process of node 1 (its agent and its worker) mid-epoch; node 0's agent, with restarts
    left, restarts its worker and waits at the rendezvous; node 1's agent is started again with the same
    command. Both resume from the newest checkpoint and end with the uninterrupted run's tables."""
    run_dir = tmp_path / "run"
    args = job(small_preset, run_dir)
    t0 = time.monotonic()
    with netns.simulated_nodes(2) as nodes:
        agents = [netns.launch_agent(nodes, k, args, tmp_path / f"node{k}.log", **ELASTIC) for k in range(2)]
        first = wait_for_checkpoint(run_dir, agents, tmp_path)
        killed = nodes[1].kill_all()
        assert len(killed) >= 2 and not nodes[1].pids()  # the agent and its worker: the whole node
        assert not (run_dir / "metrics.json").exists()
        t_kill = time.monotonic()
        agents[1] = netns.launch_agent(nodes, 1, args, tmp_path / "node1-again.log", **ELASTIC)
        assert wait_all(agents, 150) == [0, 0], logs(tmp_path)
    print(f"killed node 1 after {first.name}; recovered and finished {time.monotonic() - t_kill:.1f} s later; "
          f"{time.monotonic() - t0:.1f} s in all")
    out0 = (tmp_path / "node0.log").read_text()
    resumed = re.findall(r"resumed from \S+/step-(\d+)\.pt at epoch (\d+)", out0)
    assert len(resumed) == 1, logs(tmp_path)  # node 0's agent restarted its worker, which resumed
    step, epoch = int(resumed[0][0]), int(resumed[0][1])
    assert epoch == 0 and 0 < step < STEPS_PER_EPOCH  # mid-epoch
    m = json.loads((run_dir / "metrics.json").read_text())
    ref_dir, ref = one_node
    assert_same_metrics(m, ref)
    assert_same_tables(run_dir, ref_dir)


@pytest.mark.parametrize("fault", ["killed", "cut_off"])
def test_a_node_that_never_comes_back_fails_the_job_in_time(small_preset, tmp_path, fault):
    """Node 1 is killed (its sockets close: rank 0's collective fails at once) or cut off (its link goes
    down, its processes live on: rank 0 waits out --train.timeout_s). Either way node 0's agent restarts
    its worker, waits JOIN_TIMEOUT_S at the rendezvous for node 1, and exits non-zero: no hang."""
    run_dir = tmp_path / "run"
    with netns.simulated_nodes(2) as nodes:
        agents = [netns.launch_agent(nodes, k, job(small_preset, run_dir), tmp_path / f"node{k}.log", **ELASTIC)
                  for k in range(2)]
        wait_for_checkpoint(run_dir, agents, tmp_path)
        t_fault = time.monotonic()
        if fault == "killed":
            nodes[1].kill_all()
        else:
            subprocess.run(["ip", "-n", nodes[1].netns, "link", "set", "dev", nodes[1].ifname, "down"], check=True)
        bound = TIMEOUT_S + JOIN_TIMEOUT_S + 15
        code = wait_all(agents[:1], bound)[0]
        took = time.monotonic() - t_fault
    tail = [line for line in (tmp_path / "node0.log").read_text().splitlines() if line.strip()][-3:]
    print(f"node 1 {fault}: node 0's agent exited {code} after {took:.1f} s; its last lines:\n" + "\n".join(tail))
    assert code is not None, f"node 0 still running {bound} s after node 1 was {fault}\n{logs(tmp_path)}"
    assert code != 0 and took < bound
    assert not (run_dir / "metrics.json").exists()


BENCH = netns.ROOT / "benchmarks" / "nodes.py"


def test_nodes_benchmark_end_to_end(small_data, tmp_path):
    """benchmarks/nodes.py on tiny data: 1 process, 1 node x 2, 2 nodes x 1 behind a 1 Gbit/s cap; the table,
    one JSON line per run and (with matplotlib) the PNG."""
    try:
        import matplotlib  # noqa: F401
        has_mpl = True
    except ImportError:
        has_mpl = False
    jsonl, png = tmp_path / "nodes.jsonl", tmp_path / "nodes.png"
    cmd = [sys.executable, str(BENCH), "--data", str(small_data), "--epochs", "1", "--rates", "1gbit",
           "--out-jsonl", str(jsonl)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(netns.ROOT), os.environ.get("PYTHONPATH")]))}
    if not has_mpl:  # refused at once, in one line, before any run
        proc = subprocess.run([*cmd, "--plot", str(png)], capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert "needs matplotlib" in proc.stderr and not jsonl.exists()
    t0 = time.monotonic()
    proc = subprocess.run([*cmd, *(["--plot", str(png)] if has_mpl else [])], capture_output=True, text=True,
                          timeout=240, env=env)
    print(f"benchmarks/nodes.py on tiny data: {time.monotonic() - t0:.1f} s\n{proc.stdout}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| configuration | ranks |") and "vs 1 node x W" in rows[0]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| 1 process", "| 1 node x 2", "| 2 nodes x 1 @ 1gbit"]
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["nodes"], r["procs_per_node"], r["rate"]) for r in records] == [(1, 1, None), (1, 2, None),
                                                                                 (2, 1, "1gbit")]
    assert all(r["train_ratings_per_s"] > 0 and r["test_rmse"] > 0 for r in records)
    assert records[0]["vs_1_process"] == 1.0 and records[1]["vs_1_node"] == 1.0
    assert records[2]["veth_bytes_node0"] >= records[2]["table_bytes_sent"] > 0
    assert records[1]["test_rmse"] == records[2]["test_rmse"]  # the same 2-rank job, wherever its ranks ran
    if has_mpl:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tag = re.search(r"--rdzv-id=(\S+)", records[2]["command"]).group(1)  # the nodes' names carry it
    assert tag.startswith(netns.PREFIX) and not netns.our_namespaces(tag)  # the script removed its nodes

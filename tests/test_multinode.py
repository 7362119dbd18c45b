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
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch

from mfscale import checkpoint, prepare

from . import netns
from .test_slurm_real import slurm_conf

pytestmark = pytest.mark.skipif(netns.unavailable_reason() is not None, reason=str(netns.unavailable_reason()))

TIMEOUT_S = 12  # --train.timeout_s: a collective waiting this long fails
JOIN_TIMEOUT_S = 12  # torchrun's c10d rendezvous: a restarted agent waits this long for the other node
# The node-never-back tests wait these out, so they are shorter there: they only need to outlast the job's
# start-up (both agents are launched together), not a node's restart.
FAULT_TIMEOUT_S = 5
FAULT_JOIN_TIMEOUT_S = 5
# The small preset (85,000 training ratings), 2 epochs of 333 steps at 2 x 128, a checkpoint every 20 steps.
JOB = ["--epochs", "2", "--batch-size", "128", "--train.patience", "0", "--checkpoint.every_steps", "20",
       "--train.timeout_s", str(TIMEOUT_S)]
STEPS_PER_EPOCH = 333


def elastic(join_timeout_s: float) -> dict:
    """torchrun's options for restarts: a dead agent drops out of the rendezvous after 3 missed keep-alives
    (1 s apart; torch's default is 5 s), so a restarted node joins the next round about 3 s after the kill."""
    return {"max_restarts": 2, "rdzv_conf": f"join_timeout={join_timeout_s},keep_alive_interval=1"}


ELASTIC = elastic(JOIN_TIMEOUT_S)
FAULT_ELASTIC = elastic(FAULT_JOIN_TIMEOUT_S)


@pytest.fixture(scope="module")
def small_preset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small-preset") / "data"
    assert prepare.main(["--synthetic", "small", "--out", str(out), "--quiet"]) == 0
    return out


def job(data: Path, run_dir: Path, timeout_s: float = TIMEOUT_S) -> list[str]:
    args = ["--data", str(data), "--run-dir", str(run_dir), *JOB]
    args[args.index("--train.timeout_s") + 1] = str(timeout_s)
    return args


@pytest.fixture(scope="module")
def one_node_started(small_preset, tmp_path_factory) -> Iterator[tuple[subprocess.Popen, float, Path]]:
    """The job as 1 node x 2 processes (torchrun --standalone), started: (process, its start, base directory).
    ``one_node`` waits for it; a test that asks for this first runs its own job beside it (the one on this
    machine's loopback, the other on its simulated nodes' veths)."""
    base = tmp_path_factory.mktemp("one-node")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(netns.ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mfscale.train",
           *job(small_preset, base / "run")]
    with open(base / "stdout", "w") as out, open(base / "stderr", "w") as err:  # files: no pipe to fill up
        proc = subprocess.Popen(cmd, env=env, cwd=base, stdout=out, stderr=err, start_new_session=True)
    try:
        yield proc, time.monotonic(), base
    finally:
        if proc.poll() is None:  # a test that did not wait for it failed: stop it and its workers
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def one_node(one_node_started) -> tuple[Path, dict]:
    """The job as 1 node x 2 processes (torchrun --standalone): (run dir, metrics)."""
    proc, started, base = one_node_started
    try:
        proc.wait(timeout=max(0.1, started + 180 - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, (base / "stderr").read_text()[-3000:]
    return base / "run", json.loads((base / "run" / "metrics.json").read_text())


def tables(run_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The newest checkpoint's metadata and its whole tables with their optimizer state."""
    state, path = checkpoint.load_latest(run_dir)
    return state, checkpoint.assemble(path, state, optimizer=True)


def assert_same_tables(run_a: Path, run_b: Path) -> None:
    (sa, ta), (sb, tb) = tables(run_a), tables(run_b)
    assert (sa["epoch"], sa["global_step"]) == (sb["epoch"], sb["global_step"])
    assert ta.keys() == tb.keys() and "users.row_sq" in ta  # the default optimizer's state, compared too
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def assert_same_metrics(a: dict, b: dict) -> None:
    for key in ("test_rmse", "test_mae", "best_val_rmse", "epochs", "steps", "history", "world_size"):
        assert a[key] == b[key], key


def logs(base: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(base.glob("node*.log")))


def wait_for_checkpoint(run_dir: Path, agents: list[subprocess.Popen], base: Path, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while not (found := checkpoint.list_checkpoints(run_dir)):
        assert all(p.poll() is None for p in agents), f"an agent exited before the first checkpoint\n{logs(base)}"
        assert time.monotonic() < deadline, f"no checkpoint in {timeout} s\n{logs(base)}"
        time.sleep(0.02)
    return found[0]


def test_nodes_are_removed_with_their_processes_also_when_the_body_raises():
    """Three nodes behind 1 Gbit/s caps reach each other by address and have their own hostnames; an
    exception in the body still removes every namespace and process."""
    with pytest.raises(RuntimeError, match="body failed"), netns.simulated_nodes(3, rate="1gbit") as nodes:
        tag = nodes.tag
        server = nodes[2].launch(["python3", "-c", "import socket; s = socket.socket(); "
                                  f"s.bind(('{nodes[2].addr}', 5000)); s.listen(); c, _ = s.accept(); "
                                  "print(c.recv(16).decode(), flush=True)"], stdout=subprocess.PIPE, text=True)
        client = ("import socket, time\nfor _ in range(100):\n    try:\n"
                  f"        socket.create_connection(('{nodes[2].addr}', 5000), timeout=5).sendall(b'hi'); break\n"
                  "    except ConnectionRefusedError:\n        time.sleep(0.05)")
        assert nodes[0].run(["python3", "-c", client]).returncode == 0
        assert server.communicate(timeout=10)[0].strip() == "hi"
        assert nodes[1].run(["hostname"]).stdout.strip() == "node1"
        assert "tbf" in nodes[1].run(["tc", "qdisc", "show", "dev", nodes[1].ifname]).stdout
        assert nodes[0].counters()["tx_bytes"] > 0
        sleeper = nodes[1].launch(["sh", "-c", "sleep 300 & sleep 300"])  # a child outside its process group too
        deadline = time.monotonic() + 10
        while len(nodes[1].pids()) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pids = nodes[1].pids()
        raise RuntimeError("body failed")
    assert not netns.our_namespaces(tag)
    assert sleeper.poll() is not None
    assert not [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_nodes_skip_with_the_reason_when_they_cannot_be_made(monkeypatch):
    def fail(*args, **kwargs):
        raise subprocess.CalledProcessError(2, ["ip", "netns", "add", "x"], "", "Operation not permitted")

    monkeypatch.setattr(netns, "_setup", fail)
    with pytest.raises(pytest.skip.Exception, match="ip netns add x: Operation not permitted"), \
            netns.simulated_nodes(2):
        pass
    with pytest.raises(netns.NodesUnavailable), netns.simulated_nodes(2, skip=False):
        pass
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="need root"), netns.simulated_nodes(2):
        pass

def test_two_nodes_train_the_tables_of_one_node(small_preset, one_node_started, tmp_path, request):
    """2 nodes x 1 process over the veth: the same tables, bit for bit, as 1 node x 2 processes; the table
    traffic crossed the veth. (The 1-node job runs beside this one: one_node_started.)"""
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    with netns.simulated_nodes(2) as nodes:
        before = [n.counters() for n in nodes]
        agents = [netns.launch_agent(nodes, k, job(small_preset, run_dir), tmp_path / f"node{k}.log")
                  for k in range(2)]
        assert netns.wait_all(agents, 150) == [0, 0], logs(tmp_path)
        after = [n.counters() for n in nodes]
    print(f"2 nodes x 1 process: {time.monotonic() - t0:.1f} s")
    m = json.loads((run_dir / "metrics.json").read_text())
    ref_dir, ref = request.getfixturevalue("one_node")
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
        assert netns.wait_all(agents, 150) == [0, 0], logs(tmp_path)
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


FAULTS = ("killed", "cut_off")
FAULT_BOUND_S = FAULT_TIMEOUT_S + FAULT_JOIN_TIMEOUT_S + 15  # node 0's agent must have exited by then


def _fault(nodes: netns.Nodes, fault: str) -> None:
    if fault == "killed":
        nodes[1].kill_all()
    else:
        subprocess.run(["ip", "-n", nodes[1].netns, "link", "set", "dev", nodes[1].ifname, "down"], check=True)


@pytest.fixture(scope="module")
def never_back(small_preset, tmp_path_factory) -> dict[str, tuple[int | None, float, Path]]:
    """test_a_node_that_never_comes_back_fails_the_job_in_time's two faults, overlapped, each on 2 nodes of its
    own (namespaces, veths, rendezvous, run directory): most of either one's time is waiting out timeouts. The
    cut-off job (the longer wait) starts first; the killed one starts once the cut-off job has its fault, so
    the two never start up at the same time. As in one test at a time, each job gets its fault as soon as its
    first checkpoint is there, and node 0's agent is given FAULT_BOUND_S from then to exit. Per fault: that
    agent's exit code (None: still running at the bound), the seconds from the fault to its exit, and the
    directory with the run and the logs."""
    order = ("cut_off", "killed")
    assert sorted(order) == sorted(FAULTS)
    base = {f: tmp_path_factory.mktemp(f"never-back-{f}") for f in order}
    nodes: dict[str, netns.Nodes] = {}
    agents: dict[str, list[subprocess.Popen]] = {}
    deadline: dict[str, float] = {}
    t_fault: dict[str, float] = {}
    ended: dict[str, tuple[int | None, float]] = {}
    with ExitStack() as stack:

        def launch(f: str) -> None:
            nodes[f] = stack.enter_context(netns.simulated_nodes(2))
            agents[f] = [netns.launch_agent(nodes[f], k, job(small_preset, base[f] / "run", FAULT_TIMEOUT_S),
                                            base[f] / f"node{k}.log", **FAULT_ELASTIC) for k in range(2)]
            deadline[f] = time.monotonic() + 120

        launch(order[0])
        while len(ended) < len(order):
            for f in list(agents):
                if f not in t_fault:  # wait_for_checkpoint, then the fault
                    if checkpoint.list_checkpoints(base[f] / "run"):
                        t_fault[f] = time.monotonic()
                        _fault(nodes[f], f)
                        if (i := order.index(f) + 1) < len(order):
                            launch(order[i])
                    else:
                        assert all(p.poll() is None for p in agents[f]), \
                            f"{f}: an agent exited before the first checkpoint\n{logs(base[f])}"
                        assert time.monotonic() < deadline[f], f"{f}: no checkpoint in 120 s\n{logs(base[f])}"
                elif f not in ended:  # netns.wait_all([node 0's agent], FAULT_BOUND_S)
                    took = time.monotonic() - t_fault[f]
                    if (code := agents[f][0].poll()) is not None or took >= FAULT_BOUND_S:
                        ended[f] = (code, took)
            time.sleep(0.02)
    return {f: (*ended[f], base[f]) for f in FAULTS}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_node_that_never_comes_back_fails_the_job_in_time(never_back, fault):
    """Node 1 is killed (its sockets close: rank 0's collective fails at once) or cut off (its link goes
    down, its processes live on: rank 0 waits out --train.timeout_s). Either way rank 0 says so in one line,
    node 0's agent restarts its worker, waits its join_timeout at the rendezvous for node 1, and exits
    non-zero: no hang. (The timeouts are FAULT_*: shorter than the other tests', the same mechanism. The two
    faults' jobs overlap: the never_back fixture.)"""
    code, took, tmp_path = never_back[fault]
    run_dir = tmp_path / "run"
    bound = FAULT_BOUND_S
    out0 = (tmp_path / "node0.log").read_text()
    tail = [line for line in out0.splitlines() if line.strip()][-3:]
    print(f"node 1 {fault}: node 0's agent exited {code} after {took:.1f} s; its last lines:\n" + "\n".join(tail))
    assert code is not None, f"node 0 still running {bound} s after node 1 was {fault}\n{logs(tmp_path)}"
    assert code != 0 and took < bound
    assert not (run_dir / "metrics.json").exists()
    # Rank 0's one line for the failed collective, then the agent's wait for node 1 at the rendezvous, in full.
    if fault == "killed":
        assert re.search(r"^mfscale\.train: error: .* went away during a collective", out0, re.M), logs(tmp_path)
        assert took >= FAULT_JOIN_TIMEOUT_S
    else:
        assert re.search(r"^mfscale\.train: error: a collective timed out: .*the limit is --train\.timeout_s",
                         out0, re.M), logs(tmp_path)
        assert took >= FAULT_TIMEOUT_S + FAULT_JOIN_TIMEOUT_S - 1  # the collective began at most ~1 s before
    assert "RendezvousTimeoutError" in tail[-1], logs(tmp_path)


# --- real SLURM across the two nodes -----------------------------------------------------------------------------

SBATCH = netns.ROOT / "launch" / "slurm" / "train.sbatch"
SLURM_FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _sbin(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


_no_slurm = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "srun") if _sbin(b) is None]


@contextmanager
def slurm_cluster(nodes: netns.Nodes, root: Path) -> Iterator[dict[str, str]]:
    """A SLURM cluster of the simulated nodes: slurmctld and a slurmd on node 0, a slurmd on node 1 (``-N
    nodeK``, SLURM's NodeAddr = the node's address), one munged for both (its socket is a file, reachable
    from every namespace). Yields the environment for the SLURM clients, which must run on a node (the
    controller listens on node 0's address). Everything stops when the block ends."""
    root.mkdir()
    root.chmod(0o711)  # munged wants its socket's directory reachable by every user
    for d in ("state", "jobs", *(f"spool-{n.hostname}" for n in nodes)):
        (root / d).mkdir()
    (root / "munge.key").write_bytes(os.urandom(1024))
    (root / "munge.key").chmod(0o400)
    (root / "slurm.conf").write_text(slurm_conf(root, "mfnodes", (nodes[0].hostname, nodes[0].addr), (6817, 6818),
                                                [(n.hostname, n.addr) for n in nodes]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["SLURM_CONF"] = str(root / "slurm.conf")
    with open(root / "munged.out", "w") as out:  # in this namespace; killed below
        munged = subprocess.Popen([_sbin("munged"), "-F", "--force", f"--key-file={root}/munge.key",
                                   f"--socket={root}/munge.sock", f"--pid-file={root}/munged.pid",
                                   f"--log-file={root}/munged.log", f"--seed-file={root}/munged.seed"],
                                  env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (root / "munge.sock").exists():
            assert munged.poll() is None and time.monotonic() < deadline, (root / "munged.out").read_text()
            time.sleep(0.1)
        daemons = [(nodes[0], "slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(root / "slurm.conf")])]
        daemons += [(n, f"slurmd-{n.hostname}", [_sbin("slurmd"), "-D", "-f", str(root / "slurm.conf"), "-N",
                                                 n.hostname]) for n in nodes]
        for node, name, argv in daemons:
            with open(root / f"{name}.out", "w") as out:
                node.launch(argv, env=env, host_mounts=True, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while (idle := nodes[0].run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, host_mounts=True).stdout
               ).count(" idle") < len(nodes):
            assert time.monotonic() < deadline, f"nodes not idle: {idle}\n{slurm_logs(root)}"
            time.sleep(0.5)
        yield env
    finally:
        for node in reversed(list(nodes)):  # slurmd and their job steps, slurmctld; the nodes' cleanup would too
            node.kill_all()
        munged.kill()
        munged.wait()


def slurm_logs(root: Path) -> str:
    files = sorted(root.glob("*.log")) + sorted(root.glob("*.out")) + sorted((root / "jobs").glob("*.out"))
    return "\n".join(f"--- {f.name}\n{f.read_text()[-2500:]}" for f in files)


@pytest.mark.skipif(bool(_no_slurm), reason=f"SLURM not installed (missing {', '.join(_no_slurm)}): "
                                            "apt-get install slurm-wlm munge")
def test_real_slurm_runs_train_sbatch_on_two_nodes(small_preset, one_node, tmp_path):
    """``sbatch --nodes=2 launch/slurm/train.sbatch`` on a real SLURM whose two nodes are the simulated ones:
    srun starts one torchrun per node, the rendezvous is on the first node by its hostname, gloo goes over
    the veth (hostnames resolve to the nodes' addresses). The same tables as 1 node x 2 processes."""
    t0 = time.monotonic()
    with netns.simulated_nodes(2, hosts=True) as nodes, slurm_cluster(nodes, tmp_path / "slurm") as env:
        jobs = tmp_path / "slurm" / "jobs"
        job_env = {**env, "DATA": str(small_preset), "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(netns.ROOT), env.get("PYTHONPATH")])),
                   "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])}
        before = nodes[0].counters()
        proc = nodes[0].run(["sbatch", "--parsable", "--nodes=2", f"--cpus-per-task={os.cpu_count() or 1}",
                             str(SBATCH), *JOB], env=job_env, cwd=jobs, host_mounts=True)
        assert proc.returncode == 0, proc.stderr
        job_id = proc.stdout.strip().split(";")[0]
        deadline = time.monotonic() + 180
        while True:
            info = dict(re.findall(r"(\w+)=(\S*)", nodes[0].run(["scontrol", "show", "job", job_id], env=env,
                                                                 host_mounts=True).stdout))
            if info.get("JobState") in SLURM_FINAL:
                break
            assert time.monotonic() < deadline, f"job {job_id}: {info.get('JobState')}\n{slurm_logs(jobs.parent)}"
            time.sleep(0.5)
        after = nodes[0].counters()
        out = (jobs / f"mfscale-{job_id}.out").read_text()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", slurm_logs(jobs.parent)
        assert info["NodeList"] == "node[0-1]" and info["NumNodes"] == "2", info
    print(f"SLURM job on 2 nodes: {time.monotonic() - t0:.1f} s in all")
    assert "2 node(s) x 1 process(es) x 1 thread(s), rendezvous node0:" in out, out
    assert "warning" not in out and "error" not in out, out
    run_dir = jobs / "runs" / f"mfscale-{job_id}"
    m = json.loads((run_dir / "metrics.json").read_text())
    ref_dir, ref = one_node
    assert_same_metrics(m, ref)
    assert_same_tables(run_dir, ref_dir)
    assert after["tx_bytes"] - before["tx_bytes"] >= m["table_bytes_sent"] > 0

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

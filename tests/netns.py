"""Simulated nodes on one machine: Linux network namespaces joined by veth pairs, for multi-node tests and
benchmarks (tests/test_multinode.py, benchmarks/nodes.py).

``simulated_nodes(n)`` makes n "nodes". Each is its own network namespace with one veth interface and a
127.x.y.z address; the other ends of the veths sit on a bridge in one more namespace (the "switch"), so every
node reaches every other one, and each process a node runs gets the node's own hostname (a UTS namespace per
launch). Nothing is configured in the machine's own namespace: the node addresses, the ``route_localnet``
sysctls and the bandwidth caps all live in namespaces made here.

Why no node in the root namespace: there ``lo`` holds 127.0.0.0/8, so the kernel delivers 127.x.y.z locally
whatever veth carries it, and node 0 could not reach node 1 at all. Inside a node's namespace ``lo`` keeps
only 127.0.0.1/32, so 127.x.y.z other than the node's own goes out through its veth (``route_localnet=1``
lets the kernel route loopback addresses over a real interface).

Everything made here (namespaces, hence the veths and the bridge, and every process still running in a
node) is removed when the ``with`` block ends, also when it raises. Names carry the creating process's pid,
so parallel runs do not collide, and namespaces left by a process that no longer exists (one killed with
SIGKILL, which no ``finally`` survives) are removed the next time nodes are made.

Needs root and iproute2 (``ip``, ``tc``) and ``unshare`` (util-linux). Without them, or when a namespace
cannot be made, ``simulated_nodes`` calls ``pytest.skip`` with the reason (``skip=False``: raises
``NodesUnavailable`` instead, for scripts).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "mfnode"  # every namespace made here is named mfnode<pid>-<seq>-<role>
_NS_NAME = re.compile(rf"^{PREFIX}(\d+)-\d+-(n\d+|sw)$")
_seq = itertools.count()
# Bridge-side veth ends live in the switch namespace; a node's own end is its only interface besides lo.
_HOSTS_DIR = Path("/etc/netns")  # `ip netns exec NS` bind-mounts /etc/netns/NS/* over /etc/*


class NodesUnavailable(RuntimeError):
    """Simulated nodes cannot be made here (not root, no iproute2, namespaces not permitted)."""


def _run(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


def unavailable_reason() -> str | None:
    """Why simulated nodes cannot be made here, or None when they probably can (creating one decides)."""
    if os.geteuid() != 0:
        return "simulated nodes need root (network namespaces, veth pairs)"
    missing = [b for b in ("ip", "tc", "unshare", "nsenter", "sysctl", "hostname") if _which(b) is None]
    if missing:
        return f"simulated nodes need iproute2 and util-linux (missing {', '.join(missing)}): apt-get install iproute2"
    return None


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def _netns_pids(ns: str) -> list[int]:
    proc = _run("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def _kill_netns_processes(ns: str, timeout: float = 10) -> list[int]:
    """SIGKILL every process in namespace ``ns`` until none is left; the pids that would not go."""
    deadline = time.monotonic() + timeout
    while pids := _netns_pids(ns):
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            return pids
        time.sleep(0.05)
    return []


def _reap(procs: list[subprocess.Popen]) -> list[int]:
    """SIGKILL the process group of each launched process still running, then wait for each; the pids that
    did not end."""
    for proc in procs:
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    left = []
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            left.append(proc.pid)
    return left


def _remove_namespace(ns: str) -> None:
    _kill_netns_processes(ns)
    _run("ip", "netns", "del", ns, check=False)
    shutil.rmtree(_HOSTS_DIR / ns, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Remove the namespaces of creators that no longer exist (killed before their cleanup ran)."""
    proc = _run("ip", "netns", "list", check=False)
    stale = []
    for line in proc.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NS_NAME.match(name)
        if m and not _alive(int(m.group(1))):
            _remove_namespace(name)
            stale.append(name)
    return stale


def our_namespaces(tag: str | None = None) -> list[str]:
    """Namespaces made by this module (by this process's run ``tag``, if given) that still exist."""
    proc = _run("ip", "netns", "list", check=False)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.split()]
    return [n for n in names if _NS_NAME.match(n) and (tag is None or n.startswith(f"{tag}-"))]


@dataclass
class Node:
    """One simulated node: its namespace, hostname, interface and address; launches processes in it."""

    index: int
    netns: str
    hostname: str
    ifname: str  # this node's veth, inside its namespace (GLOO_SOCKET_IFNAME)
    addr: str  # its 127.x.y.z address on that veth
    procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def command(self, argv: Sequence[str], host_mounts: bool = False) -> list[str]:
        """``argv`` run in this node: its network namespace, a UTS namespace with its hostname.

        By default through ``ip netns exec``, which gives the process a /sys of the node's own namespace (and
        so no /sys/fs/cgroup) and binds /etc/netns/NS/hosts over /etc/hosts. ``host_mounts``: through
        ``nsenter --net`` instead, keeping this machine's mounts (slurmd needs its cgroup file system), with
        only the node's hosts file bound over /etc/hosts in a private mount namespace.
        """
        if not host_mounts:
            return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--", "sh", "-c",
                    'hostname "$0" && exec "$@"', self.hostname, *argv]
        hosts = _HOSTS_DIR / self.netns / "hosts"
        return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--uts", "--mount", "--", "sh", "-c",
                'hostname "$0" && { [ ! -f "$1" ] || mount --bind "$1" /etc/hosts; } && shift && exec "$@"',
                self.hostname, str(hosts), *argv]

    def launch(self, argv: Sequence[str], env: Mapping[str, str] | None = None, host_mounts: bool = False,
               **popen_kw) -> subprocess.Popen:
        """Start ``argv`` on this node (in a new session, so its process group is its own); ``env`` is added
        to this process's environment. The process is killed when the nodes are removed."""
        full_env = {**os.environ, **(env or {})}
        popen_kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.command(argv, host_mounts), env=full_env, **popen_kw)
        self.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], timeout: float = 30, host_mounts: bool = False,
            **kw) -> subprocess.CompletedProcess:
        """Run a short command on this node and wait for it (output captured as text)."""
        return subprocess.run(self.command(argv, host_mounts), capture_output=True, text=True, timeout=timeout,
                              **kw)

    def pids(self) -> list[int]:
        """Every process running in this node's namespace, whoever started it (e.g. torchrun's workers)."""
        return _netns_pids(self.netns)

    def kill_all(self) -> list[int]:
        """SIGKILL every process of this node (a node that dies), and reap those launched here; their pids."""
        pids = self.pids()
        left = _kill_netns_processes(self.netns) + _reap(self.procs)
        if left:
            raise RuntimeError(f"node {self.index}: processes {left} survived SIGKILL")
        return pids

    def counters(self) -> dict[str, int]:
        """Bytes and packets through this node's veth so far: rx_bytes, tx_bytes, rx_packets, tx_packets."""
        out = _run("ip", "-n", self.netns, "-j", "-s", "link", "show", "dev", self.ifname).stdout
        stats = json.loads(out)[0]["stats64"]
        return {f"{d}_{k}": int(stats[d][k]) for d in ("rx", "tx") for k in ("bytes", "packets")}


@dataclass
class Nodes:
    tag: str
    switch: str  # the namespace holding the bridge
    nodes: list[Node]
    rate: str | None

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __getitem__(self, i: int) -> Node:
        return self.nodes[i]

    def __len__(self) -> int:
        return len(self.nodes)


def _setup(tag: str, n: int, rate: str | None, subnet: int, hosts: bool) -> Nodes:
    switch = f"{tag}-sw"
    _run("ip", "netns", "add", switch)
    bridge = "br0"
    _run("ip", "-n", switch, "link", "add", bridge, "type", "bridge")
    _run("ip", "-n", switch, "link", "set", bridge, "up")
    short = tag[len(PREFIX):].replace("-", "x")  # interface names: at most 15 characters
    nodes = []
    for k in range(n):
        ns = f"{tag}-n{k}"
        _run("ip", "netns", "add", ns)
        ifname, port = f"mf{short}n{k}", f"mf{short}s{k}"
        if len(ifname) > 15:
            raise NodesUnavailable(f"interface name {ifname!r} too long")
        node = Node(k, ns, f"node{k}", ifname, f"127.{subnet}.0.{k + 1}")
        nodes.append(node)
        # Created in place: the node end in the node's namespace, the other on the switch.
        _run("ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", port, "netns", switch)
        _run("ip", "-n", switch, "link", "set", port, "master", bridge)
        _run("ip", "-n", switch, "link", "set", port, "up")
        _run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1",
             f"net.ipv4.conf.{ifname}.route_localnet=1")
        # lo keeps only 127.0.0.1: the rest of 127/8 must leave through the veth, not loop back locally.
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "addr", "del", "127.0.0.1/8", "dev", "lo")
        _run("ip", "-n", ns, "addr", "add", "127.0.0.1/32", "dev", "lo")
        _run("ip", "-n", ns, "addr", "add", f"{node.addr}/24", "dev", ifname)
        _run("ip", "-n", ns, "link", "set", ifname, "up")
        if rate:  # both directions: the node's upload on its end, its download on the switch port
            for where, dev in ((ns, ifname), (switch, port)):
                _run("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                     "burst", "256kb", "latency", "50ms")
    if hosts:  # each node resolves every node's hostname (SLURM, torchrun without --local-addr)
        lines = "127.0.0.1 localhost\n" + "".join(f"{m.addr} {m.hostname}\n" for m in nodes)
        for node in nodes:
            d = _HOSTS_DIR / node.netns
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts").write_text(lines)
    return Nodes(tag, switch, nodes, rate)


@contextmanager
def simulated_nodes(n: int, rate: str | None = None, *, subnet: int = 77, hosts: bool = False,
                    skip: bool = True) -> Iterator[Nodes]:
    """``n`` nodes (``Nodes``: index it, iterate it), each link capped at ``rate`` (tc's syntax, e.g.
    "1gbit") in both directions if given. Node k is hostname ``nodek`` at 127.<subnet>.0.<k+1>. With
    ``hosts``, /etc/hosts inside each node maps every node's hostname to its address.

    Removes every namespace, veth and process it made when the block ends, however it ends.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    reason = unavailable_reason()
    if reason is None:
        sweep_stale()
    tag = f"{PREFIX}{os.getpid()}-{next(_seq)}"
    made: Nodes | None = None
    try:
        if reason is None:
            try:
                made = _setup(tag, n, rate, subnet, hosts)
            except (subprocess.CalledProcessError, OSError, NodesUnavailable) as exc:
                detail = getattr(exc, "stderr", "") or str(exc)
                cmd = " ".join(exc.cmd) if isinstance(exc, subprocess.CalledProcessError) else ""
                reason = f"could not make simulated nodes: {cmd}: {detail.strip()}"
        if reason is not None:
            _cleanup(tag, None)
            if skip:
                import pytest

                pytest.skip(reason)
            raise NodesUnavailable(reason)
        yield made
    finally:
        _cleanup(tag, made)


def _cleanup(tag: str, made: Nodes | None) -> None:
    """Kill every process in the nodes, reap what was launched, delete the namespaces (with them the veths
    and the bridge) and the per-node /etc/netns files. Raises if anything survived."""
    survivors = []
    names = our_namespaces(tag)
    for ns in names:
        survivors += _kill_netns_processes(ns)
    if made is not None:
        for node in made:
            survivors += _reap(node.procs)
    for ns in names:
        _run("ip", "netns", "del", ns, check=False)
        shutil.rmtree(_HOSTS_DIR / ns, ignore_errors=True)
    left = our_namespaces(tag)
    if survivors or left:
        raise RuntimeError(f"simulated nodes {tag}: left behind processes {survivors}, namespaces {left}")


# --- torchrun across the nodes -----------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]  # this checkout: first on the nodes' PYTHONPATH
RDZV_PORT = 29400  # every node has a fresh network namespace, so a fixed port is free on node 0


def agent_command(nodes: Nodes, k: int, train_args: Sequence[str], *, nproc_per_node: int = 1,
                  rdzv_id: str | None = None, max_restarts: int = 0, rdzv_conf: str | None = None,
                  local_addr: bool = True, module: str = "mfscale.train", python: str | None = None) -> list[str]:
    """The torchrun agent of node ``k``: c10d rendezvous on node 0's address, ``--local-addr`` this node's."""
    import sys

    argv = [python or sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(nodes)}",
            f"--nproc_per_node={nproc_per_node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={nodes[0].addr}:{RDZV_PORT}", f"--rdzv-id={rdzv_id or nodes.tag}", f"--node-rank={k}",
            f"--max-restarts={max_restarts}"]
    if rdzv_conf:
        argv.append(f"--rdzv-conf={rdzv_conf}")
    if local_addr:
        argv.append(f"--local-addr={nodes[k].addr}")
    return [*argv, "-m", module, *train_args]


def agent_env(node: Node, *, gloo_ifname: bool = True, threads: int | None = 1, **extra: str) -> dict[str, str]:
    """The environment of a node's agent: this checkout first on PYTHONPATH, gloo bound to the node's veth,
    a worker store per worker group (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: restarted workers reconnect)."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONUNBUFFERED": "1"}
    if gloo_ifname:
        env["GLOO_SOCKET_IFNAME"] = node.ifname
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return {**env, **extra}


def launch_agent(nodes: Nodes, k: int, train_args: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None,
                 **kw) -> subprocess.Popen:
    """Start node ``k``'s agent (``agent_command`` keywords in ``kw``), its output appended to ``log``."""
    node = nodes[k]
    with open(log, "a") as out:
        return node.launch(agent_command(nodes, k, train_args, **kw), env=env or agent_env(node),
                           stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


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

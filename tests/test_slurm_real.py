"""launch/slurm/train.sbatch through a real SLURM: a one-node cluster (munged, slurmctld, slurmd) on this machine.

The cluster lives in a temporary directory: its own munge key and socket, slurm.conf (found through
SLURM_CONF), state, spool, logs and free ports, so it touches nothing system-wide and several can run side
by side. slurmd starts jobs as their submitter, so this needs root (as CI has); without SLURM installed
(`apt-get install slurm-wlm`, see .ci/run) or without root, the module skips with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "srun")
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")




def slurm_conf(root: Path, cluster: str, control: tuple[str, str], ports: tuple[int, int],
               nodes: list[tuple[str, str]]) -> str:
    """slurm.conf of a test cluster kept under ``root``: ``control`` = (host, address) of slurmctld, ``nodes`` =
    (name, address) of each slurmd (one spool, pid and log file per node: %n). Also tests/test_multinode.py."""
    cpus = os.cpu_count() or 1
    node_lines = "".join(f"NodeName={name} NodeAddr={addr} CPUs={cpus} RealMemory=1000 State=UNKNOWN\n"
                         for name, addr in nodes)
    return f"""\
ClusterName={cluster}
SlurmctldHost={control[0]}({control[1]})
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
{node_lines}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

def _sbin(name: str) -> str | None:
    """The daemons live in /usr/sbin, which a non-login PATH may lack."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


_missing = [b for b in DAEMONS + CLIENTS if _sbin(b) is None]
pytestmark = [
    pytest.mark.skipif(bool(_missing), reason=f"SLURM not installed (missing {', '.join(_missing)}): "
                                              "apt-get install slurm-wlm"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a one-node SLURM cluster needs root (slurmd runs jobs as users)"),
]

# A 2-process job of this size trains for a few seconds: long enough to be signalled mid-run.
TRAIN_ARGS = ["--epochs", "3", "--workers", "0", "--batch-size", "16", "--train.patience", "0"]


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env["SLURM_CONF"] = str(root / "slurm.conf")

    def start(self) -> None:
        r = self.root
        r.chmod(0o711)  # munged wants its socket's directory reachable by every user
        for d in ("state", f"spool-{self.host}", "jobs"):
            (r / d).mkdir()
        (r / "munge.key").write_bytes(os.urandom(1024))
        (r / "munge.key").chmod(0o400)
        conf = slurm_conf(r, "mftest", (self.host, "127.0.0.1"), (free_port(), free_port()),
                          [(self.host, "127.0.0.1")])
        (r / "slurm.conf").write_text(conf)
        self._spawn("munged", [str(_sbin("munged")), "-F", "--force", f"--key-file={r}/munge.key",
                               f"--socket={r}/munge.sock", f"--pid-file={r}/munged.pid",
                               f"--log-file={r}/munged.log", f"--seed-file={r}/munged.seed"])
        self._wait(lambda: (r / "munge.sock").exists(), "munged did not create its socket")
        self._spawn("slurmctld", [str(_sbin("slurmctld")), "-D", "-i", "-f", str(r / "slurm.conf")])
        self._spawn("slurmd", [str(_sbin("slurmd")), "-D", "-f", str(r / "slurm.conf"), "-N", self.host])
        self._wait(lambda: self.scontrol("show", "node", self.host, check=False).count("State=IDLE") == 1,
                   "the node did not come up idle")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.out", "w")  # noqa: SIM115 (closed with the process)
        self.procs.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT))
        log.close()

    def _wait(self, ready, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what} (exited: {dead})\n{self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(self.root.glob("*.out")))

    def stop(self) -> None:
        for p in reversed(self.procs):  # slurmd (and its job steps) first, munged last
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def scontrol(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True, timeout=30)
        if check and proc.returncode:
            raise RuntimeError(f"scontrol {' '.join(args)}: {proc.stderr}")
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        text = self.scontrol("show", "job", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def submit(self, sbatch_args: list[str], train_args: list[str], **env: str) -> str:
        job_env = {**self.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), self.env.get("PYTHONPATH")])),
                   "PATH": os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")]), **env}
        proc = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(SBATCH), *train_args], env=job_env,
                              cwd=self.root / "jobs", capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} is {info['JobState']} ({info.get('Reason')}), not {states}"
                                     f"\n{self.log(job_id)}\n{self.logs()}")
            time.sleep(0.3)

    def log(self, job_id: str) -> str:
        path = self.root / "jobs" / f"mfscale-{job_id}.out"
        return path.read_text() if path.exists() else "(no job log)"

    def run_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / "runs" / f"mfscale-{job_id}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def reference(cluster, small_data) -> tuple[str, dict]:
    """An uninterrupted 2-process job, submitted as a user would on a CPU node."""
    job_id = cluster.submit([f"--cpus-per-task={os.cpu_count() or 1}"], TRAIN_ARGS, DATA=str(small_data),
                            NPROC_PER_NODE="2")
    info = cluster.wait_state(job_id, FINAL, timeout=180)
    return job_id, info


def test_two_process_job_completes(cluster, reference):
    job_id, info = reference
    out = cluster.log(job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-4000:]
    assert info["Restarts"] == "0"
    m = json.loads((cluster.run_dir(job_id) / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["epochs"] == 3 and m["test_rmse"] is not None
    assert "x 2 process(es)" in out and "terminate called" not in out
    assert "warning" not in out  # CPUs requested, no time limit: nothing to warn about


def test_usr1_to_the_batch_shell_requeues_and_the_job_resumes(cluster, reference, small_data):
    ref_id, _ = reference
    job_id = cluster.submit([f"--cpus-per-task={os.cpu_count() or 1}"], TRAIN_ARGS, DATA=str(small_data),
                            NPROC_PER_NODE="2")
    run_dir = cluster.run_dir(job_id)
    deadline = time.monotonic() + 120
    while not (run_dir / "config.toml").exists():  # rank 0 writes it as training starts
        assert cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), cluster.log(job_id)[-4000:]
        assert time.monotonic() < deadline, f"training did not start\n{cluster.log(job_id)}"
        time.sleep(0.1)
    # What --signal=B:USR1@300 does near the time limit.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=cluster.env, check=True, timeout=30)
    deadline = time.monotonic() + 120
    pending_since = None
    # Requeued (Restarts=1, then COMPLETING and PENDING on the way) and running again.
    while (info := cluster.job(job_id))["Restarts"] == "0" or info["JobState"] not in ("RUNNING", *FINAL):
        assert info["JobState"] not in FINAL, f"{info['JobState']} without a requeue\n{cluster.log(job_id)}"
        assert time.monotonic() < deadline, f"not requeued and restarted\n{cluster.log(job_id)}"
        if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
            # SLURM holds a requeued job about 2 minutes (AuthInfo cred_expire); skip the wait, though not
            # within the requeue's second: slurmd still takes that second's credential as revoked and the
            # job fails ("Job credential revoked").
            pending_since = pending_since or time.monotonic()
            if time.monotonic() - pending_since > 2:
                cluster.scontrol("update", f"JobId={job_id}", "StartTime=now", check=False)
        time.sleep(0.2)
    info = cluster.wait_state(job_id, FINAL, timeout=180)
    out = cluster.log(job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-4000:]
    assert info["Restarts"] == "1", out[-4000:]
    stopped = re.findall(r"stopping on signal at step (\d+), checkpoint saved", out)
    assert len(stopped) == 1, out[-4000:]
    assert f"resumed from {run_dir}/checkpoints/step-{int(stopped[0]):010d}.pt" in out, out[-4000:]
    assert "User defined signal" not in out and "terminate called" not in out
    # The same result as the uninterrupted job: the requeue lost and repeated nothing.
    ref = json.loads((cluster.run_dir(ref_id) / "metrics.json").read_text())
    got = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test_rmse", "test_mae", "best_val_rmse", "best_epoch", "epochs", "steps", "history", "world_size"):
        assert got[key] == ref[key], key

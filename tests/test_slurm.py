"""launch/slurm/train.sbatch run for real by bash, with stand-in srun/scontrol: 2 "nodes" on 127.0.0.1.

The stand-ins come first on PATH (the only way the script lets srun/scontrol be replaced). srun starts its
command once per node in the background with that node's SLURM_* variables and relays USR1 the way real
srun forwards signals to its tasks; scontrol resolves every host to 127.0.0.1 and records requeues.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mfscale import checkpoint, config, distributed
from mfscale.layout import deal_rows, train_counts
from mfscale.layout.rows import deal_users
from mfscale.shards import Dataset
from mfscale.train import Trainer, run

from .conftest import RESTART_ARGS, as_rank, free_port, spawn_ranks
from .test_train import OVERFIT, assert_exercises_best_weights, assert_same_run

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"

FAKE_SRUN = """#!{python}
# Stand-in srun: one task per node, all local; exit status is the worst task's, like srun's.
import os, signal, subprocess, sys

args = sys.argv[1:]
while args and args[0].startswith("-"):  # srun's own options
    args.pop(0)
with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
    f.write("srun " + " ".join(sys.argv[1:]) + "\\n")
nodes = int(os.environ["SLURM_NNODES"])
procs = [subprocess.Popen(args, env={{**os.environ, "SLURM_NODEID": str(n), "SLURM_PROCID": str(n),
                                      "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0"}})
         for n in range(nodes)]


def forward(signum, frame):  # like srun: a signal it gets goes to every task (here torchrun)
    with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
        f.write(f"srun forwarded signal {{signum}}\\n")
    for p in procs:
        p.send_signal(signum)


signal.signal(signal.SIGUSR1, forward)
codes = [p.wait() for p in procs]
sys.exit(max(c if c >= 0 else 128 - c for c in codes))
"""

FAKE_SQUEUE = """#!/bin/bash
# Stand-in squeue: the time left (%L) comes from FAKE_TIME_LEFT; unset means no time limit.
echo "${FAKE_TIME_LEFT:-UNLIMITED}"
"""

FAKE_SCONTROL = """#!/bin/bash
# Stand-in scontrol: every node is this machine; requeues are only recorded.
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
case "$1" in
    show) [[ $2 == hostnames ]] && printf '127.0.0.1\\n127.0.0.1\\n' ;;
    requeue) ;;
    *) exit 1 ;;
esac
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def slurm_env(tmp_path: Path, data: Path, job_id: str, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _executable(bin_dir / "srun", FAKE_SRUN.format(python=sys.executable))
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    _executable(bin_dir / "squeue", FAKE_SQUEUE)
    knobs = ("SLURM_", "RUN_DIR", "NPROC_PER_NODE", "MAX_RESTARTS", "SHUTDOWN_TIMEOUT")  # none leak in from outside
    env = {k: v for k, v in os.environ.items() if not k.startswith(knobs)}
    env.update(
        PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")]),
        SLURM_JOB_ID=job_id, SLURM_NNODES="2", SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_NAME="mftest",
        SLURM_SUBMIT_DIR=str(tmp_path), NPROC_PER_NODE="1", DATA=str(data), RDZV_PORT=str(free_port()),
        FAKE_SLURM_LOG=str(tmp_path / "slurm-calls.log"), OMP_NUM_THREADS="1", **extra,
    )
    return env


def sbatch(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SBATCH), *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_script_is_valid_bash_with_the_expected_directives():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    for directive in ("--nodes=", "--ntasks-per-node=1", "--signal=B:USR1@300", "--requeue", "--open-mode=append"):
        assert f"#SBATCH {directive}" in text, directive
    # A GPU request in the script makes sbatch fail on a CPU-only partition; GPUs are asked for at submit time.
    assert not re.search(r"^#SBATCH --(gpus|gres)", text, re.M)


def test_missing_data_is_one_clear_error(tmp_path, small_data):
    env = slurm_env(tmp_path, small_data, "7")
    del env["DATA"]
    proc = subprocess.run(["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "DATA is not set" in proc.stderr
    assert not (tmp_path / "slurm-calls.log").exists()  # failed before launching anything


@pytest.fixture(scope="module")
def two_jobs(small_data, tmp_path_factory) -> dict[str, dict]:
    """The 2-node jobs of test_two_node_job_trains ("trains") and test_usr1_during_startup_... ("startup"), side by
    side (most of either is its processes' start-up): the first started and left to run while the second is
    signalled during its start-up as its test says; each in a directory of its own (stand-ins, call log, run
    dir). Per job: its directory, environment, seconds, output, exit status and run dir."""
    jobs: dict[str, dict] = {}
    d = tmp_path_factory.mktemp("two-node-job")
    run_dir = d / "explicit-run"
    env = slurm_env(d, small_data, "4242", RUN_DIR=str(run_dir))
    t0 = time.monotonic()
    trains = sbatch(["--epochs", "2", "--workers", "0"], env, d)
    jobs["trains"] = {"dir": d, "env": env, "run_dir": run_dir}
    ended: dict[str, object] = {}

    def wait_trains() -> None:  # read its output as it comes (a full pipe would stop it)
        try:
            ended["out"] = trains.communicate(timeout=120)[0]
        finally:
            ended["seconds"] = time.monotonic() - t0

    waiter = threading.Thread(target=wait_trains)
    waiter.start()
    try:
        job_id = "5252"
        d = tmp_path_factory.mktemp("startup-signal")
        env = slurm_env(d, small_data, job_id)
        jobs["startup"] = {"dir": d, "env": env, "run_dir": d / "runs" / f"mftest-{job_id}", "job_id": job_id}
        # Epochs enough that the signal lands mid-training: the ranks stop at their next sync point (a sub-epoch's
        # end under blocks), and 3 epochs of this tiny set could end first.
        proc = sbatch(["--epochs", "50", "--workers", "0", "--batch-size", "16", "--train.patience", "0"], env, d)
        try:
            deadline = time.monotonic() + 30
            log = d / "slurm-calls.log"
            while not (log.exists() and "srun " in log.read_text()):  # srun started: torchrun is importing
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.01)
            proc.send_signal(signal.SIGUSR1)
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        jobs["startup"].update(out=out, returncode=proc.returncode)
        waiter.join(max(1.0, t0 + 125 - time.monotonic()))
        assert "out" in ended, "the 2-node job did not end in 120 s"
        jobs["trains"].update(out=ended["out"], returncode=trains.returncode, seconds=ended["seconds"])
    finally:
        if trains.poll() is None:
            trains.kill()
        waiter.join()
    return jobs


def test_two_node_job_trains(two_jobs):
    """(The job: the two_jobs fixture.)"""
    job = two_jobs["trains"]
    tmp_path, env, run_dir, out = job["dir"], job["env"], job["run_dir"], job["out"]
    assert job["returncode"] == 0, out[-4000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["epochs"] == 2 and m["test_rmse"] is not None
    calls = (tmp_path / "slurm-calls.log").read_text()
    assert "scontrol show hostnames node[1-2]" in calls
    assert "--nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d" in calls
    assert f"--rdzv-endpoint=127.0.0.1:{env['RDZV_PORT']} --rdzv-id=4242" in calls
    assert "requeue" not in calls
    print(f"2-node job: {job['seconds']:.1f} s")


def test_usr1_checkpoints_requeues_and_the_requeued_job_resumes(small_data, tmp_path, reference_run):
    job_id = "5151"
    env = slurm_env(tmp_path, small_data, job_id)  # RUN_DIR derived from job name and id
    run_dir = tmp_path / "runs" / f"mftest-{job_id}"
    args = RESTART_ARGS
    proc = sbatch(args, env, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not checkpoint.list_checkpoints(run_dir):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        t_signal = time.monotonic()
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does near the time limit
        out, _ = proc.communicate(timeout=60)
        stop_s = time.monotonic() - t_signal
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    calls = (tmp_path / "slurm-calls.log").read_text()
    assert f"scontrol requeue {job_id}" in calls, out[-4000:]
    assert "srun forwarded signal 10" in calls
    stopped = re.findall(r"stopping on signal at step (\d+), checkpoint saved", out)
    assert len(stopped) == 1, out[-4000:]  # rank 0 narrates
    step = int(stopped[0])
    assert checkpoint.step_path(run_dir, step).is_file()
    assert not (run_dir / "metrics.json").exists()
    print(f"signal to exit: {stop_s:.1f} s")

    # The requeued job: same job id, so the same run directory; it resumes where the signal stopped it.
    proc = sbatch(args, {**env, "RDZV_PORT": str(free_port())}, tmp_path)
    out2, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out2[-4000:]
    assert re.search(r"resumed from \S+ at epoch \d+ step \d+", out2), out2[-4000:]
    assert f"step-{step:010d}.pt" in out2.split("resumed from", 1)[1].splitlines()[0]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["epochs"] == 6
    assert (tmp_path / "slurm-calls.log").read_text().count("scontrol requeue") == 1
    # Stopped and requeued, the job ends exactly where an uninterrupted one does.
    ref_dir, ref_metrics, _ = reference_run
    assert_same_run(ref_dir, run_dir, ref_metrics, m)


def job(data: Path, run_dir: Path, **changes) -> config.JobConfig:
    cfg = config.JobConfig()
    cfg.data.path, cfg.run_dir, cfg.data.workers = str(data), str(run_dir), 0
    return config.replace(cfg, **changes).validate()


@pytest.mark.parametrize("where, step", [("mid_epoch", "fused"), ("epoch_end", "autograd_dropout")])
def test_signal_stop_then_resume_equals_uninterrupted(small_data, tmp_path, monkeypatch, where, step):
    changes = dict(OVERFIT)
    if step == "autograd_dropout":
        changes["model__dropout"] = 0.1
    full = run(job(small_data, tmp_path / "full", **changes))
    spe = full["steps"] // full["epochs"]
    # No step checkpoints are configured: the stop must write its own. At an epoch's last step it is
    # written before validation, and the resumed run validates that epoch first.
    stop_at = 2 * spe + 7 if where == "mid_epoch" else 3 * spe
    assert_exercises_best_weights(full, stop_at)
    original = Trainer.train_step

    def signalled(self, batch):
        if self.progress.global_step == stop_at - 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", signalled)
    stopped = run(job(small_data, tmp_path / "resumed", **changes))
    assert stopped["stopped_on_signal"] and stopped["steps"] == stop_at
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    assert checkpoint.step_path(tmp_path / "resumed", stop_at).is_file()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored after run()
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = run(job(small_data, tmp_path / "resumed", **changes))
    assert_same_run(tmp_path / "full", tmp_path / "resumed", full, resumed)


def test_sigterm_also_stops_cleanly(small_data, tmp_path, monkeypatch):
    original = Trainer.train_step

    def signalled(self, batch):
        if self.progress.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", signalled)
    stopped = run(job(small_data, tmp_path / "r", train__epochs=2, train__batch_size=512))
    assert stopped == {"stopped_on_signal": True, "steps": 4, "world_size": 1}  # one process: checks every step
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _signalled_rank(rank: int, port: int, cfg_dict: dict, out: str) -> None:
    as_rank(rank, 2, port)
    original = Trainer.train_step

    def signalled(self, batch):
        if self.env.rank == 1 and self.progress.global_step == 5:  # only rank 1 is told to stop
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, batch)

    Trainer.train_step = signalled
    result = run(config.from_dict(cfg_dict))
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_ranks_agree_to_stop_at_the_same_step(small_data, tmp_path):
    cfg = job(small_data, tmp_path / "r", train__epochs=2, train__batch_size=64)
    assert spawn_ranks(_signalled_rank, 2, (free_port(), cfg.to_dict(), str(tmp_path)), 60, method="fork") == [0, 0]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # Both stop together at the first sync point after the signal: under blocks (2 ranks' default), the end of
    # the first sub-epoch, whose steps are its larger stratum over the batch size (the vote is no per-step
    # collective).
    data = Dataset(small_data)
    train = data.read_split("train")
    counts = train_counts(data)
    blocks = [deal_users(data, counts[0], 2)[0], deal_rows(counts[1], 2)]
    strata = np.zeros((2, 2), dtype=np.int64)
    np.add.at(strata, (blocks[0][train["user"]], blocks[1][train["item"]]), 1)
    first_sub_epoch = -(-max(strata[0, 0], strata[1, 1]) // 64)
    assert first_sub_epoch > 6  # the signal comes at step 6
    assert results[0] == results[1] == {"stopped_on_signal": True, "steps": int(first_sub_epoch), "world_size": 2}
    assert checkpoint.step_path(tmp_path / "r", int(first_sub_epoch)).is_file()


def test_threads_per_process_default_to_the_tasks_cpus(tmp_path, small_data):
    """Without OMP_NUM_THREADS, each training process gets the task's CPUs / processes per node (torchrun
    alone would give 1, leaving a CPU-only node on one core)."""
    env = slurm_env(tmp_path, small_data, "99", SLURM_CPUS_PER_TASK="8")
    env["NPROC_PER_NODE"] = "2"
    del env["OMP_NUM_THREADS"]
    _executable(tmp_path / "bin" / "srun",  # records what the training processes would get, runs nothing
                '#!/bin/bash\necho "srun OMP_NUM_THREADS=$OMP_NUM_THREADS" >> "$FAKE_SLURM_LOG"\n')
    proc = subprocess.run(["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "srun OMP_NUM_THREADS=4" in (tmp_path / "slurm-calls.log").read_text()
    assert "x 4 thread(s)" in proc.stdout
    assert "warning" not in proc.stderr


def _record_srun(tmp_path: Path) -> None:
    """An srun that records its arguments and runs nothing."""
    _executable(tmp_path / "bin" / "srun", '#!/bin/bash\necho "srun $*" >> "$FAKE_SLURM_LOG"\n')


def test_srun_gets_the_tasks_cpus(tmp_path, small_data):
    """srun does not inherit --cpus-per-task (SLURM 22.05+): without it the step may be bound to one CPU."""
    env = slurm_env(tmp_path, small_data, "98", SLURM_CPUS_PER_TASK="6")
    _record_srun(tmp_path)
    proc = subprocess.run(["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "srun --kill-on-bad-exit=1 --cpus-per-task=6 torchrun" in (tmp_path / "slurm-calls.log").read_text()


def test_one_cpu_without_gpus_is_warned_about(tmp_path, small_data):
    env = slurm_env(tmp_path, small_data, "97", SLURM_CPUS_PER_TASK="1")
    _record_srun(tmp_path)
    proc = subprocess.run(["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "this task has 1 CPU and no GPU" in proc.stderr and "--cpus-per-task=N" in proc.stderr
    # With a GPU the process does not compute on the CPU: no warning.
    env["SLURM_GPUS_ON_NODE"] = "1"
    proc = subprocess.run(["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(("time_left", "warned"), [("4:50", True), ("6:00", True), ("6:01", False),
                                                     ("1:00:00", False), ("1-00:00:00", False),
                                                     ("UNLIMITED", False)])
def test_a_short_time_limit_is_warned_about(tmp_path, small_data, time_left, warned):
    """With 6 minutes or less left, the default B:USR1@300 (sent up to 60 s early) would stop every run at once."""
    env = slurm_env(tmp_path, small_data, "96", FAKE_TIME_LEFT=time_left)
    _record_srun(tmp_path)
    proc = subprocess.run(["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ("--signal=B:USR1@60" in proc.stderr) == warned, proc.stderr


def test_usr1_during_startup_waits_for_training_then_stops_cleanly(two_jobs):
    """A USR1 before torchrun and the workers have set their handlers would kill them; the script holds it back
    until training has started (rank 0 wrote config.toml), then relays it: a normal checkpoint-and-requeue. (The
    job, signalled as soon as srun started: the two_jobs fixture.)"""
    job = two_jobs["startup"]
    tmp_path, run_dir, job_id, out = job["dir"], job["run_dir"], job["job_id"], job["out"]
    assert job["returncode"] == 0, out[-4000:]
    calls = (tmp_path / "slurm-calls.log").read_text()
    assert calls.count("srun forwarded signal 10") == 1 and f"scontrol requeue {job_id}" in calls, out[-4000:]
    # Relayed once training ran (the script checks every second): every rank had its handler and all stopped
    # together at a step boundary with a checkpoint, instead of torchrun dying of the signal.
    stopped = re.findall(r"stopping on signal at step (\d+), checkpoint saved", out)
    assert len(stopped) == 1, out[-4000:]
    assert checkpoint.step_path(run_dir, int(stopped[0])).is_file()
    assert not (run_dir / "metrics.json").exists()
    assert "SignalException" in out  # the signalled torchrun's own exit, expected (launch/README.md)
    assert "exitcode: -10" not in out and "srun exited with 138" not in out, out[-4000:]


def test_idle_wait_sees_a_thread_still_at_work():
    """destroy() waits for this rank's threads to go idle before the interpreter shuts down (a gloo worker
    still releasing a collective's tensors then aborted the process); a thread computing outside the GIL
    counts as busy."""
    assert distributed.wait_for_idle_threads(timeout_s=5)
    data = bytes(256 << 20)
    worker = threading.Thread(target=lambda: hashlib.sha256(data).digest())  # hashlib releases the GIL
    worker.start()
    try:
        assert not distributed.wait_for_idle_threads(timeout_s=0.05)
    finally:
        worker.join()
    assert distributed.wait_for_idle_threads(timeout_s=5)

"""Smoke tests of the benchmark scripts: throughput.py, profile_step.py, gpu_summary.py, op_variants.py,
verify_cost.py, peers.py.

Speed is measured by the script, never asserted here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
FIELDS = ("ratings_per_s", "ratings_per_s_per_rank", "p50_step_ms", "p90_step_ms", "data_wait_pct", "device",
          "torch", "git_commit", "config")


def _run_in_turn(cmds: list[tuple[list[str], dict]]) -> list[tuple[subprocess.CompletedProcess, float]]:
    """Each (command, subprocess.run keywords) in turn: its result and how many seconds it took."""
    done = []
    for cmd, kw in cmds:
        t0 = time.monotonic()
        done.append((subprocess.run(cmd, capture_output=True, text=True, **kw), time.monotonic() - t0))
    return done


def _peers_attempts(small_data: Path, directory: Path, plot: bool) -> list[tuple[subprocess.CompletedProcess, float]]:
    """test_peers_smoke's run of peers.py (attempt k in directory/try{k}): once more, fresh, when LIBMF hung."""
    # LIBMF's hang (cjlin1/libmf#12) also came once with 1 thread (session 11's CI): peers.py stops a peer that
    # has not finished in --peer-timeout s with its one-line error, and a run stopped so is tried once more, fresh
    done = []
    for attempt in range(2):
        out, md = directory / f"try{attempt}" / "peers.jsonl", directory / f"try{attempt}" / "peers.md"
        out.parent.mkdir()
        done += _run_in_turn([([sys.executable, str(PEERS), "--data", str(small_data), "--epochs", "2", "--dim", "8",
                                "--repeat", "2", "--threads", "1", "--peer-timeout", "60", "--out-jsonl", str(out),
                                *(["--out-md", str(md)] if plot else [])], {"timeout": 240})])
        if "peers.py: libmf did not finish" not in done[-1][0].stderr:
            break
    return done


@pytest.fixture(scope="module")
def smokes(small_data, tmp_path_factory):
    """The script runs of the smoke tests below, started with the module and run as many at a time as there are
    cores (each is mostly one process on one core, most of it Python's and torch's start-up): per test, its
    directory and a future of its commands' results, in order, each with its seconds. A test waits for its own."""
    base = tmp_path_factory.mktemp("smokes")
    bench = SCRIPT.parent
    jobs: dict[str, list[tuple[list[str], dict]]] = {}
    if _matplotlib_missing() is None and _peers_importable() is not None:  # else test_peers_plot skips
        jobs["peers_plot"] = [([sys.executable, str(PEERS), "--data", str(small_data), "--trainers", "mfscale",
                                "--epochs", "1", "--dim", "8", "--repeat", "2", "--threads", "1", "--out-md",
                                str(base / "peers_plot" / "peers.md")], {"timeout": 180})]
    jobs["throughput"] = [([sys.executable, str(SCRIPT), "--data", str(small_data), "--modes", "input,step,e2e",
                            "--steps", "3", "--warmup-steps", "1", "--batch-sizes", "512", "--dims", "8",
                            "--baseline-steps", "5", "--baseline-warmup-steps", "1", "--device", "cpu", "--variants",
                            "sparse_adam,sgd,no_such_variant", "--out-jsonl", str(base / "throughput" / "r.jsonl"),
                            "--out-md", str(base / "throughput" / "r.md")], {"timeout": 120})]
    jobs["op_variants"] = [([sys.executable, str(bench / "op_variants.py"), "--data", str(small_data), "--passes",
                             "2", "--batches", "3", "--warmup", "1"], {"timeout": 120}),
                           ([sys.executable, str(bench / "op_variants.py"), "--data", str(small_data),
                             str(base / "op_variants" / "bogus.cpp")], {"timeout": 60})]
    jobs["step_ab"] = [([sys.executable, str(bench / "step_ab.py"), "--data", str(small_data), "--steps", "4",
                         "--warmup", "1", "--workdir", str(base / "step_ab"), "--variant", "base=", "--variant",
                         "time=--model.time_bins 3 --model.user_drift on --model.implicit on"], {"timeout": 120})]
    jobs["profile"] = [([sys.executable, str(bench / "profile_step.py"), "--data", str(small_data), "--device",
                         "cpu", "--steps", "1", "--warmup-steps", "1", "--dim", "8", "--out",
                         str(base / "profile" / "profile.txt")], {"timeout": 120}),
                       ([sys.executable, str(bench / "gpu_summary.py"), str(base / "profile")], {"timeout": 60})]
    jobs["verify_cost"] = [([sys.executable, str(bench / "verify_cost.py"), "--data",
                             str(base / "verify_cost" / "data"), "--reps", "1", "--run-dir",
                             str(base / "verify_cost" / "run"), "--out-jsonl", str(base / "verify_cost" / "v.jsonl")],
                            {"timeout": 120})]
    fake = base / "peer_timeout" / "libmf"  # a libmf whose fit never returns
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}
    jobs["peer_timeout"] = [([sys.executable, str(PEERS), "--data", str(small_data), "--trainers", "libmf",
                              "--peer-timeout", "1"], {"timeout": 120, "env": env})]
    for name in jobs:
        (base / name).mkdir()
    (base / "op_variants" / "bogus.cpp").write_text("int main() { return 0; }\n")
    # verify_cost.py removes and rewrites the dataset's .verified.json: a copy
    shutil.copytree(small_data, base / "verify_cost" / "data")
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "mf.py").write_text("import time\n\n\nclass MF:\n    def __init__(self, **kw):\n        pass\n\n"
                                "    def fit(self, x):\n        time.sleep(600)\n")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {}
        if _peers_importable() is None:  # else test_peers_smoke skips; the longest job: first
            (base / "peers").mkdir()
            futures["peers"] = (base / "peers", pool.submit(_peers_attempts, small_data, base / "peers",
                                                            _matplotlib_missing() is None))
        futures.update({name: (base / name, pool.submit(_run_in_turn, cmds)) for name, cmds in jobs.items()})
        yield futures


def smoke(smokes: dict[str, tuple[Path, Future]], name: str) -> tuple[Path, list[subprocess.CompletedProcess]]:
    """Test ``name``'s directory and its commands' results (the smokes fixture)."""
    directory, future = smokes[name]
    return directory, [proc for proc, _ in future.result()]


def test_throughput_smoke(smokes):
    directory, (proc,) = smoke(smokes, "throughput")
    out, md = directory / "r.jsonl", directory / "r.md"
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    runs = [x for x in lines if x["kind"] == "mfscale"]
    assert sorted(x["config"]["bench"]["mode"] for x in runs) == ["e2e", "e2e", "input", "step", "step"]
    for x in lines:
        for f in FIELDS:
            assert f in x, (f, x)
        assert x["ratings_per_s"] > 0
    for x in runs:
        assert len(x["ratings_per_s_per_rank"]) == 1 and x["ratings_per_s_per_rank"][0] > 0
        assert x["p90_step_ms"] >= x["p50_step_ms"] > 0
        assert (x["data_wait_pct"] is not None) == (x["config"]["bench"]["mode"] == "e2e")
        if x["config"]["bench"]["mode"] != "input":
            assert x["config"]["job"]["train"]["batch_size"] == 512 and x["config"]["job"]["model"]["dim"] == 8
            assert x["speedup_vs_notebook"] > 0 and x["speedup_vs_plain_sparse_adam"] > 0
    baselines = {x["baseline"] for x in lines if x["kind"] == "baseline"}
    assert baselines == {"notebook", "plain_sparse_adam"}
    table = md.read_text()
    assert "| e2e | 1 | 512 | 8 | sparse_adam | fp32 |" in table and "no_such_variant" in table
    assert "| step | 1 | 512 | 8 | sgd | fp32 |" in table  # --optim.optimizer sgd's op
    assert "| notebook | 128 | 8 |" in table and proc.stdout.count("| plain_sparse_adam |") == 1


def test_profile_step_and_gpu_summary_smoke(smokes):
    """The GPU check's helpers on the CPU: the profiler table of a step, and the summary of a work directory
    (here one holding only a profile: every other section says what is missing instead of failing)."""
    directory, (proc, summary) = smoke(smokes, "profile")
    out = directory / "profile.txt"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_text().startswith("profile: 1 steps") and "train_step" in out.read_text()
    proc = summary
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== targets" in proc.stdout and "no results" in proc.stdout and "train_step" in proc.stdout


def test_op_variants_smoke(smokes):
    """op_variants.py with no variant times the job's own op (nothing to build); a file that is not a copy of the
    op is one line before any start-up. Building a variant is what a real run adds (about half a minute)."""
    _, (proc, bogus) = smoke(smokes, "op_variants")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| baseline (this checkout) |" in proc.stdout and "1.000x" in proc.stdout
    proc = bogus  # bogus.cpp: int main() { return 0; }
    assert proc.returncode != 0 and "is not a copy of mfscale/csrc/fused_step.cpp" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_step_ab_smoke(smokes):
    """step_ab.py interleaves two configs' steps and prints each one's ratings/s against the first's."""
    _, (proc,) = smoke(smokes, "step_ab")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| base |" in proc.stdout and "1.00x |" in proc.stdout and "| time |" in proc.stdout


def test_verify_cost_smoke(smokes):
    directory, (proc,) = smoke(smokes, "verify_cost")  # on a copy of small_data: the script rewrites its verdicts
    out = directory / "v.jsonl"
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(out.read_text())
    assert list(row["checks_s"]) == ["sizes+footers", "sha256, first run", "sha256, shared by 2",
                                     "auto, verified before"]
    assert row["epoch_s"] > 0 and row["ratings"] > 0 and all(v > 0 for v in row["checks_s"].values())
    assert "| sha256, first run |" in proc.stdout


PEERS = SCRIPT.parent / "peers.py"


def _peers_importable() -> str | None:
    """None when libmf and cornac import, else why not (CI installs only the test extra)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # libmf prints where it found its library
            import cornac.models  # noqa: F401
            import libmf.mf  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"libmf/cornac not importable ({exc}); install the bench extra: pip install -e '.[bench]'"
    return None


def test_peers_smoke(smokes):
    """benchmarks/peers.py end to end on 12,000 ratings: two rounds of three rows on one split, clipped RMSEs,
    the ratio within each round, and the medians. One thread: LIBMF's scheduler can leave its threads waiting
    forever (cjlin1/libmf#12), which on 9,600 ratings spread over 26 x 26 blocks happened in about 1 run of 6.
    (The run, tried once more where LIBMF hung: the smokes fixture, _peers_attempts.)"""
    reason = _peers_importable()
    if reason:
        pytest.skip(reason)
    plot = _matplotlib_missing() is None  # then also test_peers_plot's checks, on this run's three trainers
    directory, attempts = smoke(smokes, "peers")
    proc = attempts[-1]
    out, md = (directory / f"try{len(attempts) - 1}" / name for name in ("peers.jsonl", "peers.md"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    if plot:
        assert_peers_plot(proc, md)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["round"], r["trainer"]) for r in lines) == [
        (rnd, t) for rnd in (1, 2) for t in ("cornac", "libmf", "mfscale")]
    assert len({r["run_id"] for r in lines}) == 1 and all(r["repeat"] == 2 for r in lines)
    # each round has its own fresh mfscale run: a shared run dir would resume the finished run, train nothing
    # and report the first round's restored timing again, bit for bit
    assert all(r["epochs"] >= 1 for r in lines)
    assert len({r["train_ratings_per_s"] for r in lines if r["trainer"] == "mfscale"}) == 2
    for rnd in (1, 2):
        ratios = [r["vs_fastest_peer"] for r in lines if r["round"] == rnd and r["trainer"] != "mfscale"]
        assert max(ratios) == 1.0
    assert "Medians over 2 rounds" in proc.stdout and "| mfscale | " in proc.stdout
    rows = {r["trainer"]: r for r in lines if r["round"] == 2}
    for r in rows.values():
        assert r["train_ratings_per_s"] > 0 and r["train_s"] > 0 and r["wall_s"] > 0
        assert 0 < r["test_rmse"] < 2, r  # clipped to 0.5-5
        assert r["n_train"] == 9600 and r["dim"] == 8
    assert rows["libmf"]["epochs"] == rows["cornac"]["epochs"] == 2 and 1 <= rows["mfscale"]["epochs"] <= 2
    assert max(rows["libmf"]["vs_fastest_peer"], rows["cornac"]["vs_fastest_peer"]) == 1.0
    assert rows["libmf"]["biases"] is False and "nr_iters=2" in rows["libmf"]["command"]
    # every lambda passed: the binding's own defaults (L1 0.04, L2 0) are not LIBMF's
    assert "lambda_p1=0.0, lambda_q1=0.0, lambda_p2=0.05, lambda_q2=0.05, eta=0.1" in rows["libmf"]["command"]
    assert "seed=None" in rows["cornac"]["command"] and "--train.ranking_k 0" in rows["mfscale"]["command"]
    assert "| libmf 0.9.2 |" in proc.stdout and "| cornac 3.0.1 |" in proc.stdout and "| mfscale " in proc.stdout


def without_module(tmp_path: Path, name: str) -> dict[str, str]:
    """An environment in which importing ``name`` fails (a package of that name raising ImportError first)."""
    fake = tmp_path / name
    fake.mkdir()
    (fake / "__init__.py").write_text(f"raise ImportError('No module named {name}')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}


def peers_refusal(small_data: Path, trainers: str, env: dict[str, str]) -> list[str]:
    """peers.py refusing to start: non-zero exit, nothing on stdout; its stderr lines."""
    proc = subprocess.run([sys.executable, str(PEERS), "--data", str(small_data), "--trainers", trainers],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0 and proc.stdout == ""
    return proc.stderr.strip().splitlines()


def test_peers_without_the_extra(small_data, tmp_path):
    """Without libmf: one line naming the pip command, before any training."""
    lines = peers_refusal(small_data, "mfscale,libmf", without_module(tmp_path, "libmf"))
    assert len(lines) == 1 and "missing libmf" in lines[0] and "pip install -e '.[bench]'" in lines[0], lines


def test_peers_stops_a_peer_that_never_returns(smokes):
    """LIBMF's scheduler can hang (cjlin1/libmf#12): --peer-timeout ends the run with one line, not never. (The
    smokes fixture's libmf sleeps 600 s in fit.)"""
    ((proc, seconds),) = smokes["peer_timeout"][1].result()
    assert proc.returncode != 0 and seconds < 60
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("peers.py: libmf did not finish in 1 s") and "cjlin1/libmf#12" in last, proc.stderr


def _spark_usable() -> str | None:
    """None when pyspark imports and a java runs, else why not (CI installs neither the spark extra nor Java)."""
    try:
        import pyspark.ml.recommendation  # noqa: F401
    except ImportError as exc:
        return f"pyspark not importable ({exc}); install the spark extra: pip install -e '.[spark]'"
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        return f"no Java for pyspark ({'JAVA_HOME=' + home if home else 'no java on PATH'}); apt-get install " \
               "openjdk-17-jre-headless"
    return None


def test_peers_spark_smoke(small_data, tmp_path):
    """Spark ALS as a peer on 9,600 ratings: local[1], its JVM started and stopped in the peer's child process,
    nothing of Spark's on stdout (the markdown table), fit time without the JVM's start, a clipped RMSE."""
    reason = _spark_usable()
    if reason:
        pytest.skip(reason)
    out, md = tmp_path / "peers.jsonl", tmp_path / "peers.md"
    proc = subprocess.run([sys.executable, str(PEERS), "--data", str(small_data), "--trainers", "spark",
                           "--epochs", "2", "--dim", "8", "--threads", "1", "--spark-driver-memory", "1g",
                           "--out-jsonl", str(out), "--out-md", str(md), "--out-png", "none"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert r["trainer"] == "spark" and r["epochs"] == 2 and r["biases"] is False and r["n_train"] == 9600
    assert r["train_ratings_per_s"] > 0 and 0 < r["train_s"] < r["wall_s"] and r["jvm_start_s"] > 0
    assert r["train_ratings_per_s"] == pytest.approx(9600 * 2 / r["train_s"])
    assert 0 < r["test_rmse"] < 2, r  # clipped to 0.5-5; on this rank-3 data ALS lands near 0.7
    assert "rank=8, maxIter=2, regParam=0.05" in r["command"] and "coldStartStrategy='nan'" in r["command"]
    assert r["version"].startswith("pyspark ") and "Java " in r["version"] and "local[1]" in r["model"]
    assert proc.stdout == md.read_text() and proc.stdout.startswith("### Spark ALS: ")
    assert all(line == "" or line.startswith(("#", "|", "Machine:", "train s:", "Commands:", "- "))
               for line in proc.stdout.splitlines()), proc.stdout  # no Spark log line in the table
    assert not (tmp_path / "none").exists()


def test_peers_spark_without_the_extra(small_data, tmp_path):
    """Without pyspark, or without Java: one line naming what to install, before any training."""
    lines = peers_refusal(small_data, "mfscale,spark", without_module(tmp_path, "pyspark"))
    assert len(lines) == 1 and "missing pyspark" in lines[0] and "pip install -e '.[spark]'" in lines[0], lines
    if importlib.util.find_spec("pyspark") is None:
        return  # the Java check below comes only after pyspark imports
    lines = peers_refusal(small_data, "spark", {**os.environ, "JAVA_HOME": str(tmp_path / "no-jdk")})
    assert len(lines) == 1 and "needs Java 17" in lines[0] and "openjdk-17-jre-headless" in lines[0], lines


def _matplotlib_missing() -> str | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return f"matplotlib not importable ({exc}); install the bench extra: pip install -e '.[bench]'"
    return None


def assert_peers_plot(proc: subprocess.CompletedProcess, md: Path) -> None:
    """--out-md wrote the printed tables and, beside them, a PNG of the two rounds' medians."""
    assert md.read_text() == proc.stdout and "Medians over 2 rounds" in proc.stdout
    png = md.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_peers_plot(smokes):
    """--out-md writes the printed tables and, beside them, a PNG of ratings/s and RMSE per trainer (here
    mfscale alone, two rounds: medians with min-max whiskers), so it runs without the peers' extras. Where
    they are installed, test_peers_smoke passes --out-md and makes these checks on its run of all three."""
    reason = _matplotlib_missing()
    if reason:
        pytest.skip(reason)
    if _peers_importable() is None:
        pytest.skip("checked by test_peers_smoke, whose run draws the plot (libmf and cornac are installed)")
    directory, (proc,) = smoke(smokes, "peers_plot")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_peers_plot(proc, directory / "peers.md")

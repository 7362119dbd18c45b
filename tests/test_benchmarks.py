"""Smoke test of benchmarks/throughput.py: it runs, writes complete JSON lines and the baselines.

Speed is measured by the script, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
FIELDS = ("ratings_per_s", "ratings_per_s_per_rank", "p50_step_ms", "p90_step_ms", "data_wait_pct", "device",
          "torch", "git_commit", "config")


def test_throughput_smoke(small_data, tmp_path):
    out, md = tmp_path / "r.jsonl", tmp_path / "r.md"
    cmd = [sys.executable, str(SCRIPT), "--data", str(small_data), "--modes", "input,step,e2e", "--steps", "3",
           "--warmup-steps", "1", "--batch-sizes", "512", "--dims", "8", "--baseline-steps", "5",
           "--baseline-warmup-steps", "1", "--device", "cpu", "--variants", "sparse_adam,no_such_variant",
           "--out-jsonl", str(out), "--out-md", str(md)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    runs = [x for x in lines if x["kind"] == "mfscale"]
    assert sorted(x["config"]["bench"]["mode"] for x in runs) == ["e2e", "input", "step"]
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
    assert "| notebook | 128 | 8 |" in table and proc.stdout.count("| plain_sparse_adam |") == 1


def test_profile_step_and_gpu_summary_smoke(small_data, tmp_path):
    """The GPU check's helpers on the CPU: the profiler table of a step, and the summary of a work directory
    (here one holding only a profile: every other section says what is missing instead of failing)."""
    bench = SCRIPT.parent
    out = tmp_path / "profile.txt"
    proc = subprocess.run([sys.executable, str(bench / "profile_step.py"), "--data", str(small_data), "--device",
                           "cpu", "--steps", "1", "--warmup-steps", "1", "--dim", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_text().startswith("profile: 1 steps") and "train_step" in out.read_text()
    proc = subprocess.run([sys.executable, str(bench / "gpu_summary.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== targets" in proc.stdout and "no results" in proc.stdout and "train_step" in proc.stdout

"""The short report of benchmarks/gpu_check.sh, read from its work directory (standard library only, so it
runs in a second even when torch is broken): stages, CUDA tests, the throughput table with the bandwidth
fraction, the full job against the issue's targets, mixed precision against fp32, the profile's top rows.

    python benchmarks/gpu_summary.py /tmp/gpu_check
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

TARGET_RATINGS_PER_S = 200e6  # e2e, d=64, ML-32M-sized data (issue 11)
TARGET_JOB_WALL_S = 60.0  # the full 20-epoch default job, evaluation included
DATASHEET_GBS = 4800.0  # H200; throughput.py runs with --bandwidth-gbs 4800


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_float(path: Path) -> float | None:
    try:
        return float(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def stages(work: Path) -> list[str]:
    try:
        rows = [line.split("\t") for line in (work / "stages.tsv").read_text().splitlines() if line]
    except OSError:
        return ["(no stage ran)"]
    return [f"  {r[0]:<11} {r[1]:<24} {r[2]:>4} s" for r in rows if len(r) == 3]


def env_lines(work: Path) -> list[str]:
    try:
        text = (work / "logs" / "env.log").read_text().splitlines()
    except OSError:
        return []
    keys = ("python ", "torch ", "triton ", "polars ", "numpy ", "device ", "copy bandwidth", "cuda available")
    return ["  " + line for line in text if line.startswith(keys) or " MISSING" in line]


def tests(work: Path) -> list[str]:
    try:
        root = ET.parse(work / "pytest-cuda.xml").getroot()
    except (OSError, ET.ParseError):
        return ["  no report (stage not run, or pytest did not finish)"]
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return ["  empty report"]
    a = suite.attrib
    out = [f"  {a.get('tests')} tests: {a.get('failures')} failed, {a.get('errors')} errors, "
           f"{a.get('skipped')} skipped, {float(a.get('time', 0)):.0f} s"]
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            bad = case.find(kind)
            if bad is not None:
                msg = (bad.attrib.get("message") or "").splitlines()
                out.append(f"  {kind.upper()} {case.attrib.get('name')}: {msg[0][:200] if msg else ''}")
    return out


def _m(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e6:,.1f}M"


def throughput(work: Path, copy_gbs: float | None) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        lines = [json.loads(x) for x in (work / "throughput.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return ["  no results"], []
    recs = [r for r in lines if r.get("kind") == "mfscale"]
    out = [f"  {'mode':<5} {'batch':>9} {'dim':>4} {'prec':<5} {'variant':<12} {'ratings/s':>10} {'p50 ms':>7} "
           f"{'GB/s':>6} {'of 4800':>8} {'of copy':>8}"]
    for r in recs:
        c = r["config"]["bench"]
        gbs = r.get("achieved_gbs_per_device")
        frac_copy = f"{100 * gbs / copy_gbs:.1f}%" if gbs and copy_gbs else "-"
        frac = f"{100 * r['bandwidth_fraction']:.1f}%" if r.get("bandwidth_fraction") is not None else "-"
        out.append(f"  {c['mode']:<5} {c['batch_size']:>9,} {c['dim']:>4} {c['precision']:<5} {c['variant']:<12} "
                   f"{_m(r['ratings_per_s']):>10} {r['p50_step_ms']:>7.2f} {gbs or 0:>6.0f} {frac:>8} {frac_copy:>8}")
    for b in (r for r in lines if r.get("kind") == "baseline"):
        cfg = b["config"]
        out.append(f"  baseline {b['baseline']}: {_m(b['ratings_per_s'])} ratings/s (batch {cfg['batch_size']:,}, "
                   f"dim {cfg['dim']})")
    return out, recs


def target_lines(recs: list[dict[str, Any]], job: dict[str, Any] | None, wall: float | None) -> list[str]:
    out = []
    e2e = [r for r in recs if r["config"]["bench"]["mode"] == "e2e" and r["config"]["bench"]["dim"] == 64
           and r["config"]["bench"]["precision"] == "fp32" and r["config"]["bench"]["variant"] == "fused"]
    if e2e:
        auto = min(e2e, key=lambda r: r["config"]["bench"]["batch_size"])  # the auto batch is the smallest swept
        rate = auto["ratings_per_s"]
        epoch = auto.get("n_train", 0) / rate if rate else float("inf")
        ok = "MET" if rate >= TARGET_RATINGS_PER_S else "MISSED"
        out.append(f"  e2e d=64 fp32 at the auto batch {auto['config']['bench']['batch_size']:,}: {_m(rate)} ratings/s "
                   f"(target 200M: {ok}); one epoch of {auto.get('n_train', 0):,} ratings {epoch:.3f} s")
        best = max(e2e, key=lambda r: r["ratings_per_s"])
        out.append(f"  best e2e d=64 fp32: {_m(best['ratings_per_s'])} at batch "
                   f"{best['config']['bench']['batch_size']:,}")
    if job:
        ok = "MET" if wall is not None and wall < TARGET_JOB_WALL_S else "MISSED"
        out.append(f"  full default job: wall {wall if wall is not None else '-'} s (target < 60 s: {ok}), "
                   f"train_ratings_per_s {_m(job.get('train_ratings_per_s'))}, test RMSE {job.get('test_rmse')}, "
                   f"epochs {job.get('epochs')}, best val RMSE {job.get('best_val_rmse')}, device {job.get('device')}")
    return out or ["  nothing measured"]


def mixed_precision(recs: list[dict[str, Any]], job: dict[str, Any] | None, bf16: dict[str, Any] | None,
                    bf16_wall: float | None) -> list[str]:
    out = []
    by_key = {(r["config"]["bench"]["mode"], r["config"]["bench"]["batch_size"], r["config"]["bench"]["dim"],
               r["config"]["bench"]["precision"]): r["ratings_per_s"] for r in recs}
    for (mode, batch, dim, prec), rate in sorted(by_key.items()):
        fp32 = by_key.get((mode, batch, dim, "fp32"))
        if prec == "bf16" and fp32:
            out.append(f"  {mode} batch {batch:,} d={dim}: bf16 {_m(rate)} vs fp32 {_m(fp32)} ({rate / fp32:.2f}x)")
    if bf16 and job and bf16.get("test_rmse") and job.get("test_rmse"):
        out.append(f"  job --precision bf16: test RMSE {bf16['test_rmse']:.4f} vs fp32 {job['test_rmse']:.4f} "
                   f"({bf16['test_rmse'] / job['test_rmse'] - 1:+.2%}), train_ratings_per_s "
                   f"{_m(bf16.get('train_ratings_per_s'))} vs {_m(job.get('train_ratings_per_s'))}, wall {bf16_wall} s")
    return out or ["  nothing measured"]


def profile(work: Path, rows: int = 22) -> list[str]:
    try:
        text = (work / "profile.txt").read_text().splitlines()
    except OSError:
        return ["  no profile"]
    return ["  " + line for line in text[:rows]]


def main(argv: list[str]) -> int:
    work = Path(argv[1] if len(argv) > 1 else "/tmp/gpu_check")
    copy_gbs = read_float(work / "copy_gbs.txt")
    job, bf16 = read_json(work / "job" / "metrics.json"), read_json(work / "job_bf16" / "metrics.json")
    table, recs = throughput(work, copy_gbs)
    sections = [
        ("stages", stages(work)),
        ("environment", env_lines(work)),
        ("CUDA tests (pytest -m cuda)", tests(work)),
        ("targets", target_lines(recs, job, read_float(work / "job_wall.txt"))),
        (f"throughput (bandwidth fraction of the {DATASHEET_GBS:,.0f} GB/s datasheet and of the measured copy "
         f"{copy_gbs or 0:,.0f} GB/s; bytes per rating as throughput.py's BYTES_FORMULA)", table),
        ("mixed precision", mixed_precision(recs, job, bf16, read_float(work / "job_bf16_wall.txt"))),
        ("profile (top rows)", profile(work)),
    ]
    for title, lines in sections:
        print(f"== {title}")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

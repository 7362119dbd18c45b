#!/usr/bin/env bash
# The GPU check (issue 11): one script for one device run of at most ~8 minutes; results under $OUT.
#
# On the GPU machine, from the repository root, after `bash benchmarks/gpu_wheels.sh` here:
#   device run: command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 540
# Here, a CPU dry run of every stage on tiny data (wrong flags and missing files show up before the device):
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh
#
# Stages, in order of priority, each under its own `timeout` (cap in seconds) and all inside an overall budget
# (GPU_CHECK_BUDGET_S, default 470 s); a failing or timed-out stage does not stop the later ones:
#   install 30    polars from the carried wheels (.whl/) into /tmp/site; the image has the rest
#   env 30        versions, nvidia-smi, a device-to-device copy bandwidth (the measured ceiling)
#   prepare 150   python -m mfscale.prepare --synthetic ml-32m (reused if there), in the background: CPU work
#   tests 120     pytest -m cuda tests/test_cuda.py, meanwhile on the GPU
#   throughput 120  benchmarks/throughput.py: e2e and step, fp32 and bf16, d 64 and 128, auto/262144/1048576
#   job 150       python -m mfscale.train --data <ml-32m> (the full default job): wall, ratings/s, test RMSE
#   profile 40    benchmarks/profile_step.py: torch profiler table of 5 fused steps
#   job_bf16 90   the same job with --precision bf16 (mixed precision's RMSE and speed effect)
#   baselines 60  throughput.py e2e fused vs sparse_adam, with the notebook and plain SparseAdam baselines
#   cpu_tests 90  a fast part of the CPU suite under the device's torch (2.11)
# GPU_CHECK_STAGES=tests,job (comma list) runs a subset, e.g. for a rerun after a fix; on a machine still warm
# the prepared data in $GPU_CHECK_WORK (default /tmp/gpu_check) is reused.
#
# $OUT gets at most 7 files (the device tool brings back 8): summary.txt (also printed last), gpu_check.log
# (all stages' output), throughput.jsonl, job_metrics.json, events.out.tfevents.job (the job's TensorBoard
# scalars), profile.txt, bundle.tgz (per-stage logs, throughput.md, the bf16 job's metrics, the pytest XML
# report, a Chrome trace of the profiled steps). They are refreshed after every stage, so a run cut short
# still returns what it finished.
set -u

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
DRY=${GPU_CHECK_DRY:-0}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
OUT=${OUT:-$WORK/out}
PY=${PYTHON:-python3}
STAGES=${GPU_CHECK_STAGES:-install,env,tests,prepare,throughput,job,profile,job_bf16,baselines,cpu_tests}
if [[ $DRY == 1 ]]; then
    # CPU, tiny data, few steps: the same commands and flags, not the same sizes. 2 shared cores: generous caps.
    DEV=cpu PRESET=tiny STEPS=2 WARM=1 JOB_EXTRA=(--epochs 1 --device cpu) BF16=fp32 SCALE=4
    BUDGET=${GPU_CHECK_BUDGET_S:-1800}
    SITE=$WORK/site
else
    DEV=cuda PRESET=ml-32m STEPS=50 WARM=10 JOB_EXTRA=() BF16=bf16 SCALE=1
    BUDGET=${GPU_CHECK_BUDGET_S:-470}
    SITE=/tmp/site
fi
DATA=$WORK/data/$PRESET
mkdir -p "$WORK/logs" "$OUT"
LOG=$OUT/gpu_check.log
: >"$LOG"
: >"$WORK/stages.tsv"
export REPO WORK OUT PY DEV PRESET DATA STEPS WARM BF16 SITE DRY PYTHONUNBUFFERED=1
export PYTHONPATH=$REPO
START=$(date +%s)

say() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

# ------------------------------------------------------------------------------------------------ stages

stage_install() {
    if ! ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
        echo "no wheels in .whl/: run benchmarks/gpu_wheels.sh here first and carry .whl"
        return 1
    fi
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$REPO"/.whl/*.whl
}

stage_env() {
    date -u
    uname -a
    nproc
    free -g 2>/dev/null | head -2
    command -v nvidia-smi >/dev/null && nvidia-smi
    "$PY" - <<'EOF'
import importlib, os, sys, time
import torch
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "triton", "numpy", "polars", "pyarrow", "tensorboard", "sklearn", "tqdm", "pytest", "mfscale"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} {os.path.dirname(m.__file__)}")
    except Exception as exc:  # report, do not stop: later stages show what breaks
        print(f"{name} MISSING: {type(exc).__name__}: {exc}")
print("cuda available", torch.cuda.is_available(), "torch cuda", torch.version.cuda)
if torch.cuda.is_available():
    dev = torch.device("cuda", 0)
    p = torch.cuda.get_device_properties(dev)
    print(f"device {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
    # The memory-bandwidth ceiling as METHOD.md says: a large device-to-device copy, bytes read + written.
    src = torch.rand(2**29, device=dev)  # 2 GiB, random (never time zeros)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    gbs = 2 * src.numel() * 4 / times[len(times) // 2] / 1e9
    assert torch.equal(dst, src)
    print(f"copy bandwidth {gbs:.0f} GB/s (median of 10, read + write)")
    with open(os.path.join(os.environ["WORK"], "copy_gbs.txt"), "w") as f:
        f.write(f"{gbs:.1f}\n")
EOF
}

stage_tests() {
    "$PY" -m pytest -q -p no:cacheprovider -m cuda -rA --durations=10 --junitxml "$WORK/pytest-cuda.xml" \
        tests/test_cuda.py
}

stage_prepare() {
    if [[ -f $DATA/manifest.json ]]; then
        echo "reusing $DATA"
    else
        "$PY" -m mfscale.prepare --synthetic "$PRESET" --out "$DATA" --overwrite --quiet || return
    fi
    "$PY" -c "import json, sys; m = json.load(open(sys.argv[1])); print({k: m[k] for k in ('counts',) if k in m})" \
        "$DATA/manifest.json"
}

auto_batch() {  # the trainer's auto batch for this data and one process (ML-32M's: 262,144)
    "$PY" -c "import sys; from mfscale.shards import Dataset; from mfscale.layout import auto_batch_size
print(auto_batch_size(Dataset(sys.argv[1]).split_rows('train'), 1))" "$DATA" 2>/dev/null || echo 262144
}

stage_throughput() {
    local auto rc=0
    auto=$(auto_batch)
    rm -f "$WORK/throughput.jsonl" "$WORK/throughput.md"  # a rerun on a warm machine starts afresh
    # throughput.py writes its records when a sweep ends, so the sweep is cut in three (each appends): a stage
    # cut short keeps what finished, the issue's target row first. fused = the default step (kernels compiled
    # from 1M ratings; inductor's on-disk cache makes later processes' compiles short); bf16 takes the autograd
    # step. --bandwidth-gbs: the H200 datasheet's 4,800 (summary.txt adds the fraction of the measured copy).
    for spec in "64 fp32" "64 bf16" "128 fp32,bf16"; do
        set -- $spec
        "$PY" benchmarks/throughput.py --data "$DATA" --device "$DEV" --modes e2e,step --precisions "$2" \
            --dims "$1" --batch-sizes "$auto,262144,1048576" --variants fused --steps "$STEPS" \
            --warmup-steps "$WARM" --no-baselines --bandwidth-gbs 4800 \
            --out-jsonl "$WORK/throughput.jsonl" --out-md "$WORK/throughput.md" || rc=$?
    done
    return $rc
}

run_job() {  # run_job NAME EXTRA...: the training CLI, wall time to WORK/NAME_wall.txt
    local name=$1 t0 t1 rc
    shift
    rm -rf "${WORK:?}/$name"
    t0=$(date +%s.%N)
    "$PY" -m mfscale.train --data "$DATA" --run-dir "$WORK/$name" "$@"
    rc=$?
    t1=$(date +%s.%N)
    echo "$t0 $t1" | awk '{printf "%.2f\n", $2 - $1}' >"$WORK/${name}_wall.txt"
    echo "wall $(cat "$WORK/${name}_wall.txt") s, exit $rc"
    return $rc
}

stage_job() {
    # shellcheck disable=SC2086  # JOB_EXTRA_STR: words on purpose (arrays do not survive export)
    run_job job $JOB_EXTRA_STR
}

stage_profile() {
    "$PY" benchmarks/profile_step.py --data "$DATA" --device "$DEV" --steps 5 --warmup-steps 10 \
        --out "$WORK/profile.txt" --trace "$WORK/profile_trace.json.gz"
}

stage_job_bf16() {
    # shellcheck disable=SC2086
    run_job job_bf16 --precision "$BF16" $JOB_EXTRA_STR
}

stage_baselines() {
    local auto
    auto=$(auto_batch)
    "$PY" benchmarks/throughput.py --data "$DATA" --device "$DEV" --modes e2e --precisions fp32 --dims 64 \
        --batch-sizes "$auto" --variants fused,sparse_adam --steps "$STEPS" --warmup-steps "$WARM" \
        --baseline-steps 100 --baseline-warmup-steps 10 --bandwidth-gbs 4800 \
        --out-jsonl "$WORK/throughput.jsonl" --out-md "$WORK/throughput.md"
}

stage_cpu_tests() {
    # The CPU suite's fast files, under the device image's torch: the project on that version.
    "$PY" -m pytest -q -p no:cacheprovider -x tests/test_optim.py tests/test_stream.py tests/test_evaluate.py \
        tests/test_checkpoint.py
}

JOB_EXTRA_STR="${JOB_EXTRA[*]:-}"
export JOB_EXTRA_STR
export -f stage_install stage_env stage_tests stage_prepare auto_batch stage_throughput run_job stage_job \
    stage_profile stage_job_bf16 stage_baselines stage_cpu_tests

# ------------------------------------------------------------------------------------------------ driver

collect() {  # refresh $OUT (at most 7 files)
    "$PY" benchmarks/gpu_summary.py "$WORK" >"$OUT/summary.txt" 2>&1
    [[ -f $WORK/throughput.jsonl ]] && cp -f "$WORK/throughput.jsonl" "$OUT/"
    [[ -f $WORK/job/metrics.json ]] && cp -f "$WORK/job/metrics.json" "$OUT/job_metrics.json"
    local ev
    ev=$(ls -S "$WORK"/job/tb/events.out.tfevents.* 2>/dev/null | head -1)
    [[ -n $ev ]] && cp -f "$ev" "$OUT/events.out.tfevents.job"
    [[ -f $WORK/profile.txt ]] && cp -f "$WORK/profile.txt" "$OUT/"
    local items=(logs stages.tsv)
    for f in throughput.md pytest-cuda.xml profile_trace.json.gz copy_gbs.txt job/metrics.json job/config.toml \
        job_bf16/metrics.json job_bf16/config.toml job_wall.txt job_bf16_wall.txt; do
        [[ -e $WORK/$f ]] && items+=("$f")
    done
    # Both jobs' TensorBoard event files (not the projector's tensors: megabytes)
    for f in "$WORK"/job/tb/events.out.tfevents.* "$WORK"/job_bf16/tb/events.out.tfevents.*; do
        [[ -e $f ]] && items+=("${f#"$WORK"/}")
    done
    tar czf "$OUT/bundle.tgz" -C "$WORK" "${items[@]}" 2>/dev/null
}

declare -A BG_PID BG_T0 BG_CAP

begin() {  # begin NAME CAP_SECONDS: prints the cap to use, or nothing when the stage is not to run
    local name=$1 cap=$(($2 * SCALE)) left
    [[ ",$STAGES," == *",$name,"* ]] || return 0
    left=$((BUDGET - ($(date +%s) - START)))
    if ((left < 15)); then
        say "$name: not run, the overall budget (${BUDGET} s) is spent" >&2
        printf '%s\tnot run\t0\n' "$name" >>"$WORK/stages.tsv"
        return 0
    fi
    ((cap > left)) && cap=$left
    say "$name: start (at most ${cap} s)" >&2
    echo "$cap"
}

finish() {  # finish NAME EXIT_CODE START_TIME CAP
    local name=$1 rc=$2 t0=$3 cap=$4 took status=ok
    took=$(($(date +%s) - t0))
    ((rc == 124 || rc == 137)) && status="TIMEOUT after ${cap} s"
    ((rc != 0 && rc != 124 && rc != 137)) && status="FAILED (exit $rc)"
    { echo "===== $name: $status, ${took} s"; cat "$WORK/logs/$name.log"; } >>"$LOG"
    printf '%s\t%s\t%s\n' "$name" "$status" "$took" >>"$WORK/stages.tsv"
    say "$name: $status, ${took} s"
    [[ $status == ok ]] || { tail -n 15 "$WORK/logs/$name.log"; echo; } | sed "/^$/d; s/^/  $name| /"
    collect
    [[ $status == ok ]]
}

stage() {  # stage NAME CAP_SECONDS: run it now, under its own timeout
    local name=$1 cap t0
    cap=$(begin "$1" "$2")
    [[ -n $cap ]] || return 0
    t0=$(date +%s)
    timeout -k 5 "$cap" bash -c "stage_$name" >"$WORK/logs/$name.log" 2>&1
    finish "$name" $? "$t0" "$cap"
}

stage_bg() {  # stage_bg NAME CAP_SECONDS: start it in the background (CPU work beside GPU work)
    local name=$1 cap
    cap=$(begin "$1" "$2")
    [[ -n $cap ]] || return 0
    BG_T0[$name]=$(date +%s)
    BG_CAP[$name]=$cap
    timeout -k 5 "$cap" bash -c "stage_$name" >"$WORK/logs/$name.log" 2>&1 &
    BG_PID[$name]=$!
}

stage_wait() {  # stage_wait NAME: wait for a background stage and record it
    local name=$1
    [[ -n ${BG_PID[$name]:-} ]] || return 0
    wait "${BG_PID[$name]}"
    finish "$name" $? "${BG_T0[$name]}" "${BG_CAP[$name]}"
    unset "BG_PID[$name]"
}

say "repo $REPO, work $WORK, out $OUT, dry $DRY, device $DEV, data $DATA, stages $STAGES, budget ${BUDGET} s"
stage install 30
# Only polars is in the target, so it shadows nothing of the image's. A rerun without the install stage on a
# machine still warm finds the target of the first run.
[[ -d $SITE ]] && export PYTHONPATH=$SITE:$REPO
stage env 30
stage_bg prepare 150  # CPU-bound (16 cores there): overlaps the GPU tests
stage tests 120
stage_wait prepare
stage throughput 120
stage job 150
stage profile 40
stage job_bf16 90
stage baselines 60
stage cpu_tests 90
collect
say "done in $(($(date +%s) - START)) s"
cat "$OUT/summary.txt"

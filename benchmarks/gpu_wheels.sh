#!/usr/bin/env bash
# Downloads, on this machine (PyPI reachable), the wheels that benchmarks/gpu_check.sh installs on the GPU
# machine, which has no network. Its image has Python 3.12 with torch 2.11, numpy, pyarrow, tensorboard,
# scikit-learn, tqdm and pytest (the device tool's KINDS.md lists its packages); of this project's runtime
# dependencies it lacks only polars (tomli is for Python < 3.11). Since 1.34 polars is a pure-Python
# front end plus a native runtime wheel, pinned to each other; both are pinned to the versions the test suite
# runs with here. --no-deps: the front end's other requirements are all optional extras.
#
#   bash benchmarks/gpu_wheels.sh [DIR]    # DIR defaults to .whl at the repository root (in .gitignore)
#
# Then give DIR (".whl") in the device run's `carry`. Everything that travels (the working tree plus carried
# paths) must stay under 64 MiB; this script prints the total and fails above 60 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PINS=(polars==2.1.0 polars-runtime-32==2.1.0)
LIMIT_MIB=60

rm -rf "$DIR"
mkdir -p "$DIR"
# pip matches manylinux_2_N tags exactly, hence the list (the device README's; polars-runtime-32 is 2_17).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR" "${PINS[@]}"

# Each wheel's non-optional requirements must be carried too or already be on the device.
for whl in "$DIR"/*.whl; do
    reqs=$(unzip -p "$whl" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true)
    echo "$(basename "$whl"): $(du -b "$whl" | cut -f1) bytes; requires: ${reqs:-nothing}" | sed 's/Requires-Dist: //g'
done
wheels=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
untracked=$( (git ls-files -z --others --exclude-standard | xargs -0 -r du -cb | tail -1 | cut -f1) || echo 0)
total=$((wheels + tree + ${untracked:-0}))
echo "wheels $((wheels / 1024)) KiB; tracked files $((tree / 1024)) KiB; untracked, not ignored $((${untracked:-0} / 1024)) KiB;" \
     "travels in all about $((total / 1048576)) MiB (limit 64 MiB)"
if ((total > LIMIT_MIB * 1048576)); then
    echo "over ${LIMIT_MIB} MiB: carry less or clean untracked files" >&2
    exit 1
fi

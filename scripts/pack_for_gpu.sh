#!/usr/bin/env bash
# Packs what scripts/gpu_check.sh needs on a lent GPU machine, which has PyTorch but
# neither a Rust toolchain, nor diffusers, nor a network, and which receives the
# working tree plus carried paths up to 64 MiB in all:
#   .gpu/wuerstchen.xz  the `--features cuda` build of scripts/build_cuda.sh, stripped
#                       and compressed (79 MB as built);
#   .gpu/whl/           the wheels of diffusers (pure Python) and of the one
#                       requirement of it that the machine's image lacks.
# .gpu/ is ignored through .git/info/exclude. Then, with the device tool:
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu"])
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bin=target-cuda/release/wuerstchen
if [ ! -x "$bin" ]; then
    echo "no $bin: run scripts/build_cuda.sh first" >&2
    exit 1
fi
mkdir -p .git/info
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
rm -rf .gpu
mkdir -p .gpu/whl
strip -o .gpu/wuerstchen "$bin"
xz -T0 -9 .gpu/wuerstchen
# the device's python3 is CPython 3.12; diffusers as scripts/requirements.txt pins it
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl "$(grep -E '^diffusers==' scripts/requirements.txt)" importlib_metadata
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
carried=$(du -sb .gpu | cut -f1)
echo "packed .gpu/: $((carried >> 20)) MiB, with the tracked tree $(((tree + carried) >> 20)) of 64 MiB"
if [ $((tree + carried)) -gt $((64 << 20)) ]; then
    echo "too large to travel to the device machine" >&2
    exit 1
fi

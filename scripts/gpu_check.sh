#!/usr/bin/env bash
# On a GPU machine with PyTorch (cu130): checks a `--features cuda` build
# (scripts/build_cuda.sh) and times it against diffusers on the card.
#
#   WUERSTCHEN=path/to/wuerstchen scripts/gpu_check.sh [dtype...]   (default bf16)
#
# On this project's lent GPU machine (no Rust, no diffusers, no network): run
# scripts/build_cuda.sh and scripts/pack_for_gpu.sh here, then with the device tool
# `bash scripts/gpu_check.sh` carrying `.gpu` (the binary and diffusers' wheels,
# unpacked below), timeout_s 600.
#
# 1. the embedded default model's image on the CPU and on the GPU (f32, same seed):
#    prints their largest pixel difference;
# 2. `wuerstchen bench --device cuda` per component (one process each, so one failing
#    component does not hide the others) and scripts/bench_reference.py on the same
#    shapes; prints the ratios. The log, both images and one JSON file per side and
#    dtype go to $OUT (default gpu-check/): 5 files for one dtype, as the device
#    tool brings back at most 8.
#
# 3. with PARITY (e.g. PARITY="prior decoder"), those full-size components' forward
#    passes on the card against diffusers' f32 there (scripts/full_size_parity.py,
#    `--dtype PARITY_DTYPE`, default f32): the CUDA path's accuracy at the official sizes.
#
# DEVICE (default cuda), SIZE (1024), COMPONENTS (all six) and LIMIT (40: seconds a
# component may take per side, 2.5x that for the pipeline) let it be tried out on a
# CPU, e.g. DEVICE=cpu SIZE=256 COMPONENTS=vqgan-decode LIMIT=300 (a python3 with torch and
# diffusers first on PATH).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
RUNS=${RUNS:-2}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-1024}
LIMIT=${LIMIT:-40}
components=${COMPONENTS:-prior decoder vqgan-decode prior-text-encoder decoder-text-encoder pipeline}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
if [ -z "${WUERSTCHEN:-}" ] && [ -f .gpu/wuerstchen.xz ]; then
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        .gpu/wuerstchen.xz /tmp/wuerstchen && chmod +x /tmp/wuerstchen && WUERSTCHEN=/tmp/wuerstchen
fi
W=${WUERSTCHEN:-target-cuda/release/wuerstchen}
if ! python3 -c "import diffusers" 2>/dev/null && [ -d .gpu/whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
# the CUDA 13 libraries the binary links: the toolkit's or PyTorch's wheels'
site=$(python3 -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
libs=$(find /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib "$site/nvidia" /usr/local/nvidia/lib* \( -name libcublas.so.13 \
    -o -name libcurand.so.10 -o -name libcudart.so.13 -o -name libcublasLt.so.13 -o -name libcuda.so.1 \) 2>/dev/null |
    xargs -n1 dirname | sort -u | tr '\n' :)
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:-}
ldd "$W" | grep "not found" && exit 1

for dev in cpu "$DEVICE"; do
    timeout 60 "$W" generate "a red circle on a blue background" --seed 7 --quiet --out "$OUT/$dev.png" --device $dev
done
python3 - "$OUT" "$DEVICE" <<'PY'
import sys
import numpy as np
from PIL import Image
cpu, gpu = (np.asarray(Image.open(f"{sys.argv[1]}/{d}.png")).astype(int) for d in ("cpu", sys.argv[2]))
print(f"default model, cpu vs {sys.argv[2]}: largest pixel difference {np.abs(cpu - gpu).max()}, mean {np.abs(cpu - gpu).mean():.4f}")
PY

parts=$(mktemp -d)
for dt in "${@:-bf16}"; do
    # one process per component and side, so that one failing or slow component does
    # not hide the others; the caps are for hangs (building the pipeline's five models
    # draws 2 billion random weights)
    for c in $components; do
        limit=$LIMIT && [ $c = pipeline ] && limit=$((LIMIT * 5 / 2))
        shape=(--device "$DEVICE" --dtype "$dt" --width "$SIZE" --height "$SIZE" --component $c --runs "$RUNS" --warmup 1 --json)
        timeout $limit "$W" bench "${shape[@]}" > "$parts/ours_$c.json" || echo "FAILED: ours $c $dt"
        PYTHONUNBUFFERED=1 timeout $((limit + 20)) python3 scripts/bench_reference.py "${shape[@]}" \
            > "$parts/ref_$c.json" || echo "FAILED: diffusers $c $dt"
    done
    # one file per side of every component's rows, and the ratios
    python3 - "$parts" "$OUT" "$dt" $components <<'PY'
import json, sys
parts, out, dt, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
def rows(side):
    found = []
    for name in names:
        try:
            found += json.load(open(f"{parts}/{side}_{name}.json"))
        except (OSError, ValueError):
            pass
    json.dump(found, open(f"{out}/{side}_{dt}.json", "w"), indent=1)
    return {r["component"]: r for r in found}
ours, ref = rows("ours"), rows("ref")
for name in names:
    o, r = ours.get(name), ref.get(name)
    cell = lambda x: f"{x['median_s']:9.4f}" if x else f"{'-':>9}"
    ratio = f"{o['median_s'] / r['median_s']:5.2f}x" if o and r else "-"
    print(f"{name:<21} {dt:>5} ours {cell(o)} s  diffusers {cell(r)} s  {ratio}")
PY
done
if [ -n "${PARITY:-}" ]; then
    # shellcheck disable=SC2086 # PARITY lists components
    WUERSTCHEN=$W python3 scripts/full_size_parity.py --device "$DEVICE" --dtype "${PARITY_DTYPE:-f32}" \
        --size "$SIZE" $PARITY || echo "FAILED: full-size parity"
fi

#!/usr/bin/env bash
# On a GPU machine with PyTorch (cu130) and diffusers: checks a `--features cuda`
# build (scripts/build_cuda.sh) and times it against diffusers on the card.
#
#   WUERSTCHEN=path/to/wuerstchen scripts/gpu_check.sh [dtype...]   (default bf16)
#
# 1. the embedded default model's image on the CPU and on the GPU (f32, same seed):
#    prints their largest pixel difference;
# 2. `wuerstchen bench --device cuda` per component (one process each, so one failing
#    component does not hide the others) and scripts/bench_reference.py on the same
#    shapes; prints the ratios. JSON and the log go to $OUT (default gpu-check/).
set -uo pipefail
cd "$(dirname "$0")/.."
W=${WUERSTCHEN:-target-cuda/release/wuerstchen}
OUT=${OUT:-gpu-check}
RUNS=${RUNS:-3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
# the CUDA 13 libraries the binary links: the toolkit's or PyTorch's wheels'
site=$(python3 -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
libs=$(find /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib "$site/nvidia" \( -name libcublas.so.13 \
    -o -name libcurand.so.10 -o -name libcudart.so.13 -o -name libcublasLt.so.13 \) 2>/dev/null |
    xargs -n1 dirname | sort -u | tr '\n' :)
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:-}
ldd "$W" | grep "not found" && exit 1

for dev in cpu cuda; do
    timeout 60 "$W" generate "a red circle on a blue background" --seed 7 --quiet --out "$OUT/$dev.png" --device $dev
done
python3 - "$OUT" <<'PY'
import sys
import numpy as np
from PIL import Image
cpu, gpu = (np.asarray(Image.open(f"{sys.argv[1]}/{d}.png")).astype(int) for d in ("cpu", "cuda"))
print(f"default model, cpu vs cuda: largest pixel difference {np.abs(cpu - gpu).max()}, mean {np.abs(cpu - gpu).mean():.4f}")
PY

components="prior decoder vqgan-decode prior-text-encoder decoder-text-encoder pipeline"
for dt in "${@:-bf16}"; do
    for c in $components; do
        timeout 45 "$W" bench --device cuda --dtype "$dt" --component $c --runs "$RUNS" --warmup 1 --json \
            > "$OUT/ours_${dt}_$c.json" || echo "FAILED: ours $c $dt"
    done
    # shellcheck disable=SC2046
    PYTHONUNBUFFERED=1 timeout 200 python3 scripts/bench_reference.py --device cuda --dtype "$dt" --runs "$RUNS" \
        --warmup 1 $(printf -- '--component %s ' $components) --json > "$OUT/ref_$dt.json" || echo "FAILED: diffusers $dt"
    python3 - "$OUT" "$dt" $components <<'PY'
import json, sys
out, dt, names = sys.argv[1], sys.argv[2], sys.argv[3:]
def rows(path):
    try:
        return {r["component"]: r for r in json.load(open(path))}
    except (OSError, ValueError):
        return {}
ref = rows(f"{out}/ref_{dt}.json")
for name in names:
    o, r = rows(f"{out}/ours_{dt}_{name}.json").get(name), ref.get(name)
    cell = lambda x: f"{x['median_s']:9.4f}" if x else f"{'-':>9}"
    ratio = f"{o['median_s'] / r['median_s']:5.2f}x" if o and r else "-"
    print(f"{name:<21} {dt:>5} ours {cell(o)} s  diffusers {cell(r)} s  {ratio}")
PY
done

#!/usr/bin/env bash
# Builds `wuerstchen --features cuda` on a machine without a CUDA toolkit or GPU, from
# NVIDIA's pip wheels (nvcc, headers, the libraries to link against), for a GPU box
# that has the driver and the CUDA 13 libraries (PyTorch's cu130 wheels carry them)
# but no Rust toolchain. The binary is written to target-cuda/release/wuerstchen.
#
#   scripts/build_cuda.sh [compute capability, default 90 (H100/H200)]
#
# PYTHON names an interpreter with pip (default: python3). On the GPU box, point
# LD_LIBRARY_PATH at the folders holding libcublas.so.13, libcurand.so.10 and
# libcudart.so.13 (scripts/gpu_check.sh finds them).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
cap=${1:-90}
root=${CUDA_WHEELS_DIR:-$PWD/target-cuda/toolkit}
if [ ! -x "$root/bin/nvcc" ]; then
    tmp=$(mktemp -d)
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 -d "$tmp" \
        "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" \
        "nvidia-cuda-cccl==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
        "nvidia-cublas==13.0.*" "nvidia-curand"
    for w in "$tmp"/*.whl; do "$PYTHON" -m zipfile -e "$w" "$tmp/x"; done
    mkdir -p "$(dirname "$root")" && rm -rf "$root" && mv "$tmp/x/nvidia/cu13" "$root" && rm -rf "$tmp"
    chmod +x "$root"/bin/* "$root"/nvvm/bin/*
    (cd "$root/lib" && for l in cublas cublasLt nvrtc cudart; do ln -sf "lib$l.so.13" "lib$l.so"; done &&
        ln -sf libcurand.so.10 libcurand.so)
fi
if [ ! -e "$root/lib/stubs/libcuda.so" ]; then
    # The driver library comes with the driver, not the toolkit: link against a stub
    # exporting the names cudarc binds (the GPU box's libcuda.so.1 replaces it).
    cudarc=$(cargo metadata --format-version 1 --all-features | "$PYTHON" -c \
        'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
    mkdir -p "$root/lib/stubs"
    grep -ohE "fn cu[A-Za-z0-9_]+\(" "$(dirname "$cudarc")/src/driver/sys/mod.rs" | sort -u |
        sed -E 's/fn (.*)\(/void \1(void) {}/' > "$root/lib/stubs/cuda.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" "$root/lib/stubs/cuda.c"
fi
export PATH=$root/bin:$PATH CUDA_ROOT=$root CUDA_COMPUTE_CAP=$cap CARGO_TARGET_DIR=$PWD/target-cuda
export RUSTFLAGS="-L native=$root/lib -L native=$root/lib/stubs"
cargo build --release --features cuda -p wuerstchen-cli

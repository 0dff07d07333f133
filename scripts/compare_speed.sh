#!/usr/bin/env bash
# Runs `wuerstchen bench` and scripts/bench_reference.py (diffusers) on the same shapes,
# threads and dtype, one after the other on this machine, and prints the ratios
# (ours / diffusers: below 1 is faster, or less memory).
#
#   scripts/compare_speed.sh [bench flags...]     e.g. --component prior --threads 2
#
# PYTHON names the interpreter that has torch + diffusers (default: python3);
# WUERSTCHEN a prebuilt binary to time instead of building one (a machine without
# cargo, such as a GPU box given a `--features cuda` build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

if [ -z "${WUERSTCHEN:-}" ]; then
    cargo build --release --quiet -p wuerstchen-cli
    WUERSTCHEN=target/release/wuerstchen
fi
"$WUERSTCHEN" bench "$@" --json > "$out/ours.json"
"$PYTHON" scripts/bench_reference.py "$@" --json > "$out/reference.json"

"$PYTHON" - "$out/ours.json" "$out/reference.json" <<'PY'
import json, sys
ours = {r["component"]: r for r in json.load(open(sys.argv[1]))}
ref = {r["component"]: r for r in json.load(open(sys.argv[2]))}
print(f"{'component':<21} {'dtype':>5} {'size':>9} {'thr':>3} {'ours s':>9} {'diffusers s':>11} "
      f"{'time':>6} {'ours GF/s':>9} {'ref GF/s':>8} {'ours MiB':>8} {'ref MiB':>8} {'memory':>6}")
for name, o in ours.items():
    r = ref.get(name)
    if r is None:
        continue
    print(f"{name:<21} {o['dtype']:>5} {o['width']}x{o['height']:<4} {o['threads']:>3} {o['median_s']:9.3f} "
          f"{r['median_s']:11.3f} {o['median_s'] / r['median_s']:5.2f}x {o['gflop'] / o['median_s']:9.1f} "
          f"{r['gflop'] / r['median_s']:8.1f} {o['peak_rss_mib']:8.0f} {r['peak_rss_mib']:8.0f} "
          f"{o['peak_rss_mib'] / r['peak_rss_mib']:5.2f}x")
PY

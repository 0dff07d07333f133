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
#
# ROUNDS=N (default 1) alternates the two sides N times (ours, diffusers, ours, ...)
# and prints each round's ratios, then the median round. On a shared machine (a cloud
# VM whose neighbours load the same cores and caches) speed drifts by 10-30% over
# minutes, and whichever side ran during a quiet spell would win; a ratio taken within
# each round, next to each other in time, drifts far less than either side's time.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ROUNDS=${ROUNDS:-1}
case "$ROUNDS" in
'' | *[!0-9]* | 0)
    echo "ROUNDS must be a whole number of at least 1, not '$ROUNDS'" >&2
    exit 2
    ;;
esac
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

if [ -z "${WUERSTCHEN:-}" ]; then
    cargo build --release --quiet -p wuerstchen-cli
    WUERSTCHEN=target/release/wuerstchen
fi
for round in $(seq 1 "$ROUNDS"); do
    "$WUERSTCHEN" bench "$@" --json > "$out/ours.$round.json"
    "$PYTHON" scripts/bench_reference.py "$@" --json > "$out/reference.$round.json"
done

"$PYTHON" - "$out" "$ROUNDS" <<'PY'
import json, sys
folder, rounds = sys.argv[1], int(sys.argv[2])

def load(side, n):
    return {r["component"]: r for r in json.load(open(f"{folder}/{side}.{n}.json"))}

header = (f"{'component':<21} {'dtype':>5} {'size':>9} {'thr':>3} {'ours s':>9} {'diffusers s':>11} "
          f"{'time':>6} {'ours GF/s':>9} {'ref GF/s':>8} {'ours MiB':>8} {'ref MiB':>8} {'memory':>6}")

def row(name, o, r):
    return (f"{name:<21} {o['dtype']:>5} {o['width']}x{o['height']:<4} {o['threads']:>3} {o['median_s']:9.3f} "
            f"{r['median_s']:11.3f} {o['median_s'] / r['median_s']:5.2f}x {o['gflop'] / o['median_s']:9.1f} "
            f"{r['gflop'] / r['median_s']:8.1f} {o['peak_rss_mib']:8.0f} {r['peak_rss_mib']:8.0f} "
            f"{o['peak_rss_mib'] / r['peak_rss_mib']:5.2f}x")

pairs = []  # per round: {component: (ours, reference)}
for n in range(1, rounds + 1):
    ours, ref = load("ours", n), load("reference", n)
    pairs.append({name: (o, ref[name]) for name, o in ours.items() if name in ref})

def table(round_pairs):
    print(header)
    for name, (o, r) in round_pairs.items():
        print(row(name, o, r))

if rounds == 1:
    table(pairs[0])
    sys.exit()

for n, round_pairs in enumerate(pairs, 1):
    print(f"round {n}")
    table(round_pairs)
    print()

# per component the round whose time ratio is the median one (the lower of the middle
# two of an even count), printed whole, so the row stays one consistent measurement
print(f"median round of {rounds} by time ratio, and the range of that ratio over the rounds")
print(header + f" {'range':>13}")
for name in pairs[0]:
    # by the ratio alone: on a tie, comparing the rows (dicts) would raise
    rounds_of = sorted(((o["median_s"] / r["median_s"], o, r) for o, r in
                        (p[name] for p in pairs if name in p)), key=lambda t: t[0])
    ratio, o, r = rounds_of[(len(rounds_of) - 1) // 2]
    lo, hi = rounds_of[0][0], rounds_of[-1][0]
    print(row(name, o, r) + f" {lo:5.2f}-{hi:.2f}x")
PY

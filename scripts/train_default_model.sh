#!/usr/bin/env bash
# Trains the small default model end to end with our own commands, on CPU.
#
#   scripts/train_default_model.sh            # writes models/default/{prior,decoder}
#
# Every number is an environment variable, so a quick rehearsal is e.g.
#   OUT=/tmp/m DATA=/tmp/d COUNT=64 STEPS_A=20 STEPS_B=20 STEPS_TE=20 STEPS_C=20 scripts/train_default_model.sh
# Reruns resume each stage from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-models/default}
DATA=${DATA:-target/default-data}
COUNT=${COUNT:-2000}
SEED=${SEED:-0}
STEPS_A=${STEPS_A:-1500}
STEPS_B=${STEPS_B:-800}
STEPS_TE=${STEPS_TE:-600}
STEPS_C=${STEPS_C:-1500}

cargo build --release --quiet
BIN=target/release/wuerstchen

[ -d "$DATA" ] || "$BIN" dataset shapes --out "$DATA" --count "$COUNT" --size 128 --seed "$SEED"

common=(--data "$DATA" --out "$OUT" --seed "$SEED" --quiet --log-every 50 --checkpoint-every 100 --export-f16)
time "$BIN" train stage-a "${common[@]}" --steps "$STEPS_A" --batch-size 8 --lr 1e-3 --warmup-steps 100
time "$BIN" train stage-b "${common[@]}" --steps "$STEPS_B" --batch-size 4 --lr 5e-4 --warmup-steps 50
time "$BIN" train text-encoder "${common[@]}" --steps "$STEPS_TE" --batch-size 32 --lr 1e-3 --warmup-steps 50 \
    --tokenizer tests/fixtures/tokenizer
time "$BIN" train stage-c "${common[@]}" --steps "$STEPS_C" --batch-size 16 --lr 5e-4 --warmup-steps 100

"$BIN" generate "a red circle on a blue background" --prior "$OUT/prior" --decoder "$OUT/decoder" \
    --seed 1 --out "$OUT/sample.png"
echo "model in $OUT/prior and $OUT/decoder; sample at $OUT/sample.png"

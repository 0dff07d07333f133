#!/usr/bin/env bash
# Trains the small default model (models/default) end to end with our own commands,
# on CPU, as it was made: see models/default/MODEL_CARD.md.
#
#   scripts/train_default_model.sh            # writes models/default/{prior,decoder}
#
# Every number is an environment variable, so a quick rehearsal is e.g.
#   OUT=/tmp/m DATA=/tmp/d COUNT=64 STEPS_A=20 STEPS_B_JOINT=20 STEPS_B=30 STEPS_TE=20 STEPS_C=20 \
#       scripts/train_default_model.sh
# Reruns resume each stage from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-models/default}
DATA=${DATA:-target/default-data}
COUNT=${COUNT:-2000}
SEED=${SEED:-0}
STEPS_A=${STEPS_A:-800}
STEPS_B_JOINT=${STEPS_B_JOINT:-1600}   # decoder and semantic compressor together
STEPS_B=${STEPS_B:-4000}               # then the decoder alone on the frozen compressor
STEPS_TE=${STEPS_TE:-500}
STEPS_C=${STEPS_C:-4000}

cargo build --release --quiet
BIN=target/release/wuerstchen

[ -d "$DATA" ] || "$BIN" dataset shapes --out "$DATA" --count "$COUNT" --size 128 --seed "$SEED"

common=(--data "$DATA" --out "$OUT" --seed "$SEED" --quiet --log-every 50 --checkpoint-every 100 --export-f16)
time "$BIN" train stage-a "${common[@]}" --steps "$STEPS_A" --batch-size 8 --lr 1e-3 --warmup-steps 100
time "$BIN" train stage-b "${common[@]}" --steps "$STEPS_B_JOINT" --batch-size 8 --lr 5e-4 --warmup-steps 50

# Once the compressor is frozen, the decoder and the text side are independent: train
# them at the same time, one core each (candle gains little from a second thread on
# these small tensors, so this halves the wall time).
export RAYON_NUM_THREADS=1
time "$BIN" train stage-b "${common[@]}" --steps "$STEPS_B" --batch-size 8 --lr 5e-4 --warmup-steps 50 \
    --freeze-compressor > "$OUT/stage-b-frozen.log" 2>&1 &
decoder=$!
time "$BIN" train text-encoder "${common[@]}" --steps "$STEPS_TE" --batch-size 32 --lr 1e-3 --warmup-steps 50 \
    --tokenizer tests/fixtures/tokenizer
time "$BIN" train stage-c "${common[@]}" --steps "$STEPS_C" --batch-size 16 --lr 5e-4 --warmup-steps 100
wait "$decoder"
cat "$OUT/stage-b-frozen.log"
unset RAYON_NUM_THREADS

"$BIN" generate "a red circle on a blue background" --prior "$OUT/prior" --decoder "$OUT/decoder" \
    --seed 1 --out "$OUT/sample.png"
"$BIN" eval --prior "$OUT/prior" --decoder "$OUT/decoder"
echo "model in $OUT/prior and $OUT/decoder; sample at $OUT/sample.png"

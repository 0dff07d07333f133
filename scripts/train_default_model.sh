#!/usr/bin/env bash
# Trains the small default model (models/default) end to end with our own commands,
# on CPU, as it was made: see models/default/MODEL_CARD.md.
#
#   scripts/train_default_model.sh            # writes models/default/{prior,decoder,compressor}
#
# Every number is an environment variable, so a quick rehearsal is e.g.
#   OUT=/tmp/m DATA=/tmp/d DATA_BIG=/tmp/d2 COUNT=64 COUNT_BIG=128 STEPS_A=20 STEPS_B_JOINT=20 \
#       STEPS_B=30 STEPS_TE=20 STEPS_C1=20 STEPS_C=40 scripts/train_default_model.sh
# Reruns resume each stage from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-models/default}
DATA=${DATA:-target/default-data}           # 2000 images: Stage A, compressor, text encoder, prior start
DATA_BIG=${DATA_BIG:-target/default-data-big} # 20000 more (another seed): decoder, rest of the prior
COUNT=${COUNT:-2000}
COUNT_BIG=${COUNT_BIG:-20000}
STEPS_A=${STEPS_A:-800}
STEPS_B_JOINT=${STEPS_B_JOINT:-1600}   # a first decoder and the semantic compressor together
STEPS_B=${STEPS_B:-1400}               # then the shipped decoder on the frozen compressor
STEPS_TE=${STEPS_TE:-500}
STEPS_C1=${STEPS_C1:-4000}             # the prior on DATA ...
STEPS_C=${STEPS_C:-13400}              # ... and on to STEPS_C on DATA_BIG,
STEPS_C_FT=${STEPS_C_FT:-5500}         # then a fine-tune from its EMA weights at a lower lr

cargo build --release --quiet
BIN=target/release/wuerstchen

[ -d "$DATA" ] || "$BIN" dataset shapes --out "$DATA" --count "$COUNT" --size 128 --seed 0
[ -d "$DATA_BIG" ] || "$BIN" dataset shapes --out "$DATA_BIG" --count "$COUNT_BIG" --size 128 --seed 1

log=(--quiet --log-every 50 --checkpoint-every 100 --export-f16)
time "$BIN" train stage-a --data "$DATA" --out "$OUT" --seed 0 "${log[@]}" \
    --steps "$STEPS_A" --batch-size 8 --lr 1e-3 --warmup-steps 100
time "$BIN" train stage-b --data "$DATA" --out "$OUT" --seed 0 "${log[@]}" \
    --steps "$STEPS_B_JOINT" --batch-size 8 --lr 5e-4 --warmup-steps 50

time "$BIN" train text-encoder --data "$DATA" --out "$OUT" --seed 0 "${log[@]}" \
    --steps "$STEPS_TE" --batch-size 32 --lr 1e-3 --warmup-steps 50 --tokenizer tests/fixtures/tokenizer

# Once the compressor and the text encoder are frozen, the decoder and the prior are
# independent: train them at the same time, one core each (candle gains little from a
# second thread on these small tensors, so this halves the wall time). The shipped
# decoder is another architecture than the joint run's (patch size 1, three levels,
# attention to the caption at the lower two: scripts/default_model/decoder.json), so
# it trains in a folder of its own on copies of Stage A, the compressor and the text
# encoder.
export RAYON_NUM_THREADS=1
DEC="$OUT/checkpoints/decoder"
mkdir -p "$DEC/decoder"
for part in vqgan text_encoder tokenizer; do cp -r "$OUT/decoder/$part" "$DEC/decoder/"; done
cp -r "$OUT/compressor" "$DEC/"
time "$BIN" train stage-b --data "$DATA_BIG" --out "$DEC" --seed 0 "${log[@]}" \
    --config scripts/default_model/decoder.json --freeze-compressor \
    --steps "$STEPS_B" --batch-size 8 --lr 8e-4 --warmup-steps 100 > "$OUT/stage-b-frozen.log" 2>&1 &
decoder=$!
c=(--out "$OUT" "${log[@]}" --batch-size 16 --lr 5e-4 --warmup-steps 100)
time "$BIN" train stage-c --data "$DATA" --seed 0 "${c[@]}" --steps "$STEPS_C1"
time "$BIN" train stage-c --data "$DATA_BIG" --seed 1 "${c[@]}" --steps "$STEPS_C"
# a second run from the exported (EMA) prior at 2/5 of the learning rate, with fresh
# AdamW moments: colour 90% -> 98%, shape 31% -> 40% (see the model card)
FT="$OUT/checkpoints/prior-ft"
if [ ! -f "$FT/checkpoints/stage-c.safetensors" ]; then
    rm -rf "$FT" && mkdir -p "$FT"
    cp -r "$OUT/prior" "$OUT/decoder" "$OUT/compressor" "$FT/"
fi
time "$BIN" train stage-c --data "$DATA_BIG" --seed 2 --out "$FT" "${log[@]}" \
    --batch-size 16 --lr 2e-4 --warmup-steps 100 --steps "$STEPS_C_FT" \
    --init "$OUT/prior/prior/diffusion_pytorch_model.safetensors"
wait "$decoder"
cat "$OUT/stage-b-frozen.log"
unset RAYON_NUM_THREADS
cp "$FT/prior/prior/"* "$OUT/prior/prior/"
# the decoder with the latent scale its run measured on Stage A
cp "$DEC/decoder/decoder/"* "$OUT/decoder/decoder/"
cp "$DEC/decoder/vqgan/config.json" "$OUT/decoder/vqgan/"

"$BIN" generate "a red circle on a blue background" --prior "$OUT/prior" --decoder "$OUT/decoder" \
    --seed 1 --out "$OUT/sample.png"
"$BIN" eval --prior "$OUT/prior" --decoder "$OUT/decoder"
echo "model in $OUT/prior and $OUT/decoder; sample at $OUT/sample.png"

#!/usr/bin/env bash
# Trains the small default model (models/default: a 12 x 12 semantic map at 128 px)
# end to end with our own commands, on CPU, as it was made: see
# models/default/MODEL_CARD.md, whose training table lists the same phases.
#
#   scripts/train_default_model.sh     # ~6 h on 2 cores; writes models/default/{prior,decoder,compressor}
#
# The model was not trained in one go: it grew over several sessions, each phase
# starting from the exported (EMA) weights of the one before with `--init` (fresh AdamW
# moments, a new seed) when a measurement said what to change. This script replays
# those phases in order. SCALE multiplies every phase's step count, so a quick
# rehearsal is e.g.
#   OUT=/tmp/m WORK=/tmp/w DATA=/tmp/d DATA_BIG=/tmp/d2 DATA_96=/tmp/d3 COUNT=64 \
#       COUNT_BIG=128 SCALE=0.005 scripts/train_default_model.sh
# A rerun resumes the unfinished phase from its last checkpoint and skips the finished
# ones.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-models/default}
WORK=${WORK:-target/default-work}            # one folder per phase
DATA=${DATA:-target/default-data}            # 2000 images: Stage A, compressor, text encoder
DATA_BIG=${DATA_BIG:-target/default-data-big} # 20000 more (another seed): decoder and prior
DATA_96=${DATA_96:-target/default-data-96}   # the same 20000 drawn at 96 px: a prior phase
COUNT=${COUNT:-2000}
COUNT_BIG=${COUNT_BIG:-20000}
SCALE=${SCALE:-1}

cargo build --release --quiet
BIN=target/release/wuerstchen

[ -d "$DATA" ] || "$BIN" dataset shapes --out "$DATA" --count "$COUNT" --size 128 --seed 0
[ -d "$DATA_BIG" ] || "$BIN" dataset shapes --out "$DATA_BIG" --count "$COUNT_BIG" --size 128 --seed 1
[ -d "$DATA_96" ] || "$BIN" dataset shapes --out "$DATA_96" --count "$COUNT_BIG" --size 96 --seed 1

steps() { awk -v n="$1" -v s="$SCALE" 'BEGIN { v = int(n * s); print (v < 2 ? 2 : v) }'; }
log=(--quiet --log-every 50 --checkpoint-every 250 --export-f16)

# Stage A, then a first decoder jointly with the semantic compressor (downscale 8: a
# 16 x 16 map at 128 px; that decoder is discarded), then the text encoder against
# the compressor's features.
BASE="$WORK/base"
"$BIN" train stage-a --data "$DATA" --out "$BASE" --seed 0 "${log[@]}" \
    --steps "$(steps 800)" --batch-size 8 --lr 1e-3 --warmup-steps 100
"$BIN" train stage-b --data "$DATA" --out "$BASE" --seed 0 "${log[@]}" \
    --compressor-config scripts/default_model/compressor.json \
    --steps "$(steps 1600)" --batch-size 8 --lr 5e-4 --warmup-steps 50
"$BIN" train text-encoder --data "$DATA" --out "$BASE" --seed 0 "${log[@]}" \
    --steps "$(steps 500)" --batch-size 32 --lr 1e-3 --warmup-steps 50 \
    --tokenizer tests/fixtures/tokenizer

# phase DIR FROM [SCALED]: a phase's folder, holding FROM's pipeline folders and
# compressor but not its checkpoints (a run with a checkpoint resumes and ignores
# --init). SCALED gives its compressor `input_scale` 0.75: each image is first scaled
# to 96 px, so the same weights make a 12 x 12 map.
phase() {
    local dir=$1 from=$2
    [ -d "$dir" ] && return 0
    rm -rf "$dir.part" && mkdir -p "$dir.part"
    cp -r "$from/prior" "$from/decoder" "$from/compressor" "$dir.part/"
    local config="$dir.part/compressor/config.json"
    if [ "${3:-}" = scaled ]; then
        # every exported compressor config names its input_scale (1 until here)
        sed -i -E 's/"input_scale": [0-9.e+-]+/"input_scale": 0.75/' "$config"
        grep -q '"input_scale": 0.75' "$config"
    fi
    mv "$dir.part" "$dir"
}
weights() { echo "$1/$2/$2/diffusion_pytorch_model.safetensors"; }

# With the compressor and the text encoder frozen, the decoder and the prior are
# independent: each chain runs on one core, both at once (candle gains little from a
# second thread on these small tensors).
export RAYON_NUM_THREADS=1

# train_decoder DIR STEPS LR WARMUP SEED [FLAGS...]: the shipped decoder architecture
# on the frozen compressor
train_decoder() {
    "$BIN" train stage-b --data "$DATA_BIG" --out "$1" "${log[@]}" \
        --config scripts/default_model/decoder.json --freeze-compressor --batch-size 8 \
        --steps "$(steps "$2")" --lr "$3" --warmup-steps "$4" --seed "$5" "${@:6}"
}
# decoder: DIR FROM SCALED STEPS LR WARMUP SEED EFFNET_AUGMENT, from FROM's weights
decoder() {
    local dir="$WORK/$1" from="$WORK/$2"
    phase "$dir" "$from" "$3"
    train_decoder "$dir" "$4" "$5" "$6" "$7" \
        --effnet-augment "$8" --init "$(weights "$from" decoder)"
}
decoder_chain() {
    # on the 16 x 16 map from scratch: 1800 steps, then on to 3000 at a lower
    # learning rate (a resume)
    phase "$WORK/dec1" "$BASE"
    train_decoder "$WORK/dec1" 1800 8e-4 100 0
    train_decoder "$WORK/dec1" 3000 3e-4 100 0
    # the same decoder on the 12 x 12 map, then taught to draw the caption's outline
    # from blurred and noised features (docs/training.md, "Conditioning augmentation")
    decoder dec2 dec1 scaled 4000 3e-4 50 8 0
    decoder dec3 dec2 scaled 2250 3e-4 50 11 0.5
    decoder dec4 dec3 scaled 7500 8e-4 50 12 1
    decoder dec5 dec4 scaled 5500 8e-4 50 15 1
}

# prior: DIR FROM SCALED DATA STEPS LR SEED [--init], the x0 weight floor and timestep
# shift of docs/training.md ("Where the shape is lost") throughout
prior() {
    local dir="$WORK/$1" from="$WORK/$2" init=()
    phase "$dir" "$from" "$3"
    [ "${8:-}" = --init ] && init=(--init "$(weights "$from" prior)")
    "$BIN" train stage-c --data "$4" --out "$dir" "${log[@]}" \
        --config scripts/default_model/prior.json --x0-weight-floor 1 --timestep-shift 2 \
        --batch-size 16 --warmup-steps 100 --steps "$(steps "$5")" --lr "$6" --seed "$7" \
        "${init[@]}"
}
prior_chain() {
    prior pri1 base no "$DATA_BIG" 3500 5e-4 5           # 16 x 16 map, from scratch
    prior pri2 pri1 no "$DATA_BIG" 2500 5e-4 6 --init
    prior pri3 pri2 no "$DATA_96" 4250 5e-4 7 --init     # 96 px images: 12 x 12
    prior pri4 pri3 scaled "$DATA_BIG" 6000 5e-4 9 --init
    prior pri5 pri4 scaled "$DATA_BIG" 12500 5e-4 10 --init
    prior pri6 pri5 scaled "$DATA_BIG" 3000 2e-4 13 --init
    prior pri7 pri6 scaled "$DATA_BIG" 9250 2e-4 14 --init
}

time decoder_chain > "$WORK/decoder.log" 2>&1 &
dec=$!
time prior_chain
wait "$dec" || { cat "$WORK/decoder.log"; exit 1; }
unset RAYON_NUM_THREADS

# the model: the last prior's pipeline folder (its model_index.json sizes the 12 x 12
# map), the last decoder's (with the latent scale its run measured on Stage A) with
# the model_index.json and scheduler the prior's export wrote, and the scaled compressor
P="$WORK/pri7" D="$WORK/dec5"
mkdir -p "$OUT"
rm -rf "$OUT/prior" "$OUT/decoder" "$OUT/compressor"
cp -r "$P/prior" "$D/decoder" "$P/compressor" "$OUT/"
cp -r "$P/decoder/model_index.json" "$P/decoder/scheduler" "$OUT/decoder/"

"$BIN" generate "a red circle on a blue background" --prior "$OUT/prior" --decoder "$OUT/decoder" \
    --seed 1 --out "$OUT/sample.png"
"$BIN" eval --prior "$OUT/prior" --decoder "$OUT/decoder"
echo "model in $OUT/prior and $OUT/decoder; sample at $OUT/sample.png"

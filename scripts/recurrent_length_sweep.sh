#!/usr/bin/env bash
# Length generalization of recurrent models (docs/results/recurrent_length_generalization.md):
# loss per position and passkey retrieval up to 64x the training length, per mixer and
# state size, after pretraining from zero states and after a short post-training stage
# with each initial-state recipe (longjax.train.initial_state):
#
#   pretrain  each MIXER at two state sizes (STATES_<mixer>: "small large" overrides),
#             PRE steps at L tokens from zero states
#   post      from that checkpoint FT more steps with config.train.initial_state =
#             zeros (the control), other_sequence, noise, and carry (on contiguous slots:
#             truncated BPTT), as Buitrago & Gu 2025 post-train
#   evaluate  every run at L, 2L, .., 64L: loss per position, bits per byte, passkey at
#             depths 0, 0.5, 1 (Stuffed Mamba's capacity relation: passkey vs state size)
#   combine   one table and plot set per mixer and state size into $OUT/<mixer>_<size>/
#
# Usage (from the repository root; parts default to all, in this order, one mixer after
# another, so each mixer's results are complete before the next one starts):
#   scripts/recurrent_length_sweep.sh [pretrain] [post] [combine]
# Environment: W (workdir root), OUT, MIXERS, RECIPES (RECIPES_<mixer> for one mixer; " "
# for none), STATES_<mixer>, POST_SIZES (which of the state sizes 1 2 get the post stage),
# L, MODEL, PRE, FT, LENGTHS (evaluation lengths; default L, 2L, .., 64L), PASSKEY
# (passkey rows per length and depth; 0: none),
# SMOKE=1 (a few steps and tokens per run: checks that every command starts; its numbers
# mean nothing). An evaluated run is not evaluated again; train.py resumes a killed run.
set -euo pipefail

W=${W:-workdirs/recurrent_length_2026_12}
OUT=${OUT:-docs/results/recurrent_length_generalization}
CFG=configs/quickstart.py
MIXERS=${MIXERS:-"mamba mamba2 gla gated_deltanet rglru"}
L=${L:-64}
MODEL=${MODEL:-"d_model=64,num_layers=2,seq_len=$L,batch_size=$((4096 / L))"}
RECIPES=${RECIPES:-"zeros other_sequence noise carry"}
# Two state sizes per mixer: per-channel N for the SSMs, the head dimension (a D x D
# state per head) for the linear-attention mixers, the recurrence width for RG-LRU.
STATES_mamba=${STATES_mamba:-"model.mixer_options.mamba.d_state=4 model.mixer_options.mamba.d_state=16"}
STATES_mamba2=${STATES_mamba2:-"model.mixer_options.mamba2.d_state=16 model.mixer_options.mamba2.d_state=64"}
STATES_gla=${STATES_gla:-"model.num_heads=8,model.num_kv_heads=8 model.num_heads=2,model.num_kv_heads=2"}
STATES_gated_deltanet=${STATES_gated_deltanet:-$STATES_gla}
STATES_rglru=${STATES_rglru:-"model.mixer_options.rglru.width=32 model.mixer_options.rglru.width=128"}

lengths() { local n=$L out=$L; for _ in 1 2 3 4 5 6; do n=$((n * 2)); out="$out,$n"; done; echo "$out"; }

if [[ ${SMOKE:-0} == 1 ]]; then
  PRE=${PRE:-2}; FT=${FT:-2}
  SHORT="train.warmup_steps=1,eval.every_steps=2,checkpoint.every_steps=2,eval.num_batches=1"
  EVAL=(--lengths="$L,$((4 * L))" --num_tokens=512 --stride=0 --passkey_samples=1
        --passkey_depths=0.5 --batch_size=1)
else
  PRE=${PRE:-1000}; FT=${FT:-100}
  SHORT="train.warmup_steps=50,eval.every_steps=$PRE,checkpoint.every_steps=$PRE"
  EVAL=(--lengths="${LENGTHS:-$(lengths)}" --num_tokens=$((64 * L * 4)) --stride=0
        --passkey_samples="${PASSKEY:-8}" --passkey_depths=0,0.5,1 --batch_size=1)
fi

evaluate() {  # workdir
  [[ -f $1/extrapolation/results.csv ]] && { echo "skip $1 (evaluated)"; return; }
  python scripts/evaluate_lengths.py --workdir="$1" --methods=none "${EVAL[@]}"
}

states_of() { local var="STATES_$1"; echo "${!var}"; }
recipes_of() { local var="RECIPES_$1"; echo "${!var:-$RECIPES}"; }

pretrain() {  # mixer
  local m=$1 size state
  size=0
  for state in $(states_of "$m"); do
    size=$((size + 1))
    local workdir=$W/${m}_s${size}_pre
    python scripts/train.py --workdir="$workdir" \
        --config="$CFG:mixer=$m,$MODEL,$state,steps=$PRE,$SHORT,checkpoint.keep=1"
    evaluate "$workdir"
  done
}

post() {  # mixer
  local m=$1 size state recipe
  size=0
  for state in $(states_of "$m"); do
    size=$((size + 1))
    [[ " ${POST_SIZES:-1 2} " == *" $size "* ]] || continue
    for recipe in $(recipes_of "$m"); do
      local workdir=$W/${m}_s${size}_$recipe packing=concat
      [[ $recipe == carry ]] && packing=contiguous
      if [[ ! -d $workdir/checkpoints ]]; then  # start from the shared pretraining
        mkdir -p "$workdir/checkpoints"
        cp -r "$W/${m}_s${size}_pre/checkpoints/$PRE" "$workdir/checkpoints/"
      fi
      python scripts/train.py --workdir="$workdir" --config="$CFG:mixer=$m,$MODEL,$state,$SHORT,\
steps=$((PRE + FT)),train.initial_state=$recipe,data.packing=$packing"
      evaluate "$workdir"
    done
  done
}

combine() {  # mixer
  local m=$1 size recipe
  for size in 1 2; do
    local runs=("pretrained=$W/${m}_s${size}_pre")
    for recipe in $(recipes_of "$m"); do
      [[ -d $W/${m}_s${size}_$recipe ]] && runs+=("post_$recipe=$W/${m}_s${size}_$recipe")
    done
    python scripts/combine_extrapolation.py --runs="$(IFS=,; echo "${runs[*]}")" \
        --output_dir="$OUT/${m}_s$size"
  done
}

parts=("$@")
[[ ${#parts[@]} == 0 ]] && parts=(pretrain post combine)
for part in "${parts[@]}"; do
  case $part in
    pretrain|post|combine) ;;
    *) echo "unknown part $part; allowed: pretrain post combine" >&2; exit 2 ;;
  esac
done
for m in $MIXERS; do
  for part in "${parts[@]}"; do echo "== $part $m"; $part "$m"; done
done

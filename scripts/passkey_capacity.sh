#!/usr/bin/env bash
# Passkey retrieval against recurrent state size (docs/results/recurrent_length_generalization.md;
# the capacity relation of Stuffed Mamba, Chen et al. 2024, at CPU scale):
#
#   train     a Mamba-2 per state size N and seed (d_model 64, 2 layers, 4 heads of
#             dimension 32, so 128 N numbers of state per layer) on passkey rows
#             (`data.task=passkey`, 5-digit keys, uniform needle depth) at L tokens
#   evaluate  passkey accuracy (every key digit the argmax) at LENGTHS, 5 needle depths x
#             ROWS rows each, under METHODS (Stuffed Mamba's fixes: longjax.eval.methods)
#   combine   one table per metric over all runs, seeds.md with mean and spread per N
#
# Usage (from the repository root): scripts/passkey_capacity.sh [train] [combine]
# Environment: W (workdir root), OUT, STATES (d_state values), SEEDS, L, STEPS, LENGTHS,
# ROWS, METHODS. A trained run resumes or is skipped; an evaluated one is not evaluated again.
set -euo pipefail

W=${W:-workdirs/passkey_capacity}
OUT=${OUT:-docs/results/recurrent_length_generalization/passkey_capacity}
STATES=${STATES:-"1 4 16 64"}
SEEDS=${SEEDS:-"0 1 2"}
L=${L:-128}
STEPS=${STEPS:-800}
LENGTHS=${LENGTHS:-"128,192,256,384,512,1024,2048,4096"}
ROWS=${ROWS:-8}
METHODS=${METHODS:-none}
PARTS=${*:-train combine}

run() { echo "$W/m2_n$1_s$2"; }

if [[ " $PARTS " == *" train "* ]]; then
  for SEED in $SEEDS; do
    for N in $STATES; do
      RUN=$(run "$N" "$SEED")
      python scripts/train.py --workdir="$RUN" \
        --config="configs/quickstart.py:mixer=mamba2,d_model=64,num_layers=2,seq_len=$L,batch_size=$((4096 / L)),model.mixer_options.mamba2.head_dim=32,model.mixer_options.mamba2.d_state=$N,data.source=task,data.task=passkey,steps=$STEPS,seed=$SEED,train.warmup_steps=30,train.learning_rate=3e-3,eval.every_steps=200,checkpoint.every_steps=200,checkpoint.keep=1,eval.num_batches=2,train.log_every=50,train.progress_bar=False"
      [[ -f $RUN/eval/results.csv ]] || python scripts/evaluate_lengths.py --workdir="$RUN" \
        --lengths="$LENGTHS" --passkey_samples="$ROWS" --passkey_depths=0,0.25,0.5,0.75,1 \
        --num_tokens=1 --stride=0 --batch_size=20 --methods="$METHODS" --output_dir="$RUN/eval"
    done
  done
fi

if [[ " $PARTS " == *" combine "* ]]; then
  RUNS=()
  for N in $STATES; do
    for SEED in $SEEDS; do
      [[ -f $(run "$N" "$SEED")/eval/results.csv ]] && RUNS+=("n$N#$SEED=$(run "$N" "$SEED")/eval")
    done
  done
  python scripts/combine_extrapolation.py --output_dir="$OUT" --runs="$(IFS=,; echo "${RUNS[*]}")"
fi

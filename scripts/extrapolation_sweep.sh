#!/usr/bin/env bash
# The length-extrapolation sweep of docs/results/length_extrapolation.md, rerun with
# training rows that start at position 0 (config.data.positions="row"):
#
#   schemes   the nine position schemes trained at 256 tokens (4x the quickstart's tokens:
#             1000 steps of 16 x 256), evaluated at 256 .. 4096; 3 seeds for RoPE, ALiBi
#             and NoPE, 1 for the others
#   methods   the training-free methods on each RoPE seed, with the window-only row
#             (StreamingLLM's claim: window attention breaks past the cache, sinks fix it)
#   finetune  context extension by fine-tuning at equal tokens: the RoPE model pretrained
#             for PRE steps at 256, then FT more steps under each of: plain at 256
#             (control), plain at 1024, PI, YaRN, ABF (base 5e5), Giraffe's truncated
#             basis (all at 1024) and PoSE (rows of 256, positions over 1024)
#   tasks     the synthetic tasks (copy, reverse, sorting, addition), every scheme
#   combine   the tables and plots into docs/results/length_extrapolation/
#
# Usage (from the repository root; parts default to all, in this order):
#   scripts/extrapolation_sweep.sh [schemes] [methods] [finetune] [tasks] [combine]
# Environment: W (workdir root, default workdirs/extrapolation_2026_12), SMOKE=1 (a few
# steps and tokens per run: checks that every command starts; its numbers mean nothing),
# SCHEMES / SEEDS3 / FINETUNES / TASKS / TASK_SCHEMES to restrict the runs (set but empty:
# none, e.g. SEEDS3= for one seed of every scheme; two lanes given disjoint lists share a
# machine's cores).
# A run whose workdir holds a finished evaluation is skipped, so a killed sweep resumes
# (train.py itself resumes from its last checkpoint).
set -euo pipefail

W=${W:-workdirs/extrapolation_2026_12}
OUT=${OUT:-docs/results/length_extrapolation}
CFG=configs/extrapolation/config.py
SCHEMES=${SCHEMES-"sinusoidal learned rope xpos alibi t5 kerple fire nope"}
SEEDS3=${SEEDS3-"rope alibi nope"}  # the schemes run with seeds 0, 1, 2
FINETUNES=${FINETUNES-"plain1024 pi yarn abf giraffe pose"}  # besides the control
TASKS=${TASKS-"copy reverse sorting addition"}
TASK_SCHEMES=${TASK_SCHEMES-$SCHEMES}
METHODS="none,linear:auto,ntk:auto,dynamic_ntk:auto,yarn:auto,llama3:auto,giraffe,logn"
METHODS="$METHODS,yarn:auto+logn,self_extend:32:128,lm_infinite,streaming,window"
LENGTHS=256,512,1024,2048,4096

if [[ ${SMOKE:-0} == 1 ]]; then
  STEPS=4; PRE=2; FT=2; TASK_STEPS=2
  SHORT="train.warmup_steps=1,eval.every_steps=2,checkpoint.every_steps=2,eval.num_batches=1"
  EVAL=(--lengths=256,512 --num_tokens=512 --stride=0 --passkey_samples=0 --batch_size=1)
  TASK_EVAL=(--task_sizes=5,25 --task_samples=4)
  TASK_SHORT=",$SHORT"
else
  STEPS=1000; PRE=1000; FT=200; TASK_STEPS=600
  SHORT="eval.every_steps=250,checkpoint.every_steps=250"
  EVAL=(--lengths=$LENGTHS --num_tokens=16384 --stride=0 --passkey_samples=2
        --passkey_depths=0,0.5,1 --batch_size=1)
  TASK_EVAL=(--task_sizes=5,10,15,20,25,30,35,40)
  TASK_SHORT=""
fi

seeds_of() { [[ " $SEEDS3 " == *" $1 "* ]] && echo "0 1 2" || echo "0"; }

train_and_evaluate() {  # workdir config-arg evaluate-args...
  local workdir=$1 arg=$2; shift 2
  if [[ -f $workdir/extrapolation/results.csv ]]; then
    echo "skip $workdir (evaluated)"; return
  fi
  python scripts/train.py --config="$CFG:$arg" --workdir="$workdir"
  python scripts/evaluate_lengths.py --workdir="$workdir" "$@"
}

schemes() {
  for s in $SCHEMES; do
    for seed in $(seeds_of "$s"); do
      # learned: a table of 4096 rows, those past 256 never trained (what 16x meets)
      local table=""; [[ $s == learned ]] && table=",model.max_position=4096"
      train_and_evaluate "$W/lm_${s}_s$seed" "scheme=$s,seed=$seed,steps=$STEPS,$SHORT$table" \
          "${EVAL[@]}" --methods=none
    done
  done
}

methods() {  # the RoPE models of `schemes`, every training-free method
  for seed in $(seeds_of rope); do
    [[ -f $W/lm_rope_s$seed/methods/results.csv ]] && continue
    python scripts/evaluate_lengths.py --workdir="$W/lm_rope_s$seed" "${EVAL[@]}" \
        --methods="$METHODS" --output_dir="$W/lm_rope_s$seed/methods"
  done
}

finetune() {
  local stages="((${PRE},256,1e4),(${FT},256,1e4))"
  local base="scheme=rope,steps=$((PRE + FT)),checkpoint.every_steps=${PRE},checkpoint.keep=2"
  base="$base,eval.every_steps=$((PRE + FT))"
  [[ ${SMOKE:-0} == 1 ]] && base="$base,train.warmup_steps=1,eval.num_batches=1"
  # the control, which also holds the pretrained checkpoint at step PRE
  train_and_evaluate "$W/ft_control" "$base,train.stages=$stages" "${EVAL[@]}" --methods=none
  local name ext
  for name_ext in "plain1024:1024,1e4," "pi:1024,1e4,'linear:4'" "yarn:1024,1e4,'yarn:4'" \
      "abf:1024,5e5," "giraffe:1024,1e4,'giraffe'" "pose:256,1e4,'pose:1024'"; do
    name=${name_ext%%:*}; ext=${name_ext#*:}; ext=${ext%,}
    [[ " $FINETUNES " == *" $name "* ]] || continue
    local workdir=$W/ft_$name
    if [[ ! -d $workdir/checkpoints/$PRE ]]; then  # start from the shared pretraining
      mkdir -p "$workdir/checkpoints"
      cp -r "$W/ft_control/checkpoints/$PRE" "$workdir/checkpoints/"
    fi
    train_and_evaluate "$workdir" "$base,train.stages=((${PRE},256,1e4),(${FT},$ext))" \
        "${EVAL[@]}" --methods=none
  done
}

tasks() {
  for t in $TASKS; do
    for s in $TASK_SCHEMES; do
      train_and_evaluate "$W/${t}_$s" "scheme=$s,task=$t,steps=$TASK_STEPS$TASK_SHORT" \
          "${TASK_EVAL[@]}"
    done
  done
}

combine() {
  local runs=() s seed
  for s in $SCHEMES; do
    for seed in $(seeds_of "$s"); do runs+=("$s#$seed=$W/lm_${s}_s$seed"); done
  done
  python scripts/combine_extrapolation.py --methods=none --runs="$(IFS=,; echo "${runs[*]}")" \
      --output_dir="$OUT/corpus_schemes"
  runs=()
  for seed in $(seeds_of rope); do runs+=("rope#$seed=$W/lm_rope_s$seed/methods"); done
  python scripts/combine_extrapolation.py --runs="$(IFS=,; echo "${runs[*]}")" \
      --output_dir="$OUT/corpus_rope_methods"
  runs=()
  for name in control $FINETUNES; do runs+=("$name=$W/ft_$name"); done
  python scripts/combine_extrapolation.py --runs="$(IFS=,; echo "${runs[*]}")" \
      --output_dir="$OUT/corpus_finetune"
  for t in $TASKS; do
    runs=()
    for s in $TASK_SCHEMES; do runs+=("$s=$W/${t}_$s"); done
    python scripts/combine_extrapolation.py --runs="$(IFS=,; echo "${runs[*]}")" \
        --output_dir="$OUT/$t"
  done
}

parts=("$@")
[[ ${#parts[@]} == 0 ]] && parts=(schemes methods finetune tasks combine)
for part in "${parts[@]}"; do
  case $part in
    schemes|methods|finetune|tasks|combine) echo "== $part"; $part ;;
    *) echo "unknown part $part; allowed: schemes methods finetune tasks combine" >&2; exit 2 ;;
  esac
done

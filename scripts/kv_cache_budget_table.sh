#!/usr/bin/env bash
# The accuracy-versus-budget table of docs/results/kv_cache.md: every KV-cache policy at
# 1/2, 1/4, 1/8 and 1/16 of a 1024-token context on niah_single (noise haystack), from a
# model trained with configs/kv_cache_ruler.py. One evaluate_lengths.py process per
# policy, in two lanes; a policy whose output folder holds results is skipped.
#
# Usage (from the repository root): W=WORKDIR OUT=FOLDER scripts/kv_cache_budget_table.sh
# Environment: SAMPLES (per depth, default 3), DEPTHS (default 0.1,0.4,0.7,0.95).
set -euo pipefail
W=${W:?W must be a training workdir (configs/kv_cache_ruler.py)}
OUT=${OUT:-workdirs/kv_cache_table}
COMMON=(--workdir="$W" --lengths=1024 --ruler_tasks=niah_single --ruler_options=haystack=noise
        --ruler_samples="${SAMPLES:-3}" --ruler_depths="${DEPTHS:-0.1,0.4,0.7,0.95}"
        --passkey_samples=0 --num_tokens=1 --stride=0 --batch_size=6)
BUDGETS=(512 256 128 64)

run() {  # name methods
  [[ -f $OUT/$1/results.csv ]] && { echo "skip $1"; return; }
  python scripts/evaluate_lengths.py "${COMMON[@]}" --output_dir="$OUT/$1" --methods="$2"
}

methods_of() {  # policy -> its four budgets as methods
  local p=$1 prefix="cache:$1:" out=()
  [[ $p == streaming || $p == lm_infinite ]] && prefix="$p:"
  for b in "${BUDGETS[@]}"; do out+=("$prefix$b"); done
  (IFS=,; echo "${out[*]}")
}

lane() { for p in "$@"; do
  if [[ $p == full ]]; then run full none; else run "$p" "$(methods_of "$p")"; fi
done; }

mkdir -p "$OUT"
lane full snapkv quest rolling streaming > "$OUT/lane1.log" 2>&1 &
lane h2o infllm squeezed lm_infinite > "$OUT/lane2.log" 2>&1 &
wait

#!/usr/bin/env bash
# The selector report (issues 7 and 23). For every model given, the retrieval-vs-δ frontier at
# budgets 1/8 (block size 16) and 1/16 (block size 8: at 16, a 768-token context's 1/16 is the sinks
# and the window alone) with `kvmctl eval --json`:
#   PrHS over τ_cos, the cluster cap, the measured horizon, layer sharing, dense layers, PSAW and the
#   bound's forms; HShare over its query, KV-head and layer sharing; Quest (with and without its
#   dense layers); StreamingLLM; H2O; the oracle as the δ floor;
# target mode δ* 0.1 with the default cap (1/4 of the context) — PrHS's rule when the cap binds
# against always re-anchoring, today's τ_cos 0.8, the bound's forms — and with the cap at the
# whole context; then PrHS's defaults against HShare's, StreamingLLM, H2O and the oracle at more
# text offsets (validation). Writes DIR/eval.jsonl, DIR/eval.csv, DIR/eval_tables.md and PNG plots
# (Debian python3-matplotlib), and DIR/needle.jsonl.
#
# Usage: bench/eval_report.sh DIR [context] [steps] [model_dir...]
#   defaults: context 768, steps 128, models/austen and models/manuals (those that exist).
#   KVM_BUILD_DIR (default build), OFFSETS (validation offsets, default "40000 80000"),
#   NEEDLE_CASES (default 24; 0 skips the needle runs), HSHARE_CHANNELS_<model> overrides a model's
#   calibration file (default MODEL_DIR/hshare_channels.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:?usage: bench/eval_report.sh DIR [context] [steps] [model_dir...]}
ctx=${2:-768}; steps=${3:-128}
shift $(( $# < 3 ? $# : 3 ))
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  for m in models/austen models/manuals; do [ -f "$m/model.bin" ] && models+=("$m"); done
fi
KVMCTL=./${KVM_BUILD_DIR:-build}/tools/kvmctl/kvmctl
mkdir -p "$dir"
jsonl="$dir/eval.jsonl"
: > "$jsonl"
for m in "${models[@]}"; do
  mname=$(basename "$m")
  chvar="HSHARE_CHANNELS_$mname"
  ch=${!chvar:-$m/hshare_channels.txt}
  run() {  # run OFFSET args...
    local off=$1; shift
    echo "eval $mname offset $off $*" >&2
    "$KVMCTL" eval --model "$m/model.bin" --tokens "$m/heldout.u16" --offset "$off" \
      --context "$ctx" --steps "$steps" --json "$@" >> "$jsonl"
  }
  run 0 --selector dense
  for spec in "0.125 16" "0.0625 8"; do
    set -- $spec; frac=$1; bs=$2
    b=(--budget-frac "$frac" --block-size "$bs")
    p=(--selector prhs "${b[@]}")
    run 0 "${p[@]}"                                        # PrHS at its defaults
    for tau in 0.8 0.5 0.3 0; do run 0 "${p[@]}" --tau "$tau"; done
    run 0 "${p[@]}" --tau 0.8 --max-cluster 32             # the settings before issue 23
    for mc in 8 16 32 64; do run 0 "${p[@]}" --max-cluster "$mc"; done
    for rr in 0.02 0.05; do run 0 "${p[@]}" --reuse-regret "$rr"; done
    run 0 "${p[@]}" --layer-sharing
    for dl in 1 2; do run 0 "${p[@]}" --dense-layers "$dl"; done
    run 0 "${p[@]}" --psaw
    for bf in norm centred; do run 0 "${p[@]}" --bound "$bf"; done
    hs=(--selector hshare "${b[@]}" --hshare-channels "$ch")
    run 0 "${hs[@]}"                                       # HShare at its defaults (query share 2)
    for qs in 1 4 8; do run 0 "${hs[@]}" --hshare-query-share "$qs"; done
    run 0 "${hs[@]}" --hshare-shared-kv-heads 0 --hshare-shared-layers 0
    run 0 "${hs[@]}" --hshare-shared-kv-heads 0
    run 0 "${hs[@]}" --hshare-shared-layers 0
    run 0 --selector quest "${b[@]}"
    run 0 --selector quest "${b[@]}" --dense-layers 0
    for s in oracle streaming h2o; do run 0 --selector "$s" "${b[@]}"; done
  done
  # Target mode, δ* 0.1, block size 16.
  t=(--selector prhs --target-delta 0.1)
  for cap in "" "--max-resident-frac 1.0"; do               # the default cap (1/4), the whole context
    run 0 "${t[@]}" $cap
    run 0 "${t[@]}" $cap --no-cap-reuse                    # always re-anchor when the cap binds
    run 0 "${t[@]}" $cap --tau 0.8 --max-cluster 32 --no-cap-reuse  # the settings before issue 23
    for bf in norm centred; do run 0 "${t[@]}" $cap --bound "$bf"; done
    run 0 --selector oracle --target-delta 0.1 $cap
  done
  for dl in 1 2; do run 0 "${t[@]}" --max-resident-frac 1.0 --dense-layers "$dl"; done
  # Validation at other text offsets: the defaults, nothing tuned there.
  for off in ${OFFSETS:-40000 80000}; do
    for spec in "0.125 16" "0.0625 8"; do
      set -- $spec
      b=(--budget-frac "$1" --block-size "$2")
      run "$off" --selector prhs "${b[@]}"
      run "$off" --selector hshare "${b[@]}" --hshare-channels "$ch"
      for s in oracle streaming h2o; do run "$off" --selector "$s" "${b[@]}"; done
    done
    for cap in "" "--max-resident-frac 1.0"; do
      run "$off" "${t[@]}" $cap
      run "$off" "${t[@]}" $cap --no-cap-reuse
      run "$off" --selector oracle --target-delta 0.1 $cap
    done
  done
done
/usr/bin/python3 bench/plot_eval.py "$jsonl" "$dir"
# Needle in a haystack at 1/8 (and PrHS at delta* 0.1) on the first model: only cases dense
# continues correctly count.
if [ "${NEEDLE_CASES:-24}" -gt 0 ]; then
  m=${models[0]}
  : > "$dir/needle.jsonl"
  for s in oracle prhs quest hshare streaming h2o; do
    echo "needle $s" >&2
    "$KVMCTL" needle --model "$m/model.bin" --tokens "$m/heldout.u16" --selector "$s" \
      --budget-frac 0.125 --block-size 4 --context 512 --needle-len 6 --probe-len 4 \
      --cases "${NEEDLE_CASES:-24}" --json >> "$dir/needle.jsonl"
  done
  "$KVMCTL" needle --model "$m/model.bin" --tokens "$m/heldout.u16" --selector prhs \
    --target-delta 0.1 --block-size 4 --context 512 --needle-len 6 --probe-len 4 \
    --cases "${NEEDLE_CASES:-24}" --json >> "$dir/needle.jsonl"
fi

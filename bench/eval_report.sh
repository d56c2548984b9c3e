#!/usr/bin/env bash
# The selector report (issue 7): sweeps every selector over budgets 1/4, 1/8, 1/16, 1/32 and PrHS over
# target deltas 0.2, 0.1, 0.05 with `kvmctl eval --json`, writes DIR/eval.csv and PNG plots (Debian
# python3-matplotlib). Usage: bench/eval_report.sh DIR [context] [steps] [block_size]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:?usage: bench/eval_report.sh DIR [context] [steps] [block_size]}
ctx=${2:-768}; steps=${3:-256}; bs=${4:-4}
KVMCTL=./${KVM_BUILD_DIR:-build}/tools/kvmctl/kvmctl
mkdir -p "$dir"
jsonl="$dir/eval.jsonl"
: > "$jsonl"
run() { echo "eval $*" >&2; "$KVMCTL" eval --context "$ctx" --steps "$steps" --block-size "$bs" --json "$@" >> "$jsonl"; }
run --selector dense
for frac in 0.25 0.125 0.0625 0.03125; do
  for s in oracle prhs quest hshare streaming h2o; do run --selector "$s" --budget-frac "$frac"; done
done
for t in 0.2 0.1 0.05; do
  run --selector prhs --target-delta "$t"
  run --selector oracle --target-delta "$t"
done
/usr/bin/python3 bench/plot_eval.py "$jsonl" "$dir"
# Needle in a haystack at 1/8 (and PrHS at delta* 0.1): only cases dense continues correctly count.
: > "$dir/needle.jsonl"
for s in oracle prhs quest hshare streaming h2o; do
  echo "needle $s" >&2
  "$KVMCTL" needle --selector "$s" --budget-frac 0.125 --block-size "$bs" --context 512 --needle-len 6 --probe-len 4 --cases "${NEEDLE_CASES:-24}" --json >> "$dir/needle.jsonl"
done
"$KVMCTL" needle --selector prhs --target-delta 0.1 --block-size "$bs" --context 512 --needle-len 6 --probe-len 4 --cases "${NEEDLE_CASES:-24}" --json >> "$dir/needle.jsonl"

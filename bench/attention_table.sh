#!/usr/bin/env bash
# The CPU attention table of bench/RESULTS.md: dense vs sparse decode at T = 4K, 32K, 128K and budgets
# 1/8, 1/16, 1/32, block-granular (B 16) and token-granular, Hq 32 Hkv 8 D 128 fp16, batch 1.
set -euo pipefail
cd "$(dirname "$0")/.."
K=./${KVM_BUILD_DIR:-build}/tools/kvmctl/kvmctl
echo "| T | budget | granularity | dense (ms) | sparse (ms) | speedup | dense GB/s | sparse GB/s | memcpy GB/s | idle |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for T in 4096 32768 131072; do
  for f in 0.125 0.0625 0.03125; do
    for g in block token; do
      "$K" bench attention --context $T --budget-frac $f --granularity $g --json 2>/dev/null | /usr/bin/python3 -c '
import json, sys
d = json.load(sys.stdin)
print("| %d | 1/%d | %s | %.3f | %.3f | %.2f | %.2f | %.2f | %.2f | %s |" % (d["context"], round(1 / d["budget_frac"]),
      d["granularity"], d["dense_ms"], d["sparse_ms"], d["speedup"], d["dense_gbps"], d["sparse_gbps"], d["memcpy_gbps"],
      "yes" if d["idle"] else "no"))'
    done
  done
done

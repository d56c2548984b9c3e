#!/usr/bin/env bash
# Builds the libFuzzer target with clang (build-fuzz/, also checks clang's thread-safety analysis)
# and runs it for ${1:-30} seconds on a copy of the committed corpus. New crashers fail the run.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVM_FUZZ=ON \
  -DKVM_WITH_CUDA=OFF >/dev/null
cmake --build build-fuzz -j"$(nproc)" --target frame_fuzzer >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp tests/fuzz/corpus/frame/* "$work/"
./build-fuzz/tests/frame_fuzzer -max_total_time="$secs" -print_final_stats=1 -artifact_prefix="$work/" "$work" 2>&1 |
  grep -E "^(Done|stat::number_of_executed_units|==.*ERROR)" || true
if ls "$work"/crash-* "$work"/leak-* "$work"/timeout-* >/dev/null 2>&1; then
  echo "fuzz: crash found:" "$work"/crash-* >&2
  exit 1
fi
echo "fuzz: no crash in ${secs}s" >&2

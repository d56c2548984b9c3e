#!/usr/bin/env bash
# Builds the libFuzzer targets with clang under ASan+UBSan (build-fuzz/: the libraries with
# -fsanitize=address,undefined and fuzzer coverage, the targets with -fsanitize=fuzzer,address,
# undefined; also checks clang's thread-safety analysis) and runs each target for SECONDS on a copy
# of its committed corpus (tests/fuzz/corpus/<target>/). A crash, leak or timeout fails the run.
#   scripts/fuzz.sh [SECONDS [TARGET...]]   default: 30 s each of frame and handler
#   scripts/fuzz.sh 1800 handler            a long campaign of one target
# Environment: FUZZ_KEEP=DIR keeps the grown corpus, log and artifacts under DIR/<target> (a later
# campaign with the same DIR goes on from that corpus); FUZZ_FLAGS: more libFuzzer flags
# (-fork=2: two fuzzing processes, one per core). One target at a time (run long campaigns under
# `nice -n 19`).
# Prints per target: executions, seconds, exec/s, corpus size before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(frame handler)
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVM_FUZZ=ON \
  -DKVM_WITH_CUDA=OFF -DKVM_SANITIZE=address,undefined -DCMAKE_CXX_FLAGS=-fsanitize=fuzzer-no-link \
  >/dev/null
cmake --build build-fuzz -j"$(nproc)" --target "${targets[@]/%/_fuzzer}" >&2
# Sanitizer reports are crashes (UBSan's too: -fno-sanitize-recover=all); leaks are checked.
# Shorter allocation stacks than the default 30 frames: the handler target allocates a lot.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:malloc_context_size=8}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
failed=0
for t in "${targets[@]}"; do
  if [ -n "${FUZZ_KEEP:-}" ]; then
    work=$FUZZ_KEEP/$t
    mkdir -p "$work"
  else
    work=$(mktemp -d)
  fi
  mkdir -p "$work/corpus" "$work/artifacts"
  find tests/fuzz/corpus/"$t" -type f ! -name VERDICTS -exec cp {} "$work/corpus/" \;
  before=$(find "$work/corpus" -type f | wc -l)
  start=$(date +%s)
  # -max_len: the handler's inputs carry whole Appends (its seeds are up to ~1 KB; payloads can be
  # generated); -timeout: one input may not take 10 s (a hang); -entropic=0: the entropic power
  # schedule's bookkeeping over the handler's large coverage map halves its executions per second.
  ./build-fuzz/tests/"$t"_fuzzer -max_total_time="$secs" -print_final_stats=1 -timeout=10 \
    -max_len=8192 -entropic=0 \
    -artifact_prefix="$work/artifacts/" ${FUZZ_FLAGS:-} "$work/corpus" >"$work/log" 2>&1 || true
  took=$(($(date +%s) - start))
  # With FUZZ_FLAGS=-fork=N (N processes, one store each) the parent's progress lines "#RUNS: cov:"
  # count the executions of all of them (its own final stats count none).
  execs=$(sed -n 's/^#\([0-9]*\): cov:.*/\1/p' "$work/log" | tail -1)
  [ -z "$execs" ] && execs=$(awk '/^stat::number_of_executed_units/ {print $2}' "$work/log" | tail -1)
  execs=${execs:-0}
  after=$(find "$work/corpus" -type f | wc -l)
  echo "fuzz: $t: $execs executions in ${took} s ($((execs / (took > 0 ? took : 1))) exec/s)," \
    "corpus $before -> $after inputs"
  grep -hE "^==[0-9]+==ERROR|^SUMMARY|runtime error|handler_fuzzer:|frame_fuzzer:" "$work/log" | head -20 || true
  if [ -n "$(find "$work/artifacts" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' \
    -o -name 'oom-*' \) | head -1)" ]; then
    echo "fuzz: $t: crash found:" "$work"/artifacts/* >&2
    failed=1
    [ -z "${FUZZ_KEEP:-}" ] && cp -r "$work/artifacts" "fuzz-artifacts-$t" &&
      echo "fuzz: $t: artifacts kept in fuzz-artifacts-$t/" >&2
  fi
  [ -z "${FUZZ_KEEP:-}" ] && rm -rf "$work"
done
[ "$failed" -eq 0 ] && echo "fuzz: no crash in ${secs} s per target" >&2
exit "$failed"

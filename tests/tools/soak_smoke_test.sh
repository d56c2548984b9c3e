#!/usr/bin/env bash
# ctest -L soak: bench/soak.sh end to end in a few seconds (4 clients, 2 short intervals), not the
# soak itself (bench/RESULTS.md "Soak"). A run passes and prints its JSON line (requests, no
# errors, an RSS per interval), and the server is gone after it; a run whose Busy limit cannot be
# met (--max-busy-pct 0) exits 1 and stops the server too. The RSS limit is loosened here: the
# first seconds of a server are all warm-up, so only the mechanics are checked.
#   soak_smoke_test.sh BUILD_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
export KVM_BUILD_DIR=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; cat "$tmp/err" >&2 || true; exit 1; }
args=(--clients 4 --minutes 0 --interval-steps 200 --interval-seconds 30 --tokens 128 --sample-seconds 0.5 --warmup-intervals 1 --json)

# A run that passes.
rc=0
bash bench/soak.sh "${args[@]}" --max-growth-pct 100 > "$tmp/out" 2> "$tmp/err" || rc=$?
[ "$rc" -eq 0 ] || fail "soak exited $rc"
python3 - "$tmp/out" << 'PY' || fail "bad JSON line"
import json, sys
lines = open(sys.argv[1]).read().splitlines()
assert len(lines) == 1, lines
j = json.loads(lines[0])
assert j["pass"] is True and j["failed"] == [], j
assert j["intervals"] == 2 and len(j["rss_by_interval_kib"]) == 2, j
assert all(r and r > 0 for r in j["rss_by_interval_kib"]), j
assert j["requests"] > 0 and j["errors"] == 0 and j["cleanup_errors"] == 0, j
assert j["decode_steps"] == 2 * 4 * 200, j  # every sequence decoded its steps in both intervals
assert len(j["p99_ms_by_interval"]) == 2 and all(p is not None for p in j["p99_ms_by_interval"]), j
for k in ("rss_warm_kib", "rss_end_kib", "rss_growth_pct", "busy", "busy_pct",
          "rss_growth_over_first_pct", "warmup_seconds"):
    assert k in j, k
assert j["warmup_intervals"] == 1 and j["rss_warm_kib"] == j["rss_by_interval_kib"][0], j
assert j["rss_peak"] in ("VmHWM", "samples"), j
PY
pid=$(grep -o 'kvmanager pid [0-9]*' "$tmp/err" | awk '{print $3}')
[ -n "$pid" ] || fail "no server pid in the log"
! [ -e "/proc/$pid" ] || fail "kvmanager $pid still runs after the soak"

# A run that must fail: Busy 0% is not below a 0% limit.
rc=0
bash bench/soak.sh "${args[@]}" --max-growth-pct 100 --max-busy-pct 0 > "$tmp/out" 2> "$tmp/err" || rc=$?
[ "$rc" -eq 1 ] || fail "a failing soak exited $rc, not 1"
grep -q '"pass": false' "$tmp/out" || fail "no failing JSON line"
grep -q 'FAIL: Busy' "$tmp/err" || fail "the summary does not say why it failed"
pid=$(grep -o 'kvmanager pid [0-9]*' "$tmp/err" | awk '{print $3}')
! [ -e "/proc/$pid" ] || fail "kvmanager $pid still runs after a failed soak"
echo "soak smoke: ok" >&2

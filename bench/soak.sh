#!/usr/bin/env bash
# Soak: one kvmanager (loopback, free ports, a temporary data directory) driven by `kvmctl loadgen`
# for minutes, its RSS sampled from /proc/PID/status every few seconds.
#
#   bench/soak.sh [--clients N] [--minutes M] [--interval-steps N] [--interval-seconds S]
#                 [--sequences N] [--tokens T] [--deadline-ms MS] [--sample-seconds S]
#                 [--warmup-seconds S | --warmup-intervals N] [--max-growth-pct P]
#                 [--max-busy-pct P] [--json]
#                 [-- other kvmctl loadgen flags]
#
# Defaults: 64 clients, 10 minutes, one sequence per client, 512-token prompts, intervals of 1000
# decode steps per sequence (at most 120 s each), a 5 s deadline per request, RSS every 2 s.
# Each interval is one `kvmctl loadgen --steps N` run with its own sequences (created, prefilled,
# decoded N steps, deleted once all are done): the same work, so the same bytes stored at its
# peak, interval after interval whatever the machine's speed — the host tier's slots stay resident
# once touched, so time-bounded runs would make the RSS follow the throughput. Intervals follow
# each other until --minutes have passed (at least warm-up + 1; --minutes may be fractional).
# Workload: loadgen's synthetic decoding workers (labelled synthetic), all from one address (the
# server is started with a per-address connection limit above the client count where it has one).
#
# Figures: the server's RSS after warm-up (the peak of the warm-up intervals: those until the first
# --warmup-seconds (60) have passed, at least one; or the --warmup-intervals first) and at the end
# (the peak of the last), their growth in %, the peak of every interval and its growth over the
# first's. An interval's peak is the kernel's high-water mark VmHWM, reset (/proc/PID/clear_refs)
# as the interval starts and read as it ends — the exact peak, where the samples every few seconds
# miss the last seconds before the deletes — or the highest sample where the reset is refused.
# Requests, errors (every failed call but Busy, plus sequences loadgen failed to delete), Busy
# answers and their % of the requests; per interval its seconds, p50/p99 and requests/s. A summary goes to stderr; with --json one JSON line to
# stdout. Exit 1 when the growth is ≥ --max-growth-pct (5), any error, Busy ≥ --max-busy-pct (1) %,
# a loadgen run failed (or hung: killed after S + 300 s) or the server died; 2 for a usage error.
# The server is stopped on every exit path.
#
# Needs build/ (scripts/build.sh) or KVM_BUILD_DIR (e.g. build-deploy).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${KVM_BUILD_DIR:-build}
K=$B/kvmanager/kvmanager
C=$B/tools/kvmctl/kvmctl

clients=64 minutes=10 steps=1000 interval=120 sequences="" tokens=512 deadline=5000 sample=2
warmup="" warmup_seconds=60 max_growth=5 max_busy=1 json=0
extra=()
usage() { sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --clients) clients=$2; shift 2 ;;
    --minutes) minutes=$2; shift 2 ;;
    --interval-steps) steps=$2; shift 2 ;;
    --interval-seconds) interval=$2; shift 2 ;;
    --deadline-ms) deadline=$2; shift 2 ;;
    --sequences) sequences=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    --sample-seconds) sample=$2; shift 2 ;;
    --warmup-intervals) warmup=$2; shift 2 ;;
    --warmup-seconds) warmup_seconds=$2; shift 2 ;;
    --max-growth-pct) max_growth=$2; shift 2 ;;
    --max-busy-pct) max_busy=$2; shift 2 ;;
    --json) json=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) usage ;;
    *) echo "soak: unknown flag $1" >&2; usage ;;
  esac
done
num() { [[ $1 =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "soak: $2 must be a number, got '$1'" >&2; exit 2; }; }
num "$clients" --clients; num "$minutes" --minutes; num "$interval" --interval-seconds
num "$tokens" --tokens; num "$sample" --sample-seconds; num "$steps" --interval-steps
num "$deadline" --deadline-ms; num "$warmup_seconds" --warmup-seconds
[ -z "$warmup" ] || { num "$warmup" --warmup-intervals; [ "$warmup" -ge 1 ] || { echo "soak: --warmup-intervals must be at least 1" >&2; exit 2; }; }
[[ $max_growth =~ ^-?[0-9]+([.][0-9]+)?$ ]] || { echo "soak: --max-growth-pct must be a number" >&2; exit 2; }
[[ $max_busy =~ ^-?[0-9]+([.][0-9]+)?$ ]] || { echo "soak: --max-busy-pct must be a number" >&2; exit 2; }
sequences=${sequences:-$clients}
num "$sequences" --sequences
budget=$(awk -v m="$minutes" 'BEGIN { print m * 60 }')
for f in "$K" "$C"; do [ -x "$f" ] || { echo "soak: $f not built (set KVM_BUILD_DIR)" >&2; exit 2; }; done

dir=$(mktemp -d /tmp/kvm_soak_XXXXXX)
server="" sampler="" loadgen=""
running() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2> /dev/null; }
cleanup() {  # SIGTERM to what still runs, SIGKILL what is left 10 s later
  trap - EXIT INT TERM
  local p
  for p in $loadgen $sampler $server; do kill "$p" 2> /dev/null || true; done
  for p in $loadgen $sampler $server; do
    for _ in $(seq 1 100); do running "$p" || break; sleep 0.1; done
    kill -9 "$p" 2> /dev/null || true
    wait "$p" 2> /dev/null || true
  done
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'echo "soak: interrupted" >&2; exit 130' INT TERM
log() { echo "[soak] $*" >&2; }
# The server runs (a zombie, dead but not yet reaped, does not).
server_alive() { running "$server"; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
admin=$(free_port)
server_flags=()
# (the help text read whole first: `grep -q` closing the pipe early would fail it under pipefail)
if [[ $("$K" --help 2>&1 || true) == *--max-connections-per-address* ]]; then
  server_flags+=(--max-connections-per-address $((2 * clients + 16)))  # every client on 127.0.0.1
fi
"$K" --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" --data-dir "$dir/data" --no-gpu \
  "${server_flags[@]}" > "$dir/server.out" 2> "$dir/server.log" &
server=$!
for _ in $(seq 1 200); do grep -q "listening on" "$dir/server.out" 2> /dev/null && break; sleep 0.1; done
if ! grep -q "listening on" "$dir/server.out"; then
  echo "soak: kvmanager did not start" >&2
  cat "$dir/server.log" >&2
  exit 1
fi
addr=127.0.0.1:$port
log "kvmanager pid $server on $addr ${server_flags[*]}; ${minutes} min of intervals of $steps steps (at most ${interval} s), $clients clients, $sequences sequences, $tokens-token prompts"

# RSS samples: "<unix seconds> <VmRSS kB>", every $sample s while the server lives.
(
  while server_alive; do
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$server/status" 2> /dev/null || true)
    [ -n "$rss" ] && echo "$(date +%s.%N) $rss"
    sleep "$sample"
  done
) > "$dir/rss.log" &
sampler=$!

first_id=$((($(date +%s) % 100000) * 1000000 + 1))
: > "$dir/intervals.log"
failed_runs=0
t_begin=$(date +%s.%N)
i=0
while :; do
  i=$((i + 1))
  server_alive || { log "kvmanager died"; break; }
  start=$(date +%s.%N)
  hwm=1  # the interval's peak: the high-water mark from here (5: reset it to the current RSS)
  echo 5 2> /dev/null > "/proc/$server/clear_refs" || hwm=0
  timeout --kill-after=10 "$(awk -v s="$interval" 'BEGIN { print s + 300 }')" \
    "$C" loadgen --server "$addr" --sequences "$sequences" --clients "$clients" --seconds "$interval" \
    --steps "$steps" --tokens "$tokens" --deadline-ms "$deadline" \
    --first-sequence-id $((first_id + (i - 1) * sequences)) --json "${extra[@]}" \
    > "$dir/run$i.json" 2> "$dir/run$i.progress" &
  loadgen=$!
  rc=0
  wait "$loadgen" || rc=$?
  loadgen=""
  end=$(date +%s.%N)
  if [ "$rc" -ne 0 ] || ! [ -s "$dir/run$i.json" ]; then
    log "interval $i: loadgen exited $rc"
    tail -5 "$dir/run$i.progress" >&2 || true
    failed_runs=$((failed_runs + 1))
    : > "$dir/run$i.json"
  fi
  rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$server/status" 2> /dev/null || true)
  peak=0
  [ "$hwm" -eq 0 ] || peak=$(awk '/^VmHWM:/ { print $2 }' "/proc/$server/status" 2> /dev/null || echo 0)
  echo "$i $start $end $rc ${rss:-0} ${peak:-0}" >> "$dir/intervals.log"  # the RSS at its end too
  log "interval $i: $(python3 -c 'import json,sys
try: j = json.load(open(sys.argv[1]))
except Exception: j = None
print("no result" if not j else "%.1f s, %d requests, %d errors, %d busy, p99 %s ms" % (j["seconds"], j["requests"], j["errors"], j["busy"], j["p99_ms"]))' "$dir/run$i.json"), RSS ${rss} kB"
  elapsed=$(awk -v a="$t_begin" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
  if [ -z "$warmup" ] && awk -v e="$elapsed" -v w="$warmup_seconds" 'BEGIN { exit !(e >= w) }'; then
    warmup=$i  # the warm-up: every interval until --warmup-seconds have passed
    log "warm-up: the first $i interval(s), ${elapsed%.*} s"
  fi
  if [ -n "$warmup" ] && [ "$i" -gt "$warmup" ] && awk -v e="$elapsed" -v b="$budget" 'BEGIN { exit !(e >= b) }'; then break; fi
done
intervals=$i
alive=1
server_alive || alive=0
sleep "$sample"  # one more sample after the last interval

set +e
[ -n "$warmup" ] || warmup=$intervals  # stopped before the warm-up ended: all of it warm-up
python3 - "$dir" "$intervals" "$failed_runs" "$alive" "$max_growth" "$max_busy" "$json" "$clients" \
  "$sequences" "$interval" "$tokens" "$steps" "$deadline" "$warmup" "$warmup_seconds" << 'PY'
import json, sys
d, n, failed_runs, alive = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
max_growth, max_busy, as_json = float(sys.argv[5]), float(sys.argv[6]), sys.argv[7] == "1"
clients, sequences, interval, tokens = int(sys.argv[8]), int(sys.argv[9]), float(sys.argv[10]), int(sys.argv[11])
steps, deadline, warmup = int(sys.argv[12]), int(sys.argv[13]), int(sys.argv[14])
warmup_seconds = float(sys.argv[15])
samples = []
for line in open(f"{d}/rss.log"):
    p = line.split()
    if len(p) == 2:
        samples.append((float(p[0]), int(p[1])))
rows = [l.split() for l in open(f"{d}/intervals.log")]
spans = [(float(r[1]), float(r[2])) for r in rows]
samples += [(float(r[2]), int(r[4])) for r in rows if int(r[4]) > 0]
samples.sort()
runs = []
for i in range(1, len(spans) + 1):
    try:
        runs.append(json.load(open(f"{d}/run{i}.json")))
    except Exception:
        runs.append(None)
hwm = [int(r[5]) if len(r) > 5 else 0 for r in rows]  # 0: no high-water mark (the reset refused)
def peak(i, a, b):
    s = [r for t, r in samples if a <= t <= b] + ([hwm[i]] if hwm[i] > 0 else [])
    return max(s) if s else None
rss_by = [peak(i, a, b) for i, (a, b) in enumerate(spans)]
known = [r for r in rss_by[:warmup] if r]
warm = max(known) if known else None
end = rss_by[-1] if len(rss_by) > warmup else None
growth = 100.0 * (end - warm) / warm if warm and end else None
first = rss_by[0] if rss_by else None
growth_first = 100.0 * (end - first) / first if first and end else None
ok_runs = [r for r in runs if r]
tot = lambda k: sum(r.get(k, 0) or 0 for r in ok_runs)
requests, errors, busy = tot("requests"), tot("errors"), tot("busy")
cleanup_errors, lost = tot("cleanup_errors"), tot("lost_sequences")
busy_pct = 100.0 * busy / requests if requests else None
p99 = [r["p99_ms"] if r else None for r in runs]
fin = [x for x in p99 if x is not None]
short = [i + 1 for i, r in enumerate(runs) if r and r.get("decode_steps", 0) < sequences * steps]
errs = sorted({r["first_error"] for r in ok_runs if r.get("first_error")})
reasons = []
if growth is None or growth >= max_growth:
    reasons.append(f"RSS growth {growth if growth is None else round(growth, 2)}% >= {max_growth}%")
if errors + cleanup_errors > 0:
    reasons.append(f"{errors} errors, {cleanup_errors} failed deletes")
if busy_pct is None or busy_pct >= max_busy:
    reasons.append(f"Busy {busy_pct if busy_pct is None else round(busy_pct, 3)}% >= {max_busy}%")
if failed_runs or len(ok_runs) < n:
    reasons.append(f"{n - len(ok_runs)} loadgen runs failed")
if not alive:
    reasons.append("kvmanager died")
r1 = lambda x: None if x is None else round(x, 1)
out = {
    "pass": not reasons, "minutes": round((spans[-1][1] - spans[0][0]) / 60, 2) if spans else 0,
    "intervals": len(runs), "clients": clients, "sequences": sequences, "tokens": tokens,
    "steps_per_interval": steps, "interval_cap_seconds": interval, "deadline_ms": deadline,
    "rss_warm_kib": warm, "rss_end_kib": end,
    "rss_growth_pct": None if growth is None else round(growth, 3),
    "warmup_intervals": warmup, "warmup_seconds": round(spans[warmup - 1][1] - spans[0][0], 1) if spans else None,
    "rss_growth_over_first_pct": None if growth_first is None else round(growth_first, 3),
    "rss_peak": "VmHWM" if rows and all(h > 0 for h in hwm) else "samples",
    "rss_by_interval_kib": rss_by,
    "rss_growth_by_interval_pct": [round(100.0 * (r - rss_by[0]) / rss_by[0], 2) if r and rss_by[0] else None for r in rss_by],
    "rss_final_kib": samples[-1][1] if samples else None,
    "rss_samples": len(samples),
    "requests": requests, "errors": errors, "cleanup_errors": cleanup_errors, "busy": busy,
    "busy_pct": None if busy_pct is None else round(busy_pct, 4), "lost_sequences": lost,
    "p99_ms_by_interval": p99,
    "p50_ms_by_interval": [r["p50_ms"] if r else None for r in runs],
    "seconds_by_interval": [r1(r["seconds"]) if r else None for r in runs],
    "requests_per_second_by_interval": [r1(r["requests_per_second"]) if r else None for r in runs],
    "decode_steps": tot("decode_steps"),
    "p99_max_over_min": round(max(fin) / min(fin), 3) if fin and min(fin) > 0 else None,
    "intervals_short_of_steps": short, "errors_seen": errs,
    "failed": reasons, "synthetic": True,
}
w = sys.stderr.write
w(f"soak: {len(runs)} intervals ({out['minutes']} min) of {steps} decode steps x {sequences} sequences, {clients} clients (synthetic)\n")
w(f"  RSS after warm-up ({warmup} interval{'s' if warmup > 1 else ''}, {out['warmup_seconds']} s) {warm} kB, at the end {end} kB: growth {out['rss_growth_pct']}% (limit {max_growth}%); over the first interval {out['rss_growth_over_first_pct']}%\n")
w(f"  an interval's RSS: {'its peak (VmHWM)' if out['rss_peak'] == 'VmHWM' else 'its highest sample'}\n")
w(f"  RSS per interval (kB): {rss_by}; over the first (%): {out['rss_growth_by_interval_pct']}\n")
w(f"  {requests} requests, {errors} errors, {cleanup_errors} failed deletes, {busy} Busy ({out['busy_pct']}%, limit {max_busy}%)\n")
w(f"  p99 per interval (ms): {p99}\n")
w(f"  seconds per interval: {out['seconds_by_interval']}; requests/s: {out['requests_per_second_by_interval']}\n")
if short:
    w(f"  intervals that hit the {interval:g} s cap before {steps} steps: {short}\n")
for e in errs:
    w(f"  error: {e}\n")
w("  PASS\n" if not reasons else "  FAIL: " + "; ".join(reasons) + "\n")
if as_json:
    print(json.dumps(out))
sys.exit(0 if not reasons else 1)
PY
status=$?
set -e
if [ "$status" -ne 0 ] && [ "$alive" -eq 0 ]; then tail -20 "$dir/server.log" >&2 || true; fi
exit "$status"

#!/usr/bin/env bash
# kvmctl status against live shards: two kvmanager processes on free loopback ports (a short
# `kvmctl demo` through the first, wrong-token Hellos at the second to make errors/s move), one dead
# address, a silent listener and a shard still opening its store. Checks every key of --json and its
# value against an independent reading of the shard's /metrics and /status (a histogram_quantile
# written here in Python), the version against `kvmanager --version`, down within --timeout-ms,
# the admin port defaulting to port + 1, usage errors, and --watch (frames redrawn, exit 0 on
# SIGINT/SIGTERM, in place on a terminal via script(1)).
# Usage: kvmctl_status_test.sh KVMANAGER KVMCTL
set -u
K=$1; C=$2; fail=0
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
check() { if eval "$2"; then echo "ok: $1"; else echo "FAIL: $1"; fail=1; fi; }
now() { date +%s.%N; }
lt() { python3 -c "import sys; sys.exit(0 if $1 < $2 else 1)"; }

# Free loopback ports: a pair P, P+1 (the admin default is port + 1), or a single one.
free_ports() {  # N [AVOID...]: prints P with P..P+N-1 all free
  python3 - "$@" <<'PY'
import socket, sys
n, avoid = int(sys.argv[1]), {int(a) for a in sys.argv[2:]}
for _ in range(200):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if p + n > 65535 or any(q in avoid for q in range(p, p + n)):
        continue
    ok = True
    for q in range(p, p + n):
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", q))
        except OSError:
            ok = False
        t.close()
    if ok:
        print(p); break
PY
}
start_shard() {  # NAME PORT ADMIN_PORT EXTRA...: starts kvmanager, waits for its start-up line
  local name=$1 port=$2 aport=$3; shift 3
  "$K" --listen "127.0.0.1:$port" --admin "127.0.0.1:$aport" --data-dir "$dir/$name" --no-gpu "$@" \
    > "$dir/$name.out" 2> "$dir/$name.log" &
  pids+=($!)
}
wait_line() { for _ in $(seq 1 150); do grep -q "$1" "$2" 2>/dev/null && return 0; sleep 0.1; done; return 1; }

want=$("$K" --version | head -1 | cut -d' ' -f2)
PA=$(free_ports 2)
PB=$(free_ports 2 "$PA" $((PA + 1)))
DEAD=$(free_ports 1 "$PA" $((PA + 1)) "$PB" $((PB + 1)))
start_shard a "$PA" $((PA + 1)) --host-capacity-bytes 67108864
start_shard b "$PB" $((PB + 1)) --disk-capacity-bytes 1073741824
check "two kvmanager shards started ($PA, $PB; dead address $DEAD)" \
  'wait_line "listening on" "$dir/a.out" && wait_line "listening on" "$dir/b.out" && [ -n "$DEAD" ]'
printf 'dev\n' > "$dir/token"
printf 'wrong\n' > "$dir/wrong"

# Traffic: a short demo through shard a (sequences, tier bytes, dropped mass, stream bytes).
"$C" demo --server "127.0.0.1:$PA" --context 256 --max-new 16 --json > "$dir/demo.json" 2> "$dir/demo.log"
rc=$?
check "kvmctl demo ran through shard a" '[ $rc -eq 0 ] || { tail -3 "$dir/demo.log"; false; }'
# Errors: wrong-token Hellos at shard b while status reads it (each one an Unauthenticated error;
# the admin side points at the dead port, so each try is one Hello and no second read).
( while :; do "$C" status --server "127.0.0.1:$PB" --admin "127.0.0.1:$DEAD" --tenant dev \
    --token-file "$dir/wrong" --timeout-ms 500 > /dev/null 2>&1; sleep 0.05; done ) &
bad_loop=$!
pids+=($bad_loop)
sleep 0.5

servers="127.0.0.1:$PA,127.0.0.1:$PB,127.0.0.1:$DEAD"
t0=$(now)
"$C" status --server "$servers" --tenant dev --token-file "$dir/token" --timeout-ms 1500 --json \
  > "$dir/status.json" 2> "$dir/status.err"
rc=$?; t1=$(now)
kill $bad_loop 2>/dev/null; wait $bad_loop 2>/dev/null
check "status --json exits 1 (one shard is down)" '[ $rc -eq 1 ]'
check "two reads ~1 s apart, the dead shard within its timeout: done in 0.9..3.5 s" \
  'lt 0.9 "$t1 - $t0" && lt "$t1 - $t0" 3.5'
# The independent reading of shard a, right after (idle: its counters no longer move).
python3 - "$((PA + 1))" > "$dir/oracle.json" <<'PY'
import json, sys, urllib.request
port = sys.argv[1]
get = lambda p: urllib.request.urlopen("http://127.0.0.1:%s%s" % (port, p), timeout=5).read().decode()
samples = []
for line in get("/metrics").splitlines():
    if not line or line.startswith("#"):
        continue
    head, value = line.rsplit(" ", 1)
    name, labels = head, {}
    if "{" in head:
        name, rest = head.split("{", 1)
        for part in rest.rstrip("}").split(","):
            if part:
                k, v = part.split("=", 1)
                labels[k] = v.strip('"')
    samples.append((name, labels, float(value)))
print(json.dumps({"status": json.loads(get("/status")), "metrics": samples}))
PY
check "shard a read independently" '[ -s "$dir/oracle.json" ]'

python3 - "$dir/status.json" "$dir/oracle.json" "$want" "$PA" "$PB" "$DEAD" > "$dir/checks.txt" 2>&1 <<'PY'
import json, math, sys
out = json.load(open(sys.argv[1])); oracle = json.load(open(sys.argv[2]))
want, pa, pb, dead = sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
fails = []
def check(name, cond):
    print(("ok: " if cond else "FAIL: ") + name)
    if not cond:
        fails.append(name)
M = oracle["metrics"]
def total(name, **match):
    vals = [v for n, l, v in M if n == name and all(l.get(k) == w for k, w in match.items())]
    return sum(vals) if vals else None
def quantile(q, kind):  # PromQL histogram_quantile over every selector of the kind
    b = {}
    for n, l, v in M:
        if n == "kvm_dropped_mass_bucket" and l.get("kind") == kind:
            b[float(l["le"])] = b.get(float(l["le"]), 0) + v
    les = sorted(b)
    if not les or b[les[-1]] == 0:
        return None
    rank, prev_le, prev_c = q * b[les[-1]], 0.0, 0.0
    for le in les:
        if b[le] >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / (b[le] - prev_c)
        prev_le, prev_c = le, b[le]
def close(a, b):
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))

keys = ["server", "admin", "up", "ready", "degraded", "version", "uptime_seconds", "sequences",
        "tiers", "delta", "bandwidth_saved", "retrievals_per_second", "errors_per_second",
        "rate_interval_seconds", "error"]
shards = out["shards"]
check("top level is {shards: [...]} with the three shards in --server order",
      list(out) == ["shards"] and [s["server"] for s in shards] ==
      ["127.0.0.1:" + pa, "127.0.0.1:" + pb, "127.0.0.1:" + dead])
for s in shards:
    check("%s has exactly the documented keys" % s["server"], list(s) == keys)
    check("%s admin defaults to port + 1" % s["server"],
          s["admin"] == "127.0.0.1:%d" % (int(s["server"].rsplit(":", 1)[1]) + 1))
a, b, d = shards
st = oracle["status"]
check("a: up, ready, not degraded, no error", a["up"] is True and a["ready"] is True and
      a["degraded"] is False and a["error"] is None)
check("a: version %s (kvmanager --version)" % want, a["version"] == want)
check("a: uptime_seconds a number below the oracle's later reading",
      isinstance(a["uptime_seconds"], (int, float)) and 0 < a["uptime_seconds"] <= st["uptime_seconds"])
check("a: sequences as /status says (%s)" % st["sequences"], a["sequences"] == st["sequences"])
for t in ["gpu", "host", "disk"]:
    used, cap = total("kvm_tier_bytes", tier=t), total("kvm_tier_capacity_bytes", tier=t)
    tj = a["tiers"][t]
    check("a: tier %s bytes %s of %s as /metrics says" % (t, used, cap),
          list(tj) == ["bytes", "capacity_bytes", "used_fraction"] and tj["bytes"] == used and
          tj["capacity_bytes"] == cap and
          close(tj["used_fraction"], used / cap if cap else None))
check("a: the host tier capacity is --host-capacity-bytes (the demo's appends allocated it)",
      a["tiers"]["host"]["capacity_bytes"] == 67108864)
check("a: no GPU tier (--no-gpu): capacity 0, fraction null",
      a["tiers"]["gpu"]["capacity_bytes"] == 0 and a["tiers"]["gpu"]["used_fraction"] is None)
for k in ["exact", "bound", "audit"]:
    dk, n = a["delta"][k], total("kvm_dropped_mass_count", kind=k)
    check("a: delta %s n %s, p50 %s, p99 %s as histogram_quantile of /metrics" %
          (k, n, dk["p50"], dk["p99"]),
          list(dk) == ["n", "p50", "p99"] and dk["n"] == n and
          close(dk["p50"], quantile(0.5, k)) and close(dk["p99"], quantile(0.99, k)))
streamed = total("kvm_stream_bytes_total", direction="to_worker")
dense = total("kvm_dense_equivalent_bytes_total")
check("a: bandwidth_saved %s = 1 - %s / %s (null when the denominator is 0)" %
      (a["bandwidth_saved"], streamed, dense),
      close(a["bandwidth_saved"], 1 - streamed / dense if dense else None))
check("a: retrievals/s and errors/s 0 once the demo is over (numbers, not null)",
      a["retrievals_per_second"] == 0 and a["errors_per_second"] == 0)
check("a: the rate interval is the ~1 s between the two reads",
      0.8 <= a["rate_interval_seconds"] <= 2.5)
check("b: up, ready, version %s" % want, b["up"] is True and b["ready"] is True and
      b["version"] == want and b["degraded"] is False)
check("b: errors/s > 0 while wrong tokens are tried (%s)" % b["errors_per_second"],
      isinstance(b["errors_per_second"], (int, float)) and b["errors_per_second"] > 0)
check("b: the disk cap is --disk-capacity-bytes",
      b["tiers"]["disk"]["capacity_bytes"] == 1073741824)
check("dead: down and not ready, with the reason", d["up"] is False and d["ready"] is False and
      "refused" in (d["error"] or ""))
check("dead: nothing it could not read is made up (all null)",
      all(d[k] is None for k in ["degraded", "version", "uptime_seconds", "sequences",
                                 "bandwidth_saved", "retrievals_per_second",
                                 "errors_per_second", "rate_interval_seconds"]) and
      all(v is None for v in d["tiers"].values()) and all(v is None for v in d["delta"].values()))
sys.exit(1 if fails else 0)
PY
rc=$?
cat "$dir/checks.txt"
[ $rc -eq 0 ] || fail=1

# The admin port defaults to port + 1; all up and ready: exit 0.
"$C" status --server "127.0.0.1:$PA" --json > "$dir/one.json"; rc=$?
check "one healthy shard without --admin: exit 0, up and ready on port + 1" \
  '[ $rc -eq 0 ] && python3 -c "import json,sys; s=json.load(open(sys.argv[1]))[\"shards\"][0]; sys.exit(0 if s[\"up\"] and s[\"ready\"] and s[\"admin\"] == \"127.0.0.1:$((PA + 1))\" else 1)" "$dir/one.json"'

# A host name (resolved; localhost may give ::1 first, where nothing listens): up, no error.
"$C" status --server "localhost:$PA" --json > "$dir/named.json"; rc=$?
check "a host name resolves: up and ready, no error left from another address" \
  '[ $rc -eq 0 ] && python3 -c "import json,sys; s=json.load(open(sys.argv[1]))[\"shards\"][0]; sys.exit(0 if s[\"up\"] and s[\"ready\"] and s[\"error\"] is None else 1)" "$dir/named.json"'

# The human form: a row per shard, DOWN for the dead one.
"$C" status --server "$servers" > "$dir/table.txt"; rc=$?
check "the table form: a ready row for a and b, DOWN for the dead one, exit 1" \
  '[ $rc -eq 1 ] && grep -Eq "^127.0.0.1:$PA +up +ready +$want " "$dir/table.txt" && grep -Eq "^127.0.0.1:$PB +up +ready " "$dir/table.txt" && grep -Eq "^127.0.0.1:$DEAD +DOWN +no " "$dir/table.txt"'

# A listener that accepts and never answers: down within --timeout-ms, never a hang.
SILENT=$(free_ports 1 "$PA" $((PA + 1)) "$PB" $((PB + 1)) "$DEAD")
python3 -c "
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', $SILENT)); s.listen(16); print('listening', flush=True)
held = []
while True:
    held.append(s.accept()[0])
" > "$dir/silent.out" &
pids+=($!)
wait_line listening "$dir/silent.out"
t0=$(now)
"$C" status --server "127.0.0.1:$SILENT" --admin "127.0.0.1:$SILENT" --tenant dev \
  --token-file "$dir/token" --timeout-ms 1000 --json > "$dir/silent.json"; rc=$?
t1=$(now)
check "a silent listener: down (Hello unanswered) and not ready, exit 1" \
  '[ $rc -eq 1 ] && python3 -c "import json,sys; s=json.load(open(sys.argv[1]))[\"shards\"][0]; sys.exit(0 if s[\"up\"] is False and s[\"ready\"] is False and \"timed out\" in s[\"error\"] else 1)" "$dir/silent.json"'
check "a silent listener is reported within its 1 s timeout (< 1.8 s)" 'lt "$t1 - $t0" 1.8'

# A shard still opening its store: the control port takes connections (up), /readyz says why not.
PC=$(free_ports 2 "$PA" $((PA + 1)) "$PB" $((PB + 1)) "$DEAD" "$SILENT")
start_shard c "$PC" $((PC + 1)) --test-delay-open-ms 5000
wait_line "admin on" "$dir/c.out"
"$C" status --server "127.0.0.1:$PC" --json > "$dir/opening.json"; rc=$?
check "a shard opening its store: up, not ready ('opening the store'), version known, exit 1" \
  '[ $rc -eq 1 ] && python3 -c "import json,sys; s=json.load(open(sys.argv[1]))[\"shards\"][0]; sys.exit(0 if s[\"up\"] is True and s[\"ready\"] is False and \"opening the store\" in s[\"error\"] and s[\"version\"] == \"$want\" and s[\"sequences\"] is None else 1)" "$dir/opening.json"'

# --watch: redrawn once a second until SIGTERM / SIGINT, then exit 0.
timeout --preserve-status -s TERM 3 "$C" status --server "127.0.0.1:$PA,127.0.0.1:$PB" --watch \
  > "$dir/watch.txt"; rc=$?
frames=$(grep -c '^kvmctl status ' "$dir/watch.txt")
check "--watch under timeout 3 (SIGTERM): exit 0 after $frames frames (>= 2)" '[ $rc -eq 0 ] && [ "$frames" -ge 2 ]'
check "--watch: the first frame waits for rates, a later one has them" \
  'grep -q "rates: from the next frame" "$dir/watch.txt" && grep -q "rates over the last interval" "$dir/watch.txt"'
timeout --preserve-status -s INT 3 "$C" status --server "127.0.0.1:$PA" --watch --json > "$dir/watch.jsonl"; rc=$?
check "--watch --json under SIGINT: exit 0, one JSON object per frame (>= 2)" \
  '[ $rc -eq 0 ] && [ "$(wc -l < "$dir/watch.jsonl")" -ge 2 ] && python3 -c "import json,sys; [json.loads(l)[\"shards\"][0][\"up\"] or sys.exit(1) for l in open(sys.argv[1])]" "$dir/watch.jsonl"'
# On a terminal (script(1) gives it one): redrawn in place (cursor home each frame), tier bars,
# the cursor shown again on exit.
if command -v script > /dev/null; then
  script -qfec "timeout --preserve-status -s INT 3 $C status --server 127.0.0.1:$PA --watch" \
    /dev/null > "$dir/tty.txt" 2>&1; rc=$?
  homes=$(grep -o $'\e\\[H' "$dir/tty.txt" | wc -l)
  check "--watch on a terminal: $homes redraws in place (>= 2), exit 0" '[ $rc -eq 0 ] && [ "$homes" -ge 2 ]'
  check "--watch on a terminal: a bar for the host tier, the cursor restored at exit" \
    'grep -Eq "host +\[#*\.*\]" "$dir/tty.txt" && grep -q $'"'"'\e\[?25h'"'"' "$dir/tty.txt"'
else
  echo "FAIL: script(1) (util-linux) not found: cannot check the terminal view"; fail=1
fi

# Usage errors: exit 2 naming the flag.
"$C" status > /dev/null 2> "$dir/err"; rc=$?
check "no --server: exit 2" '[ $rc -eq 2 ] && grep -q -- "--server" "$dir/err"'
"$C" status --server "127.0.0.1:$PA,127.0.0.1:$PB" --admin "127.0.0.1:1" > /dev/null 2> "$dir/err"; rc=$?
check "--admin with another count than --server: exit 2" '[ $rc -eq 2 ] && grep -q -- "--admin" "$dir/err"'
"$C" status --server "127.0.0.1:$PA" --tenant dev > /dev/null 2> "$dir/err"; rc=$?
check "--tenant without --token-file: exit 2" '[ $rc -eq 2 ] && grep -q -- "--token-file" "$dir/err"'
"$C" status --server nonsense > /dev/null 2> "$dir/err"; rc=$?
check "a --server that is not HOST:PORT: exit 2" '[ $rc -eq 2 ]'

[ $fail -eq 0 ] && echo "kvmctl status: all checks passed"
exit $fail

#!/usr/bin/env bash
# `kvmctl loadgen` against 1 and then 3 local kvmanager shards (loopback, free ports, each shard its
# own data directory), the same workload both times; prints one JSON object per run and a summary
# line with the ratio. Synthetic KV (labelled so by loadgen).
#   bench/loadgen_shards.sh [--sequences N] [--seconds S] [--clients C] [other loadgen flags]
# Defaults: 24 sequences, 10 s, 4 clients. Needs build/ (scripts/build.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${KVM_BUILD_DIR:-build}
K=$B/kvmanager/kvmanager
C=$B/tools/kvmctl/kvmctl
args=(--sequences 24 --seconds 10 --clients 4 "$@")
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done; wait 2> /dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
addr=""
start() {  # NAME: starts a shard (in this shell, so the trap knows its pid); sets $addr
  local p a
  p=$(free_port)
  a=$(free_port)
  "$K" --listen "127.0.0.1:$p" --admin "127.0.0.1:$a" --data-dir "$dir/$1" --no-gpu > "$dir/$1.out" 2> "$dir/$1.log" &
  pids+=($!)
  for _ in $(seq 1 100); do grep -q "listening on" "$dir/$1.out" 2> /dev/null && break; sleep 0.1; done
  grep -q "listening on" "$dir/$1.out" || { echo "shard $1 did not start" >&2; cat "$dir/$1.log" >&2; exit 1; }
  addr="127.0.0.1:$p"
}
run() {  # LABEL SERVER_LIST
  echo "[loadgen_shards] $1: kvmctl loadgen --server $2 ${args[*]}" >&2
  "$C" loadgen --server "$2" "${args[@]}" --json 2> "$dir/$1.progress" | tee "$dir/$1.json"
}
start s0
run one_shard "$addr"
stop_all() { for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done; wait 2> /dev/null || true; pids=(); }
stop_all
three=""
for t in t0 t1 t2; do
  start "$t"
  three+="${three:+,}$addr"
done
run three_shards "$three"
/usr/bin/env python3 - "$dir/one_shard.json" "$dir/three_shards.json" << 'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
r = lambda k: (b[k] / a[k]) if a.get(k) else None
print(json.dumps({"one_shard_rps": a["requests_per_second"], "three_shards_rps": b["requests_per_second"],
                  "ratio_rps": r("requests_per_second"), "one_shard_p99_ms": a["p99_ms"],
                  "three_shards_p99_ms": b["p99_ms"], "errors": [a["errors"], b["errors"]],
                  "synthetic": True}))
PY

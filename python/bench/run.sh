#!/usr/bin/env bash
# Side-by-side save/load throughput (issue 18): the C++ client (kvm_io_bench), the Python binding and
# the vLLM connector's worker path (io_bench.py) against one kvmanager on a free loopback port.
# Usage: python/bench/run.sh [BUILD_DIR [LAYERS KV_HEADS HEAD_DIM TOKENS CHUNK]]   (from the repo root)
set -u
BD=${1:-build}; shift || true
d=$(mktemp -d); P=$(/usr/bin/python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
"$BD/kvmanager/kvmanager" --listen 127.0.0.1:$P --admin 127.0.0.1:$((P+1)) --data-dir $d/data --no-gpu > $d/out 2> $d/log &
pid=$!; trap 'kill $pid; wait $pid 2>/dev/null; rm -rf $d' EXIT
for i in $(seq 100); do grep -q "listening on" $d/out && break; sleep 0.1; done
"$BD/python/kvm_io_bench" 127.0.0.1:$P "$@"
PYTHONPATH=$BD/python /usr/bin/python3 python/bench/io_bench.py 127.0.0.1:$P "$@"

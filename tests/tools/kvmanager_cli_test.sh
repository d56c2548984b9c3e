#!/usr/bin/env bash
# The kvmanager executable: --help, usage errors naming the flag or config field (exit 2), start on a
# free port, accept a TCP connection, stop cleanly on SIGTERM. Usage: kvmanager_cli_test.sh KVMANAGER
set -u
K=$1; fail=0
dir=$(mktemp -d); trap 'rm -rf "$dir"' EXIT
check() { if eval "$2"; then echo "ok: $1"; else echo "FAIL: $1"; fail=1; fi; }
"$K" --help > "$dir/help" 2>&1; rc=$?
check "--help exits 0 and documents --data-dir" '[ $rc -eq 0 ] && grep -q -- "--data-dir" "$dir/help"'
"$K" --bogus > /dev/null 2> "$dir/err"; rc=$?
check "unknown flag exits 2" '[ $rc -eq 2 ] && grep -q bogus "$dir/err"'
"$K" --listen nonsense > /dev/null 2> "$dir/err"; rc=$?
check "bad --listen exits 2 naming it" '[ $rc -eq 2 ] && grep -q -- "--listen" "$dir/err"'
printf 'listen: 127.0.0.1:0\nfrobnicate: 3\n' > "$dir/bad.yaml"
"$K" --config "$dir/bad.yaml" > /dev/null 2> "$dir/err"; rc=$?
check "unknown config field exits 2 naming it" '[ $rc -eq 2 ] && grep -q frobnicate "$dir/err"'
printf 'io_threads: many\n' > "$dir/bad2.yaml"
"$K" --config "$dir/bad2.yaml" > /dev/null 2> "$dir/err"; rc=$?
check "bad config value exits 2 naming the field" '[ $rc -eq 2 ] && grep -q io_threads "$dir/err"'
printf 'listen: 127.0.0.1:0\ntenants:\n  - name: a\n    token: t\n' > "$dir/good.yaml"
"$K" --config "$dir/good.yaml" --admin 127.0.0.1:0 --data-dir "$dir/data" > "$dir/out" 2> "$dir/log" &
pid=$!
for _ in $(seq 1 100); do grep -q "listening on" "$dir/out" && break; sleep 0.1; done
port=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$dir/out")
check "prints the chosen port" '[ -n "$port" ] && [ "$port" -gt 0 ]'
check "accepts a TCP connection on it" '(exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null'
aport=$(sed -n 's/.*admin on 127.0.0.1:\([0-9]*\).*/\1/p' "$dir/out")
http_get() { exec 4<>/dev/tcp/127.0.0.1/$aport; printf 'GET %s HTTP/1.0\r\n\r\n' "$1" >&4; cat <&4; exec 4<&-; }
check "admin /healthz answers 200" 'http_get /healthz | head -1 | grep -q "200"'
check "admin /metrics lists kvm_sequences" 'http_get /metrics | grep -q "^kvm_sequences 0"'
check "admin /status is JSON with the control address" 'http_get /status | grep -q "\"control\": \"127.0.0.1:$port\""'
kill -TERM $pid; wait $pid; rc=$?
check "SIGTERM stops it cleanly (exit 0)" '[ $rc -eq 0 ] && grep -q stopped "$dir/log"'
check "RocksDB files in the data dir" '[ -f "$dir/data/CURRENT" ]'
[ $fail -eq 0 ] && echo "kvmanager cli: all checks passed"
exit $fail

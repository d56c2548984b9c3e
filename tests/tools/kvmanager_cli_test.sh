#!/usr/bin/env bash
# The kvmanager executable: --help, --version, usage errors naming the flag or config field (exit 2),
# --check-config (good and bad configs, opens no store and binds no port), --tenants-file with
# token_file, start on a free port, accept a TCP connection, stop cleanly on SIGTERM.
# Usage: kvmanager_cli_test.sh KVMANAGER
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
check "--help offers no token flag (tokens come from files)" '! grep -q -- "--token" "$dir/help"'

# --version: the project version of the source tree's CMakeLists.txt and the build's options.
src=$(cd "$(dirname "$0")/../.." && pwd)
want=$(sed -n 's/^project(kvmanager VERSION \([0-9.]*\).*/\1/p' "$src/CMakeLists.txt")
"$K" --version > "$dir/ver" 2>&1; rc=$?
check "--version exits 0 and prints the project version ($want)" \
  '[ $rc -eq 0 ] && [ -n "$want" ] && head -1 "$dir/ver" | grep -qx "kvmanager $want"'
check "--version names the build options (CUDA, UCX, sanitizer)" \
  'grep -Eq "CUDA (on|off)" "$dir/ver" && grep -Eq "UCX [0-9]+\.[0-9]+" "$dir/ver" && grep -q "sanitizer" "$dir/ver"'

# --check-config: every field of the config file, validated, nothing opened.
cat > "$dir/full.yaml" <<YAML
listen: 127.0.0.1:7420
admin: 127.0.0.1:7421
data_dir: $dir/never-created
host_capacity_bytes: 1073741824
disk_capacity_bytes: 0
sync: false
gpu: false
gpu_capacity_bytes: 0
io_threads: 1
worker_threads: 2
max_in_flight: 1024
max_frame_bytes: 268435456
session_timeout_ms: 10000
request_deadline_ms: 30000
data_plane: ucx
ucx_error_mode: none
tenants:
  - name: inline
    token: inline-token
    loopback_only: true
YAML
"$K" --check-config --config "$dir/full.yaml" > "$dir/out" 2> "$dir/err"; rc=$?
check "--check-config accepts a config with every field (config ok, exit 0)" \
  '[ $rc -eq 0 ] && grep -qx "config ok" "$dir/out"'
check "--check-config opens no store (data dir not created)" '[ ! -e "$dir/never-created" ]'
check "--check-config reports the configured host tier" 'grep -q "host tier 1073741824 bytes" "$dir/out"'
check "--check-config prints no token" '! grep -q inline-token "$dir/out" "$dir/err"'
"$K" --check-config > "$dir/out" 2>&1; rc=$?
check "--check-config of the embedded default: ok, host tier from memory (cgroup named)" \
  '[ $rc -eq 0 ] && grep -qx "config ok" "$dir/out" && grep -q "cgroup memory.max" "$dir/out"'
bad_config() {  # name, yaml text, word the message must contain
  want_msg=$3
  printf '%b' "$2" > "$dir/bad.yaml"
  "$K" --check-config --config "$dir/bad.yaml" > "$dir/out" 2> "$dir/err"; rc=$?
  check "--check-config rejects $1 (exit 2, names '$3')" \
    '[ $rc -eq 2 ] && grep -q -- "$want_msg" "$dir/err" && ! grep -q "config ok" "$dir/out"'
}
bad_config "an unknown field" 'listen: 127.0.0.1:0\nhost_capacity: 5\n' "unknown field 'host_capacity'"
bad_config "a number of the wrong type" 'max_in_flight: lots\n' "max_in_flight"
bad_config "a negative count" 'worker_threads: -1\n' "worker_threads"
bad_config "a bool of the wrong type" 'sync: maybe\n' "sync"
bad_config "a list where a value goes" 'listen: [a, b]\n' "listen"
bad_config "an empty value" 'data_dir:\n' "data_dir"
bad_config "a float byte count" 'host_capacity_bytes: 1.5e+09\n' "host_capacity_bytes"
bad_config "a bad data_plane" 'data_plane: rdma\n' "data_plane"
bad_config "a bad listen address" 'listen: nowhere\n' "listen"
bad_config "zero io threads" 'io_threads: 0\n' "io_threads"
bad_config "a tenant without a token" 'tenants:\n  - name: a\n' "tenants\[0\]': needs token"
bad_config "an unknown tenant field" 'tenants:\n  - name: a\n    tokn: x\n' "unknown field 'tokn'"
bad_config "an empty tenants list" 'tenants: []\n' "tenants"
bad_config "a duplicate tenant" 'tenants:\n  - {name: a, token: x}\n  - {name: a, token: y}\n' "listed twice"
# A port in use does not matter: --check-config binds nothing (checked again below, while the
# service holds its port).

# --tenants-file: token_file relative to the tenants file, its trailing newline stripped.
mkdir -p "$dir/secret"
printf 'alpha-secret\n' > "$dir/secret/alpha.token"      # 12 bytes + newline
printf 'beta\r\n' > "$dir/secret/beta.token"              # 4 bytes + CRLF
cat > "$dir/secret/tenants.yaml" <<YAML
tenants:
  - name: alpha
    token_file: alpha.token
  - name: beta
    token_file: $dir/secret/beta.token
    loopback_only: true
  - name: gamma
    token: gamma-inline
YAML
"$K" --check-config --tenants-file "$dir/secret/tenants.yaml" > "$dir/out" 2> "$dir/err"; rc=$?
check "--tenants-file with token_file: config ok" '[ $rc -eq 0 ] && grep -qx "config ok" "$dir/out"'
check "--tenants-file replaces the development tenant" \
  'grep -q "^tenants: alpha" "$dir/out" && ! grep -q "dev" "$dir/out"'
check "token_file read with its trailing newline stripped (12 and 4 bytes)" \
  'grep -q "alpha (token of 12 bytes)" "$dir/out" && grep -q "beta (token of 4 bytes, loopback only)" "$dir/out"'
check "tokens from files are never printed" '! grep -q -e alpha-secret -e gamma-inline "$dir/out" "$dir/err"'
printf -- '- name: solo\n  token_file: alpha.token\n' > "$dir/secret/bare.yaml"
"$K" --check-config --tenants-file "$dir/secret/bare.yaml" > "$dir/out" 2>&1; rc=$?
check "--tenants-file also takes a bare list" '[ $rc -eq 0 ] && grep -q "solo (token of 12 bytes)" "$dir/out"'
bad_tenants() {  # name, yaml text, word the message must contain
  want_msg=$3
  printf '%b' "$2" > "$dir/secret/bad.yaml"
  "$K" --check-config --tenants-file "$dir/secret/bad.yaml" > "$dir/out" 2> "$dir/err"; rc=$?
  check "--tenants-file rejects $1 (exit 2, names '$3')" \
    '[ $rc -eq 2 ] && grep -q -- "$want_msg" "$dir/err" && ! grep -q "config ok" "$dir/out"'
}
bad_tenants "a missing token_file" '- name: a\n  token_file: nope.token\n' "token_file"
: > "$dir/secret/empty.token"
bad_tenants "an empty token_file" '- name: a\n  token_file: empty.token\n' "empty"
bad_tenants "token and token_file together" '- {name: a, token: x, token_file: alpha.token}\n' "not both"
bad_tenants "another top-level field" 'tenants: []\nextra: 1\n' "unknown field 'extra'"
bad_tenants "a bad loopback_only" '- {name: a, token: x, loopback_only: sometimes}\n' "loopback_only"
"$K" --check-config --tenants-file "$dir/missing.yaml" > /dev/null 2> "$dir/err"; rc=$?
check "--tenants-file that does not exist exits 2 naming it" '[ $rc -eq 2 ] && grep -q "missing.yaml" "$dir/err"'

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
"$K" --check-config --listen "127.0.0.1:$port" --admin "127.0.0.1:$aport" > "$dir/cc" 2>&1; rc=$?
check "--check-config binds no port (ok on the ports the running service holds)" \
  '[ $rc -eq 0 ] && grep -qx "config ok" "$dir/cc"'
check "the start-up lines give the host tier size" 'grep -q "^kvmanager host tier: [0-9]* bytes" "$dir/out"'
kill -TERM $pid; wait $pid; rc=$?
check "SIGTERM stops it cleanly (exit 0)" '[ $rc -eq 0 ] && grep -q stopped "$dir/log"'
check "RocksDB files in the data dir" '[ -f "$dir/data/CURRENT" ]'
[ $fail -eq 0 ] && echo "kvmanager cli: all checks passed"
exit $fail

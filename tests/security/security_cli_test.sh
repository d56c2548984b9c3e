#!/usr/bin/env bash
# kvmanager's TLS flags end to end (ctest -L security): certificates made here with the openssl CLI
# (make_certs.sh); --check-config with the flags and the YAML fields (tls_cert, tls_key,
# tls_client_ca, admin_tls, dev_tenant); a shard with mutual TLS and --admin-tls: /metrics over
# HTTPS (curl), a plaintext client refused with one log line and counted while a TLS client is
# served, kvmctl status and kvmctl demo over mutual TLS, a wrong token refused and counted, TLS 1.1
# refused, --no-dev-tenant; certificates reloaded when their files change (renamed in, as Kubernetes
# does) and on SIGHUP while a loadgen session stays open, a bad file keeping the current ones; the
# same for a rotated token file and a broken tenants file.
# Usage: security_cli_test.sh KVMANAGER KVMCTL
set -u
K=$(realpath "$1"); C=$(realpath "$2"); fail=0
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
check() { if eval "$2"; then echo "ok: $1"; else echo "FAIL: $1"; fail=1; fi; }
wait_line() { for _ in $(seq 1 200); do grep -q "$1" "$2" 2>/dev/null && return 0; sleep 0.1; done; return 1; }
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

bash "$here/make_certs.sh" "$dir/certs" || { echo "FAIL: make_certs.sh"; exit 1; }
cd "$dir"
printf 'tokA\n' > tokA
printf 'wrong\n' > wrong
cat > tenants.yaml <<EOF
tenants:
  - {name: a, token_file: tokA}
EOF

# ---- --check-config ----
cat > config.yaml <<EOF
tls_cert: certs/server.crt
tls_key: certs/server.key
tls_client_ca: certs/ca.crt
admin_tls: true
dev_tenant: false
tenants:
  - {name: a, token_file: tokA}
EOF
out=$("$K" --config config.yaml --check-config 2>&1); rc=$?
check "--check-config accepts the YAML TLS fields (paths relative to the file)" \
  '[ $rc -eq 0 ] && grep -q "^tls: TLS 1.2+ with .*server.crt, client certificates signed by .*ca.crt; admin port HTTPS" <<< "$out" || { echo "$out"; false; }'
out=$("$K" --tls-cert certs/server.crt --tls-key certs/server.key --tls-client-ca certs/ca.crt \
  --admin-tls --check-config 2>&1); rc=$?
check "--check-config accepts --tls-cert --tls-key --tls-client-ca --admin-tls" \
  '[ $rc -eq 0 ] && grep -q "admin port HTTPS" <<< "$out" || { echo "$out"; false; }'
out=$("$K" --tls-cert certs/server.crt --check-config 2>&1); rc=$?
check "--tls-cert without --tls-key: exit 2 naming both" \
  '[ $rc -eq 2 ] && grep -q "tls-key" <<< "$out" || { echo "$out"; false; }'
out=$("$K" --tls-cert certs/server.crt --tls-key certs/other-server.key --check-config 2>&1); rc=$?
check "a key that does not match the certificate: exit 2" \
  '[ $rc -eq 2 ] && grep -q "mismatch\|does not match" <<< "$out" || { echo "$out"; false; }'
out=$("$K" --tls-cert certs/nope.crt --tls-key certs/server.key --check-config 2>&1); rc=$?
check "an unreadable certificate: exit 2 naming it" \
  '[ $rc -eq 2 ] && grep -q "nope.crt" <<< "$out" || { echo "$out"; false; }'
out=$("$K" --admin-tls --check-config 2>&1); rc=$?
check "--admin-tls without a certificate: exit 2" '[ $rc -eq 2 ] || { echo "$out"; false; }'
out=$("$K" --no-dev-tenant --check-config 2>&1); rc=$?
check "--no-dev-tenant without tenants: exit 2 (no silent development tenant)" \
  '[ $rc -eq 2 ] && grep -q "development tenant is off" <<< "$out" || { echo "$out"; false; }'
out=$("$K" --no-dev-tenant --tenants-file tenants.yaml --check-config 2>&1); rc=$?
check "--no-dev-tenant with a tenants file: ok, no dev tenant" \
  '[ $rc -eq 0 ] && grep -q "^tenants: a (" <<< "$out" || { echo "$out"; false; }'
out=$("$K" --check-config 2>&1)
check "the default: the loopback-only development tenant, TLS off" \
  'grep -q "dev (token of 3 bytes, loopback only)" <<< "$out" && grep -q "^tls: off" <<< "$out"'

# ---- a shard with mutual TLS and an HTTPS admin port ----
P=$(free_port); A=$(free_port)
"$K" --listen "127.0.0.1:$P" --admin "127.0.0.1:$A" --data-dir "$dir/data" --no-gpu \
  --tenants-file tenants.yaml --no-dev-tenant --tls-cert certs/server.crt \
  --tls-key certs/server.key --tls-client-ca certs/ca.crt --admin-tls > out.txt 2> log.txt &
pid=$!
check "kvmanager with --tls-cert --tls-key --tls-client-ca --admin-tls started" \
  'wait_line "listening on" out.txt && grep -q "kvmanager tls: TLS 1.2+" out.txt || { cat log.txt; false; }'
metric() {  # NAME: its value from /metrics over HTTPS
  curl -sS --max-time 5 --cacert certs/ca.crt "https://127.0.0.1:$A/metrics" |
    awk -v n="$1" '$1 == n {print $2}'
}
check "/metrics over HTTPS (curl --cacert): kvm_tls_handshake_failures_total 0" \
  '[ "$(metric kvm_tls_handshake_failures_total)" = 0 ]'
check "the admin port refuses plain HTTP" \
  '! curl -sS --max-time 5 "http://127.0.0.1:$A/healthz" > /dev/null 2>&1'
check "/readyz over HTTPS answers ready" \
  '[ "$(curl -sS --max-time 5 --cacert certs/ca.crt "https://127.0.0.1:$A/readyz")" = ready ]'

# A plaintext client (kvmctl status without --tls-ca: Hello in the clear): refused, one log line.
"$C" status --server "127.0.0.1:$P" --admin "127.0.0.1:$A" --tenant a --token-file tokA \
  --timeout-ms 2000 --json > plain.json 2> plain.err
check "a plaintext client on the TLS port is not served" \
  'python3 -c "import json,sys; s=json.load(open(\"plain.json\"))[\"shards\"][0]; sys.exit(0 if not s[\"up\"] else 1)"'
sleep 0.3
check "... refused with one clear log line" \
  '[ "$(grep -c "TLS handshake from 127.0.0.1:[0-9]* refused: .*(a plaintext client on the TLS port?)" log.txt)" = 1 ] || { cat log.txt; false; }'
check "... counted: kvm_tls_handshake_failures_total 1" \
  '[ "$(metric kvm_tls_handshake_failures_total)" = 1 ]'

# kvmctl status over mutual TLS, the admin port over HTTPS (--admin-tls).
"$C" status --server "127.0.0.1:$P" --admin "127.0.0.1:$A" --tenant a --token-file tokA \
  --tls-ca certs/ca.crt --tls-cert certs/client.crt --tls-key certs/client.key --admin-tls \
  --timeout-ms 3000 --json > tls.json 2> tls.err; rc=$?
check "kvmctl status --tls-ca --tls-cert --tls-key --admin-tls: exit 0, up (TLS handshake, Hello, Heartbeat) and ready (/readyz, /status, /metrics over HTTPS)" \
  '[ $rc -eq 0 ] && python3 -c "import json,sys; s=json.load(open(\"tls.json\"))[\"shards\"][0]; sys.exit(0 if s[\"up\"] and s[\"ready\"] and s[\"sequences\"] is not None else 1)" || cat tls.json'
"$C" status --server "127.0.0.1:$P" --admin "127.0.0.1:$A" --tenant a --token-file tokA \
  --tls-ca certs/ca.crt --timeout-ms 3000 --json > nocert.json 2> /dev/null
check "kvmctl status over TLS without the client certificate: down" \
  'python3 -c "import json,sys; s=json.load(open(\"nocert.json\"))[\"shards\"][0]; sys.exit(0 if not s[\"up\"] else 1)"'
"$C" status --server "127.0.0.1:$P" --admin "127.0.0.1:$A" --tenant a --token-file tokA \
  --tls-ca certs/ca.crt --tls-cert certs/other-client.crt --tls-key certs/other-client.key \
  --timeout-ms 3000 --json > other.json 2> /dev/null
check "kvmctl status with another CA's client certificate: down" \
  'python3 -c "import json,sys; s=json.load(open(\"other.json\"))[\"shards\"][0]; sys.exit(0 if not s[\"up\"] else 1)"'
check "kvm_tls_handshake_failures_total 3" '[ "$(metric kvm_tls_handshake_failures_total)" = 3 ]'
"$C" status --server "127.0.0.1:$P" --tls-cert certs/client.crt --tls-key certs/client.key \
  > /dev/null 2> usage.err; rc=$?
check "kvmctl status --tls-cert without --tls-ca: usage error" \
  '[ $rc -eq 2 ] && grep -q "only with --tls-ca" usage.err'
"$C" status --server "127.0.0.1:$P" --admin-tls > /dev/null 2> usage.err; rc=$?
check "kvmctl status --admin-tls without --tls-ca: usage error" \
  '[ $rc -eq 2 ] && grep -q "admin-tls: needs --tls-ca" usage.err'

# A wrong token over TLS: Unauthenticated, counted.
check "kvm_auth_failures_total 0 before" '[ "$(metric kvm_auth_failures_total)" = 0 ]'
"$C" status --server "127.0.0.1:$P" --admin "127.0.0.1:$A" --tenant a --token-file wrong \
  --tls-ca certs/ca.crt --tls-cert certs/client.crt --tls-key certs/client.key --timeout-ms 3000 \
  --json > wrong.json 2> /dev/null
check "a wrong token over mutual TLS: Unauthenticated" \
  'grep -q "Unauthenticated" wrong.json || cat wrong.json'
check "... kvm_auth_failures_total 1" '[ "$(metric kvm_auth_failures_total)" = 1 ]'

# A short demo through the shard over mutual TLS.
"$C" demo --server "127.0.0.1:$P" --context 256 --max-new 8 --tenant a --token-file tokA \
  --tls-ca certs/ca.crt --tls-cert certs/client.crt --tls-key certs/client.key --json \
  > demo.json 2> demo.err; rc=$?
check "kvmctl demo --server --tls-ca --tls-cert --tls-key: decodes through the TLS shard" \
  '[ $rc -eq 0 ] && python3 -c "import json; json.load(open(\"demo.json\"))" || tail -5 demo.err'

# TLS 1.1 is refused; TLS 1.2 and 1.3 are served.
check "openssl s_client -tls1_2 with the client certificate: handshake ok" \
  'openssl s_client -connect "127.0.0.1:$P" -tls1_2 -CAfile certs/ca.crt -cert certs/client.crt -key certs/client.key -verify_return_error < /dev/null > s12.txt 2>&1 && grep -q "Protocol  : TLSv1.2" s12.txt'
check "openssl s_client -tls1_3: handshake ok" \
  'openssl s_client -connect "127.0.0.1:$P" -tls1_3 -CAfile certs/ca.crt -cert certs/client.crt -key certs/client.key -verify_return_error < /dev/null > s13.txt 2>&1 && grep -q "TLSv1.3" s13.txt'
before=$(metric kvm_tls_handshake_failures_total)
check "openssl s_client -tls1_1 (client at security level 0): refused" \
  '! openssl s_client -connect "127.0.0.1:$P" -tls1_1 -cipher "DEFAULT:@SECLEVEL=0" -cert certs/client.crt -key certs/client.key < /dev/null > s11.txt 2>&1'
sleep 0.2
check "... counted, with its log line" \
  '[ "$(metric kvm_tls_handshake_failures_total)" = $((before + 1)) ] && grep -q "TLS 1.2 or newer only" log.txt || { cat s11.txt; tail -3 log.txt; false; }'
"$C" status --server "127.0.0.1:$P" --admin "127.0.0.1:$A" --tenant a --token-file tokA \
  --tls-ca certs/ca.crt --tls-cert certs/client.crt --tls-key certs/client.key --timeout-ms 3000 \
  --json > after.json 2> /dev/null
up_with_main() {
  "$C" status --server "127.0.0.1:$P" --admin "127.0.0.1:$A" --tenant a --token-file tokA \
    --tls-ca certs/ca.crt --tls-cert certs/client.crt --tls-key certs/client.key --timeout-ms 3000 \
    --json 2> /dev/null |
    python3 -c "import json,sys; sys.exit(0 if json.load(sys.stdin)['shards'][0]['up'] else 1)"
}
check "the shard still serves TLS clients after all of it" \
  'python3 -c "import json,sys; s=json.load(open(\"after.json\"))[\"shards\"][0]; sys.exit(0 if s[\"up\"] else 1)" && kill -0 $pid'

# A flood of 60 plaintext connections: all counted, the log bounded (20 lines per 10 s).
before=$(metric kvm_tls_handshake_failures_total)
python3 - "$P" <<'PY'
import socket, sys
for _ in range(60):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    s.settimeout(2)
    try:
        s.sendall(b"KVM0" + b"\0" * 60)
        s.recv(100)
    except OSError:
        pass
    s.close()
PY
for _ in $(seq 50); do [ "$(metric kvm_tls_handshake_failures_total)" = $((before + 60)) ] && break; sleep 0.1; done
check "a flood of 60 plaintext connections: all 60 counted" \
  '[ "$(metric kvm_tls_handshake_failures_total)" = $((before + 60)) ]'
check "... the log bounded: at most 20 refusal lines" \
  '[ "$(grep -c "TLS handshake from .* refused" log.txt)" -le 20 ] || tail -3 log.txt'
check "... and TLS clients are served" 'up_with_main'
kill -TERM "$pid"; wait "$pid"; rc=$?; pid=""
check "SIGTERM: clean stop" '[ $rc -eq 0 ]'

# ---- certificates reloaded when their files change and on SIGHUP, without dropping sessions ----
mkdir live
cp certs/server.crt live/tls.crt; cp certs/server.key live/tls.key
P=$(free_port); A=$(free_port)
"$K" --listen "127.0.0.1:$P" --admin "127.0.0.1:$A" --data-dir "$dir/data2" --no-gpu \
  --tenants-file tenants.yaml --tls-cert live/tls.crt --tls-key live/tls.key > out2.txt 2> log2.txt &
pid=$!
check "a TLS shard on live/tls.crt started" 'wait_line "listening on" out2.txt || { cat log2.txt; false; }'
up_with() {  # CA [TOKEN_FILE]: 0 when kvmctl status over TLS verified against CA finds the shard up
  "$C" status --server "127.0.0.1:$P" --admin "127.0.0.1:$A" --tenant a --token-file "${2:-tokA}" \
    --tls-ca "$1" --timeout-ms 3000 --json 2> /dev/null |
    python3 -c "import json,sys; sys.exit(0 if json.load(sys.stdin)['shards'][0]['up'] else 1)"
}
check "clients trusting ca are served" 'up_with certs/ca.crt'
# A session open across the rotation: loadgen over TLS for 6 s.
"$C" loadgen --server "127.0.0.1:$P" --sequences 2 --seconds 6 --tokens 64 --tenant a \
  --token-file tokA --tls-ca certs/ca.crt --json > loadgen.json 2> loadgen.err &
lg=$!
sleep 1.5
# As Kubernetes updates a mounted Secret: new files swapped in by rename, no signal.
cp certs/other-server.crt live/new.crt; cp certs/other-server.key live/new.key
mv live/new.key live/tls.key; mv live/new.crt live/tls.crt
check "a change of the files is picked up within 3 s (no signal)" \
  'for _ in $(seq 30); do grep -q "TLS files changed: TLS certificates reloaded" log2.txt && break; sleep 0.1; done; grep -q "TLS files changed: TLS certificates reloaded" log2.txt || { cat log2.txt; false; }'
check "new connections get the new certificate (trusted by other-ca, no longer by ca)" \
  'up_with certs/other-ca.crt && ! up_with certs/ca.crt'
wait $lg; rc=$?
check "the session open across the rotation was not dropped (loadgen: exit 0, 0 errors)" \
  '[ $rc -eq 0 ] && python3 -c "import json,sys; d=json.load(open(\"loadgen.json\")); sys.exit(0 if d[\"errors\"] == 0 and d[\"requests\"] > 0 else 1)" || { cat loadgen.json; tail -3 loadgen.err; false; }'
# A half-written pair (a certificate that is not PEM): the reload fails, the current one stays.
failed=$(grep -c "TLS reload failed, the current certificates stay" log2.txt)
echo garbage > live/tls.crt
reload_failed() { [ "$(grep -c "TLS reload failed, the current certificates stay" log2.txt)" -gt "$failed" ]; }
check "a bad certificate file: the reload fails with its reason, the current certificate stays" \
  'for _ in $(seq 30); do reload_failed && break; sleep 0.1; done; reload_failed && up_with certs/other-ca.crt'
# SIGHUP: the ca-signed pair back (written in place), then the signal.
cat certs/server.key > live/tls.key; cat certs/server.crt > live/tls.crt
kill -HUP "$pid"
check "SIGHUP reloads (and the shard keeps running)" \
  'for _ in $(seq 30); do grep -q "SIGHUP: TLS certificates reloaded" log2.txt && break; sleep 0.1; done; grep -q "SIGHUP: TLS certificates reloaded" log2.txt && kill -0 $pid'
check "after SIGHUP clients trusting ca are served again" 'up_with certs/ca.crt'

# ---- tokens rotated: the tenant's token_file renamed over, no signal; a session stays open ----
cp tokA tokA.old
"$C" loadgen --server "127.0.0.1:$P" --sequences 2 --seconds 5 --tokens 64 --tenant a \
  --token-file tokA --tls-ca certs/ca.crt --json > loadgen2.json 2> loadgen2.err &
lg=$!
sleep 1.5
printf 'tokB\n' > tokA.new; mv tokA.new tokA
check "a rotated token file is picked up within 3 s (no signal)" \
  'for _ in $(seq 30); do grep -q "tenant files changed: tenants reloaded (1;" log2.txt && break; sleep 0.1; done; grep -q "tenant files changed: tenants reloaded (1;" log2.txt || { cat log2.txt; false; }'
check "the old token is refused, the new one served" '! up_with certs/ca.crt tokA.old && up_with certs/ca.crt tokA'
wait $lg; rc=$?
check "the session authenticated with the old token was not dropped (loadgen: exit 0, 0 errors)" \
  '[ $rc -eq 0 ] && python3 -c "import json,sys; d=json.load(open(\"loadgen2.json\")); sys.exit(0 if d[\"errors\"] == 0 and d[\"requests\"] > 0 else 1)" || { cat loadgen2.json; tail -3 loadgen2.err; false; }'
cp tenants.yaml tenants.good
printf 'tenants:\n  - {name: a}\n' > tenants.yaml
check "a broken tenants file: the reload fails naming the field, the current tenants stay" \
  'for _ in $(seq 30); do grep -q "tenants reload failed, the current tenants stay: .*needs token or token_file" log2.txt && break; sleep 0.1; done; grep -q "tenants reload failed" log2.txt && up_with certs/ca.crt tokA'
cp tenants.good tenants.yaml
kill -HUP "$pid"
check "SIGHUP re-reads the tenants too" \
  'for _ in $(seq 30); do grep -q "SIGHUP: tenants reloaded" log2.txt && break; sleep 0.1; done; grep -q "SIGHUP: tenants reloaded" log2.txt && up_with certs/ca.crt tokA'
kill -TERM "$pid"; wait "$pid"; rc=$?; pid=""
check "SIGTERM: clean stop" '[ $rc -eq 0 ]'
exit $fail

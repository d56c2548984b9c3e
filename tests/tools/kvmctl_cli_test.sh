#!/usr/bin/env bash
# kvmctl's command-line contracts: usage errors exit 2 naming the flag; --json prints exactly one
# JSON object with the documented keys. Usage: kvmctl_cli_test.sh KVMCTL MODEL_DIR
set -u
K=$1; M=$2; fail=0
expect_usage() {  # expect_usage "text in stderr" args...
  local want=$1; shift
  local err; err=$("$K" "$@" 2>&1 >/dev/null); local rc=$?
  if [ $rc -ne 2 ] || ! grep -q -- "$want" <<<"$err"; then
    echo "FAIL: kvmctl $* -> rc $rc, stderr: $err (wanted rc 2 and '$want')"; fail=1
  else echo "ok: kvmctl $* -> usage error naming '$want'"; fi
}
common=(--model "$M/model.bin" --tokens "$M/heldout.u16")
expect_usage "exceeds the checkpoint's trained length" eval "${common[@]}" --context 1000 --steps 100 --selector prhs --budget-frac 0.125
expect_usage "--selector" eval "${common[@]}" --context 100 --steps 10 --selector nope --budget-frac 0.125
expect_usage "--budget" eval "${common[@]}" --context 100 --steps 10 --selector quest
expect_usage "--context" eval "${common[@]}" --steps 10 --selector dense
expect_usage "unknown flag --bogus" eval "${common[@]}" --bogus 1
expect_usage "--budget-frac" eval "${common[@]}" --context 100 --steps 10 --selector prhs --budget-frac abc
expect_usage "exactly one of --prompt and --tokens" generate --model "$M/model.bin" --tokenizer "$M/tokenizer.model" --prompt x --tokens y
expect_usage "--head-dim" bench attention --head-dim 48
expect_usage "--in-flight" bench transport --in-flight 0
expect_usage "--runs" bench transport --runs 0
# bench transport --json: medians of --runs interleaved rounds with their spread; latency is null
# with more than one reply in flight (not measured then).
for n in 1 3; do
  out=$(KVM_BENCH_NO_WAIT=1 "$K" bench transport --tls inproc --blocks 8 --messages 12 --runs 3 \
    --in-flight $n --json 2>/dev/null)
  if /usr/bin/python3 - "$out" "$n" <<'PY'
import json, statistics, sys
d, n = json.loads(sys.argv[1]), int(sys.argv[2])
need = ["tls", "blocks_per_message", "block_bytes", "messages", "in_flight", "runs", "ours_gbps",
        "reference_gbps", "ratio", "ratio_min", "ratio_max", "ours_gbps_runs", "reference_gbps_runs",
        "reference", "latency_p50_us", "latency_p99_us", "lanes", "idle", "ours_send", "faster_send", "modes",
        "service_gbps", "service_ratio", "service_ratio_min", "service_ratio_max", "service_gbps_runs",
        "service_send", "service_latency_p50_us"]
missing = [k for k in need if k not in d]
assert not missing, missing
assert d["in_flight"] == n and d["runs"] == 3 and len(d["ours_gbps_runs"]) == 3, d
assert len(d["reference_gbps_runs"]) == 3 and sorted(d["modes"]) == ["copy", "iov", "runs", "service"], d
close = lambda a, b: abs(a - b) <= 0.0015 + 1e-3 * abs(b)
assert close(d["ours_gbps"], statistics.median(d["ours_gbps_runs"])), d
assert close(d["reference_gbps"], statistics.median(d["reference_gbps_runs"])), d
assert close(d["ratio"], d["ours_gbps"] / d["reference_gbps"]), d
ratios = [o / r for o, r in zip(d["ours_gbps_runs"], d["reference_gbps_runs"])]
assert close(d["ratio_min"], min(ratios)) and close(d["ratio_max"], max(ratios)), (ratios, d)
# In-process the service copies (Transport::GatherPays), so "ours" is the copy send.
assert d["service_send"] == "copy" and d["ours_send"] == "copy", d
assert d["ours_gbps_runs"] == d["modes"]["copy"]["gbps_runs"], d
assert d["service_gbps_runs"] == d["modes"]["service"]["gbps_runs"], d
assert close(d["service_ratio"], d["service_gbps"] / d["reference_gbps"]), d
sratios = [o / r for o, r in zip(d["service_gbps_runs"], d["reference_gbps_runs"])]
assert close(d["service_ratio_min"], min(sratios)) and close(d["service_ratio_max"], max(sratios)), d
assert (d["service_latency_p50_us"] is None) == (n > 1), d
for m in d["modes"].values():
    assert close(m["gbps"], statistics.median(m["gbps_runs"])) and m["gbps"] > 0, m
    assert (m["latency_p50_us"] is None) == (n > 1) and (m["latency_p99_us"] is None) == (n > 1), m
PY
  then echo "ok: bench transport --in-flight $n --json: medians of 3 rounds, spread, latency iff 1 in flight"
  else echo "FAIL: bench transport --in-flight $n --json: $out"; fail=1; fi
done
out=$("$K" eval "${common[@]}" --context 96 --steps 6 --selector prhs --budget-frac 0.5 --block-size 4 --json 2>/dev/null)
if /usr/bin/python3 - "$out" <<'PY'
import json, sys
d = json.loads(sys.argv[1])
need = ["selector", "context", "steps", "budget_tokens", "block_size", "delta_mean", "delta_p50", "delta_p99", "delta_max",
        "oracle_delta_mean", "target_delta", "within_target_fraction", "bound_violations", "retrieval_overhead",
        "attended_fraction", "streamed_bytes_fraction", "top1_agreement", "nll_dense", "nll_sparse", "perplexity_ratio"]
missing = [k for k in need if k not in d]
assert not missing, missing
assert d["selector"] == "prhs" and d["steps"] == 6 and d["within_target_fraction"] is None and d["bound_violations"] == 0
PY
then echo "ok: eval --json is one object with every documented key"; else echo "FAIL: eval --json: $out"; fail=1; fi
expect_usage "--target-delta" demo --selector streaming --target-delta 0.1
expect_usage "--kv-dtype" demo --kv-dtype fp8
# demo --json: starts its own kvmanager (found next to kvmctl), one object with the contract's keys.
out=$("$K" demo --max-new 24 --context 200 --json 2>/dev/null)
if /usr/bin/python3 - "$out" <<'PY'
import json, sys
d = json.loads(sys.argv[1])
need = ["tokens", "delta_mean", "delta_p99", "delta_kind", "within_target_fraction", "retrieval_overhead",
        "streamed_bytes", "dense_offload_bytes", "tokens_per_second", "transport"]
missing = [k for k in need if k not in d]
assert not missing, missing
assert d["tokens"] == 24 and d["transport"] in ("tcp", "ucx", "inproc"), d
assert 0 < d["streamed_bytes"] < d["dense_offload_bytes"], d
assert 0 <= d["delta_mean"] <= 1 and 0 <= d["within_target_fraction"] <= 1 and d["retrieval_overhead"] > 0, d
PY
then echo "ok: demo --json is one object with every documented key"; else echo "FAIL: demo --json: $out"; fail=1; fi
# eval --generate through the service (a kvmanager started here, UCX and TCP data paths) and
# in-process: the same selector and budget generate identical tokens. --no-gpu: on a machine with a
# GPU the service would score on the device, whose float rounding may break a near-tie differently.
KVMANAGER=$(dirname "$K")/../../kvmanager/kvmanager
data=$(mktemp -d); log=$data/log
"$KVMANAGER" --listen 127.0.0.1:0 --admin 127.0.0.1:0 --data-dir "$data/db" --no-gpu >"$log" 2>&1 &
kpid=$!
for _ in $(seq 100); do grep -q "listening on" "$log" && break; sleep 0.1; done
addr=$(grep -o "listening on [^ ]*" "$log" | cut -d' ' -f3)
ev=(eval "${common[@]}" --context 512 --steps 32 --selector prhs --budget-frac 0.125 --generate --json)
a=$("$K" "${ev[@]}" 2>/dev/null); b=$("$K" "${ev[@]}" --server "$addr" 2>/dev/null)
c=$("$K" "${ev[@]}" --server "$addr" --transport tcp 2>/dev/null)
# Cross-layer sharing: the sharing layers' blocks come in their source layer's batch, ahead of
# their queries (no retrieval of their own), and the tokens still match the in-process run.
d=$("$K" "${ev[@]}" --layer-sharing 2>/dev/null); e=$("$K" "${ev[@]}" --layer-sharing --server "$addr" 2>/dev/null)
kill -TERM $kpid; wait $kpid; rm -rf "$data"
if /usr/bin/python3 - "$d" "$e" <<'PY'
import json, sys
d, e = (json.loads(x) for x in sys.argv[1:3])
assert d["generated"] == e["generated"], (d["generated"], e["generated"])
assert e["shared_prefetches"] > 0, e
assert e["service_round_trips"] < 32 * 6, e  # fewer than one per (step, layer)
assert e["delta_mean"] is not None and 0 <= e["delta_mean"] <= 1, e  # sharing layers' unknowns left out
PY
then echo "ok: layer sharing through the service: prefetched blocks, same tokens"; else echo "FAIL: layer sharing through the service: $d / $e"; fail=1; fi
if /usr/bin/python3 - "$a" "$b" "$c" <<'PY'
import json, sys
a, b, c = (json.loads(x) for x in sys.argv[1:4])
assert len(a["generated"]) == 32 and a["transport"] == "inproc", a
assert b["transport"] == "ucx" and c["transport"] == "tcp", (b["transport"], c["transport"])
assert a["generated"] == b["generated"] == c["generated"], (a["generated"], b["generated"], c["generated"])
assert a["retrieval_overhead"] == b["retrieval_overhead"] == c["retrieval_overhead"]
PY
then echo "ok: eval --generate through the service (ucx, tcp) = in-process, token for token"; else echo "FAIL: eval through the service: $a / $b / $c"; fail=1; fi
# The service killed -9 in the middle of a decode: the worker fails with a clear error, promptly.
data=$(mktemp -d); log=$data/log
"$KVMANAGER" --listen 127.0.0.1:0 --admin 127.0.0.1:0 --data-dir "$data/db" >"$log" 2>&1 &
kpid=$!
for _ in $(seq 100); do grep -q "listening on" "$log" && break; sleep 0.1; done
addr=$(grep -o "listening on [^ ]*" "$log" | cut -d' ' -f3)
"$K" demo --server "$addr" --context 256 --max-new 760 --target-delta 0 --budget-frac 0.25 \
  >/dev/null 2>"$data/demo.err" &
dpid=$!
# Kill it once the worker is decoding (its progress line says so), not after a guessed delay.
for _ in $(seq 300); do grep -q "\] decode " "$data/demo.err" 2>/dev/null && break; sleep 0.1; done
grep -q "\] decode " "$data/demo.err" || { echo "FAIL: the demo never started decoding"; fail=1; }
kill -9 $kpid; wait $kpid 2>/dev/null
t0=$(date +%s); wait $dpid; drc=$?; t1=$(date +%s)
if [ $drc -ne 0 ] && [ $((t1 - t0)) -le 35 ] && grep -q "Unavailable\|TimedOut" "$data/demo.err"; then
  echo "ok: service killed mid-decode -> worker error in $((t1 - t0)) s: $(grep -o 'Unavailable.*\|TimedOut.*' "$data/demo.err" | head -1)"
else echo "FAIL: service killed mid-decode: rc $drc after $((t1 - t0)) s: $(cat "$data/demo.err" | tail -3)"; fail=1; fi
rm -rf "$data"
[ $fail -eq 0 ] && echo "kvmctl cli: all contract checks passed"
exit $fail

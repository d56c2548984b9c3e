#!/usr/bin/env bash
# The Helm chart helm/kvmanager, offline (no cluster): helm lint --strict; helm template with the
# default values, with values-cluster.yaml (3 shards + ServiceMonitor + NetworkPolicy +
# PrometheusRule + dashboard + PDB), values-existing-secret.yaml and values-tls.yaml; every
# rendered object validated against the Kubernetes and prometheus-operator schemas and checked by
# validate.mjs; the rendered config, tenants and container arguments accepted by the real
# `kvmanager --check-config`; schema violations rejected by helm template.
# Usage: chart_test.sh KVMANAGER   (tools from scripts/install-tools.sh, in
# ${KVM_TOOLS_DIR:-$HOME/.cache/kvmanager-tools}). A missing tool fails the test.
set -u
K=${1:?usage: chart_test.sh KVMANAGER}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
chart="$root/helm/kvmanager"
tools=${KVM_TOOLS_DIR:-$HOME/.cache/kvmanager-tools}
HELM="$tools/bin/helm"
fail=0
check() { if eval "$2"; then echo "ok: $1"; else echo "FAIL: $1"; fail=1; fi; }
missing() { echo "FAIL: $1 — run scripts/install-tools.sh (scripts/install-deps.sh does)" >&2; exit 1; }
[ -x "$HELM" ] || missing "helm not found at $HELM"
command -v node > /dev/null || missing "node not found on PATH"
[ -d "$tools/node/node_modules/kubernetes-models" ] || missing "kubernetes-models not found in $tools/node/node_modules"
[ -x "$K" ] || { echo "FAIL: kvmanager binary $K not found" >&2; exit 1; }

dir=$(mktemp -d); trap 'rm -rf "$dir"' EXIT
export HELM_CACHE_HOME="$dir/helm/cache" HELM_CONFIG_HOME="$dir/helm/config" HELM_DATA_HOME="$dir/helm/data"
export KUBECONFIG=/dev/null
# validate.mjs imports the packages by name (their subpath exports): run it next to their node_modules.
mkdir -p "$dir/js"
cp "$here/validate.mjs" "$dir/js/"
ln -s "$tools/node/node_modules" "$dir/js/node_modules"

"$HELM" lint --strict "$chart" > "$dir/lint" 2>&1; rc=$?
check "helm lint --strict (default values)" '[ $rc -eq 0 ] && grep -q "0 chart(s) failed" "$dir/lint"' || cat "$dir/lint"
for v in values-cluster.yaml values-existing-secret.yaml values-tls.yaml; do
  "$HELM" lint --strict "$chart" -f "$here/$v" > "$dir/lint" 2>&1; rc=$?
  check "helm lint --strict -f $v" '[ $rc -eq 0 ]' || cat "$dir/lint"
done

# One case: NAME SHARDS PVC EXISTING_SECRET MONITORING TLS FEED [helm args...]
# FEED=yes runs the real kvmanager --check-config on the rendered arguments and files.
run_case() {
  local name=$1 shards=$2 pvc=$3 secret=$4 mon=$5 tls=$6 feed=$7; shift 7
  local out="$dir/$name"; mkdir -p "$out"
  "$HELM" template rel "$chart" --namespace kvm "$@" > "$out/rendered.yaml" 2> "$out/err"; rc=$?
  check "[$name] helm template renders" '[ $rc -eq 0 ]' || { cat "$out/err"; return; }
  cat > "$out/expect.json" <<JSON
{"release": "rel", "namespace": "kvm", "shards": $shards, "pvcSize": "$pvc", "existingSecret": "$secret",
 "monitoring": $mon, "tls": $tls, "workerPortRange": ${WORKER_RANGE:-[47000, 47099]}, "rulesFile": "$chart/rules/kvmanager.rules.yaml",
 "dashboardFile": "$chart/dashboards/kvmanager.json"}
JSON
  (cd "$dir/js" && node validate.mjs "$out/rendered.yaml" "$out/expect.json" "$out") > "$out/validate" 2>&1; rc=$?
  sed "s/^/  [$name] /" "$out/validate"
  check "[$name] every rendered object valid and as promised" '[ $rc -eq 0 ]'
  [ "$feed" = yes ] || return 0
  if [ -n "$secret" ]; then  # what the user's Secret would hold
    mkdir -p "$out/tenants"
    printf 'prod-token-0123456789\n' > "$out/tenants/prod.token"
    printf 'tenants:\n  - name: prod\n    token_file: prod.token\n' > "$out/tenants/tenants.yaml"
  fi
  mapfile -t args < "$out/args"
  "$K" --check-config "${args[@]}" > "$out/check" 2>&1; rc=$?
  sed "s/^/  [$name] kvmanager: /" "$out/check"
  check "[$name] the real kvmanager --check-config accepts the rendered args, config and tenants" \
    '[ $rc -eq 0 ] && grep -qx "config ok" "$out/check"'
}
run_case default 1 20Gi "" false false yes
WORKER_RANGE="[48000, 48255]" run_case cluster 3 50Gi "" true false yes -f "$here/values-cluster.yaml"
check "[cluster] the host tier set in values reaches the binary as an integer" \
  'grep -q "host tier 17179869184 bytes" "$dir/cluster/check"'
check "[cluster] both tenants reach the binary" 'grep -q "^tenants: team-a (token of 41 bytes), team-b (token of 32 bytes)" "$dir/cluster/check"'
run_case existing-secret 1 10Gi kvmanager-tenants-prod false false yes -f "$here/values-existing-secret.yaml"
check "[existing-secret] the Secret's tenant (token file, newline stripped) reaches the binary" \
  'grep -q "^tenants: prod (token of 21 bytes)" "$dir/existing-secret/check"'
# TLS: the flags are rendered, but the binary does not take them yet (no --check-config run).
run_case tls 1 20Gi "" true true no -f "$here/values-tls.yaml" --set prometheusRule.enabled=true \
  --set networkPolicy.enabled=true --set podDisruptionBudget.enabled=true --set grafanaDashboard.enabled=true
check "[tls] probes and scrapes switch to HTTPS" \
  'grep -q "scheme: HTTPS" "$dir/tls/rendered.yaml" && grep -q "scheme: https" "$dir/tls/rendered.yaml"'

# A mutated config must be refused by the binary: the check above can fail.
printf 'listen: 0.0.0.0:7420\nhost_capacity: 1\n' > "$dir/bad.yaml"
"$K" --check-config --config "$dir/bad.yaml" --tenants-file "$dir/default/tenants/tenants.yaml" > /dev/null 2>&1; rc=$?
check "kvmanager --check-config refuses a config field it does not know (exit 2)" '[ $rc -eq 2 ]'

# Schema violations and chart errors, rejected by helm template.
reject() {  # what, message to find, helm args...
  local what=$1 msg=$2; shift 2
  "$HELM" template rel "$chart" "$@" > /dev/null 2> "$dir/err"; rc=$?
  check "helm template rejects $what" '[ $rc -ne 0 ] && grep -q -- "$msg" "$dir/err"' || cat "$dir/err"
}
reject "--set shards=three" "shards" --set shards=three
reject "shards=0" "shards" --set shards=0
reject "an unknown config field" "bogus" --set config.bogus=1
reject "a config field the chart owns (listen)" "listen" --set config.listen=0.0.0.0:1
reject "data_plane outside ucx|none" "data_plane" --set config.data_plane=rdma
reject "a string where the host tier bytes go" "host_capacity_bytes" --set-string config.host_capacity_bytes=16Gi
reject "io_threads 0" "io_threads" --set config.io_threads=0
reject "runAsNonRoot false" "runAsNonRoot" --set podSecurityContext.runAsNonRoot=false
reject "a typo at the top level" "shard" --set shard=3
reject "tls without a Secret" "tls.secretName" --set tls.enabled=true
reject "a tenant listed twice" "listed twice" --set 'tenants.list[0].name=a' --set 'tenants.list[1].name=a'
reject "no tenants and no existing Secret" "no client could authenticate" --set 'tenants.list=null'

[ $fail -eq 0 ] && echo "chart: all checks passed"
exit $fail

#!/usr/bin/env bash
# The chart's Prometheus rules and Grafana dashboard: promtool check rules and promtool test rules
# (rules_test.yaml) on helm/kvmanager/rules/kvmanager.rules.yaml; the dashboard's JSON checked by
# dashboard_check.mjs and its expressions (variables substituted) parsed by promtool.
# Usage: rules_test.sh   (needs promtool from Debian's prometheus package and node; a missing tool
# fails the test)
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
rules="$root/helm/kvmanager/rules/kvmanager.rules.yaml"
fail=0
check() { if eval "$2"; then echo "ok: $1"; else echo "FAIL: $1"; fail=1; fi; }
command -v promtool > /dev/null || { echo "FAIL: promtool not found (apt-get install prometheus; scripts/install-deps.sh does)" >&2; exit 1; }
command -v node > /dev/null || { echo "FAIL: node not found on PATH (Node.js 20 or later)" >&2; exit 1; }
dir=$(mktemp -d); trap 'rm -rf "$dir"' EXIT

promtool check rules "$rules" > "$dir/check" 2>&1; rc=$?
check "promtool check rules $(basename "$rules")" '[ $rc -eq 0 ] && grep -q SUCCESS "$dir/check"' || cat "$dir/check"
(cd "$here" && promtool test rules rules_test.yaml) > "$dir/test" 2>&1; rc=$?
check "promtool test rules rules_test.yaml" '[ $rc -eq 0 ] && grep -q SUCCESS "$dir/test"' || cat "$dir/test"
check "every alert and recording rule is exercised by rules_test.yaml" \
  'for n in $(sed -n "s/^ *- \(alert\|record\): *//p" "$rules"); do grep -q -- "$n" "$here/rules_test.yaml" || { echo "  not tested: $n"; false; } || exit 1; done'

node "$here/dashboard_check.mjs" "$root/helm/kvmanager/dashboards/kvmanager.json" \
  "$root/kvmanager/src/metrics.cc" "$dir/dashboard-rules.json" > "$dir/dash" 2>&1; rc=$?
grep -v '^ok:' "$dir/dash" | sed 's/^/  /'
check "dashboard JSON sanity ($(grep -c '^ok:' "$dir/dash") checks)" '[ $rc -eq 0 ]'
promtool check rules "$dir/dashboard-rules.json" > "$dir/dcheck" 2>&1; rc=$?
check "every dashboard expression parses (promtool, variables substituted)" '[ $rc -eq 0 ]' || cat "$dir/dcheck"

[ $fail -eq 0 ] && echo "rules and dashboard: all checks passed"
exit $fail

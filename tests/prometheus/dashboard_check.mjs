// Sanity of the Grafana dashboard helm/kvmanager/dashboards/kvmanager.json, against the metric
// families kvmanager/src/metrics.cc registers.
//
//   node dashboard_check.mjs DASHBOARD.json METRICS.cc RULES_OUT.json
//
// Checks: schemaVersion pinned; template variables datasource, namespace, instance and no other;
// every panel (rows aside) has targets with an expression on the ${datasource} data source; every
// expression matches instance=~"$instance" and namespace=~"$namespace"; every rate/increase is over
// $__rate_interval; the panels the issue asks for exist; every metric is a family metrics.cc
// registers (or one of the pending health gauges) and every literal label value is one it knows.
// RULES_OUT receives the expressions with the variables substituted (.* and 1m) as a Prometheus
// rule file, for `promtool check rules` to parse them. Exit 0 when every check passed.
import { readFileSync, writeFileSync } from "node:fs";

const [dashPath, metricsPath, rulesOut] = process.argv.slice(2);
if (!rulesOut) {
  console.error("usage: node dashboard_check.mjs DASHBOARD.json METRICS.cc RULES_OUT.json");
  process.exit(2);
}
let failures = 0;
function check(what, ok, detail = "") {
  if (ok) console.log(`ok: ${what}`);
  else {
    failures++;
    console.log(`FAIL: ${what}${detail ? ` (${detail})` : ""}`);
  }
}

const dash = JSON.parse(readFileSync(dashPath, "utf8"));
const metricsSrc = readFileSync(metricsPath, "utf8");
// Families registered in metrics.cc (.Name("kvm_...")); histograms add _bucket, _count, _sum.
const families = new Set([...metricsSrc.matchAll(/\.Name\("(kvm_\w+)"\)/g)].map((m) => m[1]));
// The health gauges the metrics work adds (issue 17 item 3); no labels.
const pending = new Set(["kvm_ready", "kvm_degraded"]);
const knownValues = new Set([...metricsSrc.matchAll(/"([a-z_]+)"/g)].map((m) => m[1]));
check(`metrics.cc registers kvm_ families (${families.size})`, families.size >= 10);

check("schemaVersion is pinned (an integer)", Number.isInteger(dash.schemaVersion), `${dash.schemaVersion}`);
check("a stable uid", typeof dash.uid === "string" && dash.uid.length > 0);
const vars = (dash.templating?.list || []).map((v) => v.name);
check("template variables are datasource, namespace, instance only",
      JSON.stringify(vars) === JSON.stringify(["datasource", "namespace", "instance"]), vars.join(","));
const v = Object.fromEntries((dash.templating?.list || []).map((x) => [x.name, x]));
check("datasource is a Prometheus data source variable", v.datasource?.type === "datasource" && v.datasource?.query === "prometheus");
for (const n of ["namespace", "instance"])
  check(`${n} is a multi-value query variable whose All is .*`,
        v[n]?.type === "query" && v[n]?.includeAll === true && v[n]?.allValue === ".*");

const panels = [];
const walk = (ps) => ps.forEach((p) => { panels.push(p); walk(p.panels || []); });
walk(dash.panels || []);
const ids = panels.map((p) => p.id);
check("panel ids are unique", new Set(ids).size === ids.length);
const graphs = panels.filter((p) => p.type !== "row");
const exprs = [];
for (const p of graphs) {
  const t = p.targets || [];
  check(`panel "${p.title}" has targets`, t.length > 0 && t.every((x) => typeof x.expr === "string" && x.expr.trim()));
  check(`panel "${p.title}" queries the \${datasource} variable`,
        p.datasource?.uid === "${datasource}" && t.every((x) => x.datasource?.uid === "${datasource}"));
  check(`panel "${p.title}" has a grid position`, p.gridPos && p.gridPos.w > 0 && p.gridPos.h > 0);
  for (const x of t) exprs.push({ panel: p.title, expr: x.expr });
}
for (const { panel, expr } of exprs) {
  // Every vector selector: a metric name followed by {...}; each must carry both matchers.
  const selectors = [...expr.matchAll(/\b(kvm_\w+)(\{[^}]*\})?/g)];
  const bare = selectors.filter((m) => !m[2] || !m[2].includes('instance=~"$instance"') || !m[2].includes('namespace=~"$namespace"'));
  check(`"${panel}": every selector matches instance=~"$instance" and namespace=~"$namespace"`, bare.length === 0,
        bare.map((m) => m[0]).join(" "));
  const ranges = [...expr.matchAll(/\[([^\]]+)\]/g)].map((m) => m[1]);
  check(`"${panel}": ranges are $__rate_interval`, ranges.every((r) => r === "$__rate_interval"), ranges.join(","));
  for (const m of selectors) {
    const fam = m[1].replace(/_(bucket|count|sum)$/, "");
    check(`"${panel}": ${m[1]} is a family metrics.cc registers${pending.has(fam) ? " (pending: the metrics work adds it)" : ""}`,
          families.has(m[1]) || families.has(fam) || pending.has(fam));
    for (const lv of (m[2] || "").matchAll(/(\w+)="([^"$]*)"/g))
      check(`"${panel}": label value ${lv[1]}="${lv[2]}" is one metrics.cc knows`, knownValues.has(lv[2]));
  }
}
const titles = graphs.map((p) => p.title.toLowerCase());
for (const want of ["dropped mass p50 / p99", "fraction over target", "bandwidth saved", "streamed bytes/s by transport",
                    "retrieval overhead", "gate outcomes", "request latency p99 by op", "tier bytes vs capacity",
                    "evictions and promotions", "errors by code", "sequences", "gpu tier use", "ready", "degraded"])
  check(`a panel "${want}"`, titles.some((t) => t.startsWith(want)));
const all = exprs.map((e) => e.expr).join("\n");
for (const [what, re] of [
  ["histogram_quantile over kvm_dropped_mass_bucket by kind and selector", /histogram_quantile\(0\.99, sum by \(selector, kind, le\) \(rate\(kvm_dropped_mass_bucket/],
  ["over-target fraction = over_target_total / count", /kvm_dropped_mass_over_target_total[^/]*\/\s*sum by \(kind\) \(rate\(kvm_dropped_mass_count/],
  ["bandwidth saved = 1 - to_worker stream / dense-equivalent", /1 - sum\(rate\(kvm_stream_bytes_total\{direction="to_worker"[^/]*\/\s*sum\(rate\(kvm_dense_equivalent_bytes_total/],
  ["retrieval overhead = retrievals / gate checks", /kvm_retrievals_total[^/]*\/\s*sum\(rate\(kvm_gate_checks_total/],
  ["gate outcomes by result", /sum by \(result\) \(rate\(kvm_gate_checks_total/],
  ["latency p99 by op", /histogram_quantile\(0\.99, sum by \(op, le\) \(rate\(kvm_request_duration_seconds_bucket/],
  ["GPU tier bytes", /kvm_tier_bytes\{tier="gpu"/],
]) check(`expression: ${what}`, re.test(all));

// The expressions as recording rules with the variables substituted, for promtool to parse.
const rules = exprs.map((e, i) => ({
  record: `dashboard:panel_${i}`,
  expr: e.expr.replaceAll("$instance", ".*").replaceAll("$namespace", ".*").replaceAll("$__rate_interval", "1m"),
}));
writeFileSync(rulesOut, JSON.stringify({ groups: [{ name: "dashboard", rules }] }, null, 2));
check(`${rules.length} expressions written for promtool`, rules.length >= 14);

console.log(failures ? `dashboard: ${failures} check(s) failed` : "dashboard: all checks passed");
process.exit(failures ? 1 : 0);

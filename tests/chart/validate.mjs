// Validates the objects `helm template` rendered from helm/kvmanager and asserts what the chart
// promises. Run by tests/chart/chart_test.sh from a directory whose node_modules holds the packages
// of tests/chart/package.json (scripts/install-tools.sh installs them).
//
//   node validate.mjs RENDERED.yaml EXPECT.json OUTDIR
//
// EXPECT: {"release", "namespace", "shards", "pvcSize", "existingSecret" (name or ""),
//          "monitoring" (ServiceMonitor, PrometheusRule, NetworkPolicy, PDB, dashboard expected),
//          "tls" (TLS flags expected), "workerPortRange" ([min, max] of the egress rule),
//          "rulesFile", "dashboardFile"}
// Every object is checked twice against the Kubernetes (kubernetes-models@5.1.0) and
// prometheus-operator (@kubernetes-models/prometheus-operator@6.0.0) schemas: the packages'
// validate() (types, enums, required fields) and a walk over their type declarations that rejects
// fields the schema does not have (validate() lets unknown fields through). OUTDIR receives the
// rendered config file (kvmanager.yaml) and, for a generated Secret, its files under tenants/, for
// the real `kvmanager --check-config`, and the container's arguments with those files mapped there
// (OUTDIR/args). Exit 0 when every check passed, 1 otherwise.
import { readFileSync, writeFileSync, mkdirSync, existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import yaml from "js-yaml";

const [renderedPath, expectPath, outDir] = process.argv.slice(2);
if (!outDir) {
  console.error("usage: node validate.mjs RENDERED.yaml EXPECT.json OUTDIR");
  process.exit(2);
}
const want = JSON.parse(readFileSync(expectPath, "utf8"));
let failures = 0;
function check(what, ok, detail = "") {
  if (ok) console.log(`ok: ${what}`);
  else {
    failures++;
    console.log(`FAIL: ${what}${detail ? ` (${detail})` : ""}`);
  }
}

// --- Schemas -------------------------------------------------------------------------------
function modulePath(apiVersion, kind) {
  if (apiVersion.startsWith("monitoring.coreos.com/"))
    return `@kubernetes-models/prometheus-operator/${apiVersion}/${kind}`;
  return `kubernetes-models/${apiVersion}/${kind}`;
}

// The fields of the interface declared in a .d.ts file (and of the interfaces it extends): a
// declaration is {props: Map(field -> declaration | .d.ts file | null), isMap}. Inline object
// types (`Array<{ ... }>`) are parsed in place; `{ [key: string]: T }` is a map (any key).
const declCache = new Map();
function declaration(dtsFile) {
  if (declCache.has(dtsFile)) return declCache.get(dtsFile);
  const text = readFileSync(dtsFile, "utf8");
  const imports = new Map();
  for (const m of text.matchAll(/^import \{ (\w+) \} from "([^"]+)";$/gm)) {
    let p = m[2];
    if (p.startsWith(".")) p = join(dirname(dtsFile), p);
    else p = fileURLToPath(import.meta.resolve(p));
    imports.set(m[1], p.replace(/\.js$/, "") + ".d.ts");
  }
  const decl = { props: new Map(), isMap: false };
  declCache.set(dtsFile, decl);
  const head = text.match(/^export interface (\w+)(?: extends ([\w, ]+))? \{$/m);
  if (!head) return decl;  // a type alias (string, union): no fields to check
  const lines = text.slice(head.index + head[0].length, text.indexOf("\n}", head.index)).split("\n")
    .filter((l) => l.trim() && !/^\s*(\/\*\*|\*)/.test(l));
  let i = 0;
  const typeRef = (t) => {
    const arr = t.match(/^Array<(\w+)>;?$/);
    const name = (arr ? arr[1] : t).replace(/;$/, "");
    return imports.get(name) || null;
  };
  function block(indent, into) {
    while (i < lines.length) {
      const line = lines[i];
      const ind = line.length - line.trimStart().length;
      const t = line.trim();
      if (ind < indent) return;  // the closing "}", "};" or "}>;" of this block
      i++;
      if (t.startsWith("[key: string]")) { into.isMap = true; continue; }
      const m = t.match(/^"([^"]+)"\??: (.*)$/);
      if (!m) continue;
      if (/(^|<)\{$/.test(m[2])) {  // an inline object type
        const sub = { props: new Map(), isMap: false };
        block(ind + 4, sub);
        i++;  // its closing line
        into.props.set(m[1], sub.isMap && sub.props.size === 0 ? null : sub);
      } else {
        into.props.set(m[1], typeRef(m[2]));
      }
    }
  }
  block(4, decl);
  for (const parent of (head[2] || "").split(",").map((s) => s.trim())) {
    const f = imports.get(parent);
    if (f && existsSync(f)) for (const [k, v] of declaration(f).props) if (!decl.props.has(k)) decl.props.set(k, v);
  }
  return decl;
}
function unknownFields(obj, type, path, out) {
  if (obj === null || typeof obj !== "object" || !type) return;
  const decl = typeof type === "string" ? (existsSync(type) ? declaration(type) : null) : type;
  if (!decl || decl.props.size === 0 || decl.isMap) return;
  if (Array.isArray(obj)) {
    obj.forEach((o, i) => unknownFields(o, decl, `${path}[${i}]`, out));
    return;
  }
  for (const [k, v] of Object.entries(obj)) {
    if (!decl.props.has(k)) out.push(`${path}.${k}`);
    else unknownFields(v, decl.props.get(k), `${path}.${k}`, out);
  }
}

const docs = yaml.loadAll(readFileSync(renderedPath, "utf8")).filter((d) => d);
check(`rendered ${docs.length} objects`, docs.length > 0);
for (const d of docs) {
  const name = `${d.kind} ${d.metadata?.name}`;
  const spec = modulePath(d.apiVersion, d.kind);
  let Model;
  try {
    Model = (await import(spec))[d.kind];
  } catch (e) {
    check(`${name}: a schema exists for ${d.apiVersion} ${d.kind}`, false, e.message);
    continue;
  }
  try {
    new Model(d).validate();
    check(`${name} validates against ${spec}`, true);
  } catch (e) {
    check(`${name} validates against ${spec}`, false, e.message);
  }
  const unknown = [];
  unknownFields(d, fileURLToPath(import.meta.resolve(spec)).replace(/\.js$/, ".d.ts"), d.kind, unknown);
  check(`${name} has no field its schema lacks`, unknown.length === 0, unknown.join(", "));
}

// --- What the chart promises ---------------------------------------------------------------
const byKind = (k) => docs.filter((d) => d.kind === k);
const one = (k, pred = () => true) => docs.find((d) => d.kind === k && pred(d));
// JSON with object keys sorted (toYaml sorts them).
const canonical = (v) => JSON.stringify(v, (k, x) =>
  x && typeof x === "object" && !Array.isArray(x) ? Object.fromEntries(Object.entries(x).sort()) : x);
const matches = (selector, labels) =>
  Object.entries(selector || {}).every(([k, v]) => (labels || {})[k] === v);

const sts = one("StatefulSet");
check("one StatefulSet", byKind("StatefulSet").length === 1);
if (!sts) process.exit(1);
const pod = sts.spec.template.spec;
const c = pod.containers.find((x) => x.name === "kvmanager");
check("the kvmanager container exists", !!c);
if (!c) process.exit(1);
check(`replicas = shards = ${want.shards}`, sts.spec.replicas === want.shards, `${sts.spec.replicas}`);
check("parallel pod management", sts.spec.podManagementPolicy === "Parallel");
check("selector matches the pod template's labels",
      matches(sts.spec.selector.matchLabels, sts.spec.template.metadata.labels));

const port = (n) => (c.ports || []).find((p) => p.name === n);
check("control port 7420/TCP", port("control")?.containerPort === 7420 && port("control")?.protocol === "TCP");
check("admin port 7421/TCP", port("admin")?.containerPort === 7421 && port("admin")?.protocol === "TCP");
const probe = (p) => p?.httpGet && `${p.httpGet.path}@${p.httpGet.port}`;
check("liveness probe GET /healthz on admin", probe(c.livenessProbe) === "/healthz@admin", probe(c.livenessProbe));
check("readiness probe GET /readyz on admin", probe(c.readinessProbe) === "/readyz@admin", probe(c.readinessProbe));
check("startup probe GET /healthz on admin", probe(c.startupProbe) === "/healthz@admin", probe(c.startupProbe));
check("termination grace period leaves the 10 s drain room",
      pod.terminationGracePeriodSeconds > 10, `${pod.terminationGracePeriodSeconds}`);

const vct = (sts.spec.volumeClaimTemplates || []).find((v) => v.metadata.name === "data");
check(`volume claim template 'data' of ${want.pvcSize}`,
      vct?.spec?.resources?.requests?.storage === want.pvcSize, vct?.spec?.resources?.requests?.storage);
const mount = (path) => (c.volumeMounts || []).find((m) => m.mountPath === path);
const volume = (name) => (pod.volumes || []).find((v) => v.name === name);
check("the data claim is mounted writable at /data", mount("/data")?.name === "data" && !mount("/data")?.readOnly);
check("/tmp is an emptyDir", !!volume(mount("/tmp")?.name)?.emptyDir);

const psc = pod.securityContext || {};
const csc = c.securityContext || {};
check("pod runAsNonRoot with a non-root user", psc.runAsNonRoot === true && psc.runAsUser > 0);
check("fsGroup set (the data volume is writable by the user)", Number.isInteger(psc.fsGroup));
check("container root filesystem read-only", csc.readOnlyRootFilesystem === true);
check("no privilege escalation, all capabilities dropped",
      csc.allowPrivilegeEscalation === false && (csc.capabilities?.drop || []).includes("ALL"));
check("no ServiceAccount token mounted", pod.automountServiceAccountToken === false);

// Config: a ConfigMap file passed with --config.
const args = c.args || [];
const argOf = (flag) => args.find((a) => a.startsWith(`${flag}=`))?.slice(flag.length + 1);
const configPath = argOf("--config");
const cfgMount = (c.volumeMounts || []).find((m) => configPath?.startsWith(m.mountPath + "/"));
const cfgMap = one("ConfigMap", (d) => d.metadata.name === volume(cfgMount?.name)?.configMap?.name);
const cfgKey = configPath?.slice((cfgMount?.mountPath || "").length + 1);
check("--config names a file of a rendered ConfigMap", !!cfgMap?.data?.[cfgKey], configPath);
let config = {};
if (cfgMap?.data?.[cfgKey]) {
  config = yaml.load(cfgMap.data[cfgKey]);
  writeFileSync(join(outDir, "kvmanager.yaml"), cfgMap.data[cfgKey]);
}
check("config listens on the control and admin ports",
      config.listen === "0.0.0.0:7420" && config.admin === "0.0.0.0:7421");
check("config data_dir is on the data volume", String(config.data_dir).startsWith("/data/"));
check("config has no tenants (they come from the Secret)", !("tenants" in config));

// Tenants: a Secret mounted as files, read with --tenants-file; no token on a command line.
const tenantsPath = argOf("--tenants-file");
const tMount = (c.volumeMounts || []).find((m) => tenantsPath?.startsWith(m.mountPath + "/"));
const tVolume = volume(tMount?.name);
const secretName = tVolume?.secret?.secretName;
check("--tenants-file names a file in a mounted Secret volume", !!secretName && tMount.readOnly === true,
      tenantsPath);
const tokens = [];
if (want.existingSecret) {
  check(`the existing Secret ${want.existingSecret} is the one mounted`, secretName === want.existingSecret);
  check("no Secret is generated", byKind("Secret").length === 0);
} else {
  const secret = one("Secret", (d) => d.metadata.name === secretName);
  const key = tenantsPath?.slice((tMount?.mountPath || "").length + 1);
  check("the generated Secret holds the tenants file", !!secret?.data?.[key], key);
  mkdirSync(join(outDir, "tenants"), { recursive: true });
  for (const [k, v] of Object.entries(secret?.data || {})) {
    const text = Buffer.from(v, "base64").toString("utf8");
    writeFileSync(join(outDir, "tenants", k), text);
    if (k.endsWith(".token")) tokens.push(text);
  }
  const file = secret?.data?.[key] ? yaml.load(Buffer.from(secret.data[key], "base64").toString()) : {};
  for (const t of file.tenants || []) if (t.token) tokens.push(t.token);
  check("every tenant's token is a file of the Secret (token_file)",
        (file.tenants || []).length > 0 &&
          (file.tenants || []).every((t) => t.token_file && secret.data[t.token_file] && !t.token));
  check("generated tokens are 32 characters", tokens.length > 0 && tokens.every((t) => t.length >= 32));
}
for (const d of docs) {
  const spec = d.kind === "Pod" ? d.spec : d.spec?.template?.spec;
  for (const ct of [...(spec?.containers || []), ...(spec?.initContainers || [])]) {
    const words = [...(ct.command || []), ...(ct.args || []), ...(ct.env || []).map((e) => String(e.value ?? ""))];
    const leaked = words.filter((w) => tokens.some((t) => w.includes(t)) || /--token(=|$)/.test(w));
    check(`no token in the command line or env of ${d.kind} ${d.metadata.name}/${ct.name}`,
          leaked.length === 0, leaked.join(" "));
  }
}

// The container's arguments with the mounted files mapped into OUTDIR (one per line), for
// `kvmanager --check-config`: the real binary parses the real command line.
writeFileSync(join(outDir, "args"), args.map((a) => {
  if (a === `--config=${configPath}`) return `--config=${join(outDir, "kvmanager.yaml")}`;
  if (a === `--tenants-file=${tenantsPath}`)
    return `--tenants-file=${join(outDir, "tenants", tenantsPath.slice(tMount.mountPath.length + 1))}`;
  return a;
}).join("\n") + "\n");
const tls = args.filter((a) => a.startsWith("--tls") || a === "--admin-tls");
check(`TLS flags rendered exactly when tls is enabled (${want.tls ? "on" : "off"})`,
      want.tls ? tls.length > 0 && tls.every((a) => a === "--admin-tls" || a.split("=")[1]?.startsWith("/etc/kvmanager/tls/"))
               : tls.length === 0, tls.join(" "));

// Services: a headless one for the per-shard names, a client one; both select the shards only.
const headless = one("Service", (d) => d.metadata.name === sts.spec.serviceName);
check("serviceName is a rendered headless Service", headless?.spec?.clusterIP === "None");
check("the headless Service publishes not-ready shards", headless?.spec?.publishNotReadyAddresses === true);
const client = one("Service", (d) => d !== headless);
check("a client Service", !!client && client.spec.clusterIP !== "None");
for (const s of byKind("Service")) {
  const names = s.spec.ports.map((p) => `${p.name}:${p.port}`).sort().join(",");
  check(`Service ${s.metadata.name} has ports admin:7421,control:7420`, names === "admin:7421,control:7420", names);
  check(`Service ${s.metadata.name} selects the shard pods`, matches(s.spec.selector, sts.spec.template.metadata.labels));
}

// helm test: kvmctl status on every shard's stable name.
const test = one("Pod", (d) => d.metadata.annotations?.["helm.sh/hook"] === "test");
check("a helm test pod", !!test);
if (test) {
  const tc = test.spec.containers[0];
  const full = [...(tc.command || []), ...(tc.args || [])];
  const servers = full[full.indexOf("--server") + 1] || "";
  const wantServers = [...Array(want.shards).keys()]
    .map((i) => `${sts.metadata.name}-${i}.${headless?.metadata.name}.${want.namespace}.svc:7420`).join(",");
  check("helm test runs `kvmctl status ... --json`", full[0] === "kvmctl" && full[1] === "status" && full.includes("--json"),
        full.join(" "));
  check(`helm test --server lists the ${want.shards} per-shard names`, servers === wantServers, servers);
  check("the test pod is not selected by the Services", !byKind("Service").some((s) => matches(s.spec.selector, test.metadata.labels)));
  check("the test pod never restarts", test.spec.restartPolicy === "Never");
}

// Monitoring, disruption and network objects.
const sm = one("ServiceMonitor");
const np = one("NetworkPolicy");
const pr = one("PrometheusRule");
const pdb = one("PodDisruptionBudget");
const dash = one("ConfigMap", (d) => d.metadata.labels?.grafana_dashboard === "1");
if (want.monitoring) {
  check("a ServiceMonitor", !!sm);
  if (sm) {
    const target = byKind("Service").filter((s) => matches(sm.spec.selector.matchLabels, s.metadata.labels));
    check("the ServiceMonitor selects exactly the headless Service", target.length === 1 && target[0] === headless,
          target.map((s) => s.metadata.name).join(","));
    check("it scrapes /metrics on the admin port",
          sm.spec.endpoints.some((e) => e.port === "admin" && e.path === "/metrics"));
  }
  check("a PrometheusRule", !!pr);
  if (pr) {
    const rules = yaml.load(readFileSync(want.rulesFile, "utf8"));
    check("the PrometheusRule's groups are rules/kvmanager.rules.yaml's",
          canonical(pr.spec.groups) === canonical(rules.groups));
  }
  check("a Grafana dashboard ConfigMap labelled grafana_dashboard: \"1\"", !!dash);
  if (dash) {
    const key = Object.keys(dash.data || {})[0];
    let parsed = null;
    try { parsed = JSON.parse(dash.data[key]); } catch (e) { /* checked below */ }
    const file = JSON.parse(readFileSync(want.dashboardFile, "utf8"));
    check("the dashboard ConfigMap carries dashboards/kvmanager.json unchanged",
          parsed && canonical(parsed) === canonical(file));
  }
  check("a PodDisruptionBudget selecting the shards",
        !!pdb && matches(pdb.spec.selector.matchLabels, sts.spec.template.metadata.labels));
  check("a NetworkPolicy", !!np);
  if (np) {
    check("the NetworkPolicy applies to the shards", matches(np.spec.podSelector.matchLabels, sts.spec.template.metadata.labels));
    const control = np.spec.ingress.find((r) => r.ports.some((p) => p.port === 7420));
    const from = control?.from?.[0]?.podSelector?.matchLabels;
    check("only labelled client pods reach the control port",
          control && control.from.length === 1 && from && Object.keys(from).length > 0);
    check("the helm test pod carries the client labels", test && matches(from, test.metadata.labels));
    check("ingress opens only the control and admin ports (nothing connects in to UCX)",
          np.spec.ingress.every((r) => r.ports.every((p) => (p.port === 7420 || p.port === 7421) && !p.endPort)));
    const range = c.env.find((e) => e.name === "UCX_TCP_PORT_RANGE")?.value;
    check("UCX_TCP_PORT_RANGE of the service is pinned", /^[0-9]+-[0-9]+$/.test(range || ""), range);
    const out = np.spec.egress.find((r) => r.ports.some((p) => p.endPort));
    check("egress to the client pods' UCX port range (the workers' UCX_TCP_PORT_RANGE)",
          out && matches(out.to[0].podSelector.matchLabels, test?.metadata.labels) && out.ports[0].protocol === "TCP" &&
          out.ports[0].port === want.workerPortRange?.[0] && out.ports[0].endPort === want.workerPortRange?.[1],
          JSON.stringify(out?.ports));
    check("egress allows nothing else but DNS",
          np.spec.egress.every((r) => r === out || r.ports.every((p) => p.port === 53)));
  }
} else {
  check("no ServiceMonitor, NetworkPolicy, PrometheusRule, PDB or dashboard by default",
        !sm && !np && !pr && !pdb && !dash);
}

console.log(failures ? `chart objects: ${failures} check(s) failed` : "chart objects: all checks passed");
process.exit(failures ? 1 : 0);

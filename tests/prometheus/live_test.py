#!/usr/bin/env python3
"""A real Prometheus against a real kvmanager (ctest -L prometheus).

Starts kvmanager and Debian's Prometheus 2.42 on free loopback ports (1 s scrape, a temporary TSDB,
the chart's rule file loaded), runs a short `kvmctl demo --server` through the service, waits for
two scrapes after it, then:
  * evaluates every panel expression of helm/kvmanager/dashboards/kvmanager.json and every rule of
    helm/kvmanager/rules/kvmanager.rules.yaml through Prometheus's HTTP API, the template variables
    substituted ($namespace, $instance -> .*, $__rate_interval -> 1m): each returns data (an alert
    is evaluated with its comparison made a `bool` one, so "not firing" is data too; a recording
    rule is read back by its name);
  * checks the service's counters against the demo's own JSON: kvm_stream_bytes_total
    {direction="to_worker"} = streamed_bytes and kvm_dense_equivalent_bytes_total =
    dense_offload_bytes within 1%; kvm_gate_checks_total by result = gate_checks,
    kvm_retrievals_total = retrievals and kvm_dropped_mass_count{kind} = delta_by_kind.<kind>.n
    exactly.
Prints a table of both. Both processes stop on every exit path.

Usage: live_test.py KVMANAGER KVMCTL   (exit 0 = every check passed)
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(ROOT, "helm/kvmanager/dashboards/kvmanager.json")
RULES = os.path.join(ROOT, "helm/kvmanager/rules/kvmanager.rules.yaml")
RATE_INTERVAL = "1m"  # covers the whole demo

failures = 0


def check(what, ok, detail=""):
    global failures
    print(("ok: " if ok else "FAIL: ") + what + (f" ({detail})" if detail and not ok else ""))
    if not ok:
        failures += 1
    return ok


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_for(pred, seconds, what):
    end = time.time() + seconds
    while time.time() < end:
        try:
            if pred():
                return True
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {seconds} s waiting for {what}")


class Prom:
    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expr):
        """The instant query's result list; raises on a Prometheus error."""
        url = self.base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            body = json.loads(get(url))
        except urllib.error.HTTPError as e:
            body = json.loads(e.read().decode())
        if body.get("status") != "success":
            raise RuntimeError(f"{expr}: {body.get('error')}")
        return body["data"]["result"]

    def value(self, expr):
        r = self.query(expr)
        return float(r[0]["value"][1]) if r else None


def substitute(expr):
    return (expr.replace("$namespace", ".*").replace("$instance", ".*")
            .replace("$__rate_interval", RATE_INTERVAL).replace("${datasource}", ""))


def panel_exprs():
    dash = json.load(open(DASHBOARD))
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))
    walk(dash.get("panels", []))
    return out


def rule_exprs():
    """(kind, name, expr) of every rule; a small reader of the rule file's layout (record/alert,
    then expr as one line or a folded >- block)."""
    rules, cur = [], None
    lines = open(RULES).read().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*- (record|alert): *(\S+)", lines[i])
        if m:
            cur = [m.group(1), m.group(2), None]
            rules.append(cur)
        m = re.match(r"^(\s*)expr: *(.*)$", lines[i])
        if m and cur is not None:
            text = m.group(2).strip()
            if text in (">-", ">", "|", "|-"):
                indent = None
                parts = []
                while i + 1 < len(lines):
                    nxt = lines[i + 1]
                    lead = len(nxt) - len(nxt.lstrip())
                    if nxt.strip() and (indent is None or lead >= indent) and lead > len(m.group(1)):
                        indent = indent or lead
                        parts.append(nxt.strip())
                        i += 1
                    else:
                        break
                text = " ".join(parts)
            cur[2] = text
        i += 1
    return rules


def as_bool(expr):
    """The alert's condition as a `bool` comparison: a value (0 or 1) for every series."""
    return re.sub(r"(==|!=|>=|<=|>|<)(\s*)(?!bool)", r"\1 bool\2", expr, count=0)


def main():
    kvmanager, kvmctl = sys.argv[1], sys.argv[2]
    for tool in ("prometheus",):
        if not shutil.which(tool):
            print(f"FAIL: {tool} not found (apt-get install prometheus; scripts/install-deps.sh does)")
            return 1
    tmp = tempfile.mkdtemp(prefix="kvm-prom-")
    procs = []

    def stop_all(*_):
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    def on_signal(sig, _):
        stop_all()
        sys.exit(128 + sig)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return run(kvmanager, kvmctl, tmp, procs)
    except Exception as e:  # a setup failure is a failed test, with what failed
        print(f"FAIL: {e}")
        for name in ("kvmanager.log", "prometheus.log", "demo.log"):
            path = os.path.join(tmp, name)
            if os.path.exists(path):
                print(f"--- {name} (tail)")
                print("".join(open(path, errors="replace").readlines()[-15:]))
        return 1
    finally:
        stop_all()


def run(kvmanager, kvmctl, tmp, procs):
    port, admin, pport = free_port(), free_port(), free_port()
    klog = open(os.path.join(tmp, "kvmanager.log"), "w")
    procs.append(subprocess.Popen(
        [kvmanager, "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
         "--data-dir", os.path.join(tmp, "data"), "--no-gpu",
         "--disk-capacity-bytes", str(1 << 30)],  # a capped disk tier: the tier-full rule has data
        stdout=klog, stderr=klog))
    wait_for(lambda: get(f"http://127.0.0.1:{admin}/readyz", 1).startswith("ready"), 30,
             "kvmanager /readyz")
    with open(os.path.join(tmp, "prometheus.yml"), "w") as f:
        f.write(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {RULES}
scrape_configs:
  - job_name: kvmanager
    static_configs:
      - targets: ["127.0.0.1:{admin}"]
        labels:
          namespace: kvm-test
""")
    plog = open(os.path.join(tmp, "prometheus.log"), "w")
    procs.append(subprocess.Popen(
        ["prometheus", "--config.file", os.path.join(tmp, "prometheus.yml"),
         "--storage.tsdb.path", os.path.join(tmp, "tsdb"),
         "--web.listen-address", f"127.0.0.1:{pport}", "--log.level", "warn"],
        stdout=plog, stderr=plog))
    prom = Prom(pport)
    wait_for(lambda: "Ready" in get(prom.base + "/-/ready", 1), 60, "Prometheus /-/ready")
    wait_for(lambda: prom.value('up{job="kvmanager"}') == 1, 30, "the first scrape of kvmanager")
    print(f"kvmanager on 127.0.0.1:{port} (admin {admin}), Prometheus on 127.0.0.1:{pport}")

    # A short demo through the running service.
    dlog = open(os.path.join(tmp, "demo.log"), "w")
    out = subprocess.run([kvmctl, "demo", "--server", f"127.0.0.1:{port}", "--context", "384",
                          "--max-new", "48", "--json"], stdout=subprocess.PIPE, stderr=dlog,
                         timeout=600)
    if not check("kvmctl demo --server ran", out.returncode == 0, f"rc {out.returncode}"):
        return 1
    demo = json.loads(out.stdout)
    done = time.time()
    # Two scrapes after the demo (the service's counters final in Prometheus).
    wait_for(lambda: prom.value('timestamp(up{job="kvmanager"})') > done + 1.0, 30,
             "two scrapes after the demo")

    # The service's counters beside the demo's JSON.
    print("\n%-44s %16s %16s" % ("quantity", "Prometheus", "demo JSON"))
    rows = []

    def total(expr):
        v = prom.value(f"sum({expr})")
        return v if v is not None else float("nan")

    rows.append(("stream to_worker bytes vs streamed_bytes",
                 total('kvm_stream_bytes_total{direction="to_worker"}'), demo["streamed_bytes"], 0.01))
    rows.append(("dense-equivalent bytes vs dense_offload_bytes",
                 total("kvm_dense_equivalent_bytes_total"), demo["dense_offload_bytes"], 0.01))
    rows.append(("retrievals", total("kvm_retrievals_total"), demo["retrievals"], 0))
    for result, n in demo["gate_checks"].items():
        rows.append((f"gate checks result={result}",
                     total(f'kvm_gate_checks_total{{result="{result}"}}'), n, 0))
    for kind, s in demo["delta_by_kind"].items():
        if kind == "unknown":  # a sharing layer's selection: no δ of its own, not a family
            continue
        rows.append((f"dropped-mass count kind={kind}",
                     total(f'kvm_dropped_mass_count{{kind="{kind}"}}'), s["n"], 0))
    for what, got, want, tol in rows:
        print("%-44s %16.0f %16.0f" % (what, got, want))
    print()
    for what, got, want, tol in rows:
        ok = abs(got - want) <= tol * max(abs(want), 1) if tol else got == want
        check(f"{what}: {got:.0f} = {want}" + (f" within {tol:.0%}" if tol else ""), ok)
    saved = prom.value(
        f'1 - sum(increase(kvm_stream_bytes_total{{direction="to_worker"}}[{RATE_INTERVAL}]))'
        f' / sum(increase(kvm_dense_equivalent_bytes_total[{RATE_INTERVAL}]))')
    want_saved = 1 - demo["streamed_bytes"] / demo["dense_offload_bytes"]
    print(f"bandwidth saved: Prometheus {saved:.4f}, demo 1 - streamed/dense {want_saved:.4f}")
    check("bandwidth saved as Prometheus computes it matches the demo's within 0.01",
          saved is not None and abs(saved - want_saved) < 0.01)

    # The exposition after real traffic lints clean.
    if shutil.which("promtool"):
        text = get(f"http://127.0.0.1:{admin}/metrics")
        lint = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        check("promtool check metrics on /metrics after the demo", lint.returncode == 0,
              lint.stdout.decode()[:500])

    # Every panel and every rule, with data.
    print("\n%-46s %s" % ("panel / rule", "series: first value"))
    for title, expr in panel_exprs():
        q = substitute(expr)
        try:
            r = prom.query(q)
        except RuntimeError as e:
            check(f"panel '{title}' evaluates", False, str(e))
            continue
        first = r[0]["value"][1] if r else "-"
        print("%-46s %d: %s   [%s]" % (title[:46], len(r), first, q[:90]))
        check(f"panel '{title}' returns data", len(r) > 0, q)
    for kind, name, expr in rule_exprs():
        try:
            if kind == "record":
                r = prom.query(name)  # what the rule recorded, evaluated by Prometheus itself
                direct = prom.query(expr)
                check(f"rule {name} evaluates", True)
            else:
                prom.query(expr)  # as written (empty when not firing)
                r = prom.query(as_bool(expr))
        except RuntimeError as e:
            check(f"rule {name} evaluates", False, str(e))
            continue
        first = r[0]["value"][1] if r else "-"
        print("%-46s %d: %s" % (f"{kind} {name}"[:46], len(r), first))
        check(f"{kind} {name} returns data", len(r) > 0, expr if kind == "record" else as_bool(expr))
        if kind == "record":
            check(f"record {name}: the expression itself returns data", len(direct) > 0, expr)
    rules_api = json.loads(get(prom.base + "/api/v1/rules"))
    bad = [r["name"] for g in rules_api["data"]["groups"] for r in g["rules"]
           if r.get("health") not in ("ok",)]
    check("Prometheus evaluated every rule with health ok", not bad, ",".join(bad))
    print(f"\n{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

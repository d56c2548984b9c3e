#!/usr/bin/python3
"""Turns eval.jsonl (kvmctl eval --json lines) into eval.csv and PNG plots; the oracle is the reference curve."""
import csv
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
out = sys.argv[2]
keys = sorted({k for r in rows for k in r})
with open(os.path.join(out, "eval.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow(r)

budget = [r for r in rows if r["target_delta"] is None and r["selector"] != "dense"]
target = [r for r in rows if r["target_delta"] is not None]
names = ["oracle", "prhs", "quest", "hshare", "streaming", "h2o"]
ctx = rows[0]["context"]


def by_budget(metric, ylabel, fname, logy=False):
    plt.figure(figsize=(6, 4))
    for n in names:
        pts = sorted((r["budget_tokens"] / ctx, r[metric]) for r in budget if r["selector"] == n and r[metric] is not None)
        if pts:
            plt.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if n != "oracle" else "k--", label=n)
    plt.xscale("log", base=2)
    if logy:
        plt.yscale("log")
    plt.xlabel("budget (fraction of the %d-token context)" % ctx)
    plt.ylabel(ylabel)
    plt.grid(alpha=0.3)
    plt.legend()
    plt.tight_layout()
    plt.savefig(os.path.join(out, fname), dpi=110)
    plt.close()


by_budget("delta_mean", "mean dropped mass δ (measured)", "delta_vs_budget.png")
by_budget("top1_agreement", "top-1 agreement with dense", "top1_vs_budget.png")

plt.figure(figsize=(6, 4))
for n in names:
    pts = [(r["delta_mean"], r["retrieval_overhead"]) for r in budget + target if r["selector"] == n]
    if pts:
        plt.scatter([p[0] for p in pts], [p[1] for p in pts], label=n)
plt.xlabel("mean dropped mass δ")
plt.ylabel("retrieval overhead (retrievals / step·layer·head)")
plt.yscale("log")
plt.grid(alpha=0.3)
plt.legend()
plt.tight_layout()
plt.savefig(os.path.join(out, "retrieval_vs_delta.png"), dpi=110)
plt.close()

plt.figure(figsize=(6, 4))
for n in ["prhs", "oracle"]:
    pts = sorted((r["target_delta"], r["attended_fraction"]) for r in target if r["selector"] == n)
    if pts:
        plt.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if n == "prhs" else "k--", label=n)
plt.xlabel("target δ*")
plt.ylabel("attended fraction of the context")
plt.grid(alpha=0.3)
plt.legend()
plt.tight_layout()
plt.savefig(os.path.join(out, "attended_vs_target.png"), dpi=110)
plt.close()
print("wrote", out, file=sys.stderr)

# Markdown tables for bench/RESULTS.md: the 1/8 budget row of every selector, and target mode.
cols = ["selector", "budget_tokens", "delta_mean", "delta_p99", "oracle_delta_mean", "bound_violations",
        "retrieval_overhead", "attended_fraction", "streamed_bytes_fraction", "top1_agreement", "perplexity_ratio"]


def fmt(v):
    return "%.4g" % v if isinstance(v, float) else str(v)


with open(os.path.join(out, "eval_tables.md"), "w") as f:
    f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
    for r in [r for r in rows if r["selector"] == "dense"] + sorted(
            [r for r in budget if abs(r["budget_tokens"] / ctx - 0.125) < 0.02], key=lambda r: names.index(r["selector"])):
        f.write("| " + " | ".join(fmt(r[c]) for c in cols) + " |\n")
    tcols = ["selector", "target_delta", "max_resident_tokens", "within_target_fraction", "delta_mean", "delta_p99",
             "bound_violations", "bound_claims", "retrieval_overhead", "attended_fraction", "top1_agreement",
             "perplexity_ratio"]
    f.write("\n| " + " | ".join(tcols) + " |\n|" + "---|" * len(tcols) + "\n")
    for r in sorted(target, key=lambda r: (r["selector"], -r["target_delta"])):
        f.write("| " + " | ".join(fmt(r[c]) for c in tcols) + " |\n")
    f.write("\n| selector | budget | delta_mean | oracle_delta_mean | ratio | retrieval_overhead | top1 |\n|---|---|---|---|---|---|---|\n")
    for r in sorted(budget, key=lambda r: (names.index(r["selector"]), -r["budget_tokens"])):
        ratio = r["delta_mean"] / r["oracle_delta_mean"] if r["oracle_delta_mean"] else float("nan")
        f.write("| %s | 1/%d | %.4f | %.4f | %.3f | %.4f | %.4f |\n" % (
            r["selector"], round(ctx / r["budget_tokens"]), r["delta_mean"], r["oracle_delta_mean"], ratio,
            r["retrieval_overhead"], r["top1_agreement"]))

#!/usr/bin/python3
"""eval.jsonl (kvmctl eval --json lines, bench/eval_report.sh) -> eval.csv, eval_tables.md and PNG plots.

Per model and budget: the retrieval-vs-δ frontier (retrieval overhead against the measured mean δ, and
against top-1 agreement), every selector's variants labelled by their flags, the oracle's δ as the floor.
Tables: every budget-mode run, target mode, and the defaults at other text offsets (validation).
"""
import csv
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
out = sys.argv[2]
scalar = sorted({k for r in rows for k, v in r.items() if not isinstance(v, (list, dict))})
with open(os.path.join(out, "eval.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=scalar, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)

COMMON = {"--model", "--tokens", "--context", "--steps", "--offset", "--budget-frac", "--block-size", "--selector",
          "--hshare-channels", "--target-delta"}


def model(r):
    return os.path.basename(os.path.dirname(r["model"])) or r["model"]


def variant(r):
    """The run's own flags (those beyond the sweep's common ones): 'default' when none."""
    a = r.get("args", "").split()
    out, i = [], 0
    while i < len(a):
        if a[i] == "--json":
            i += 1
        elif a[i] in COMMON:
            i += 2
        else:
            out.append(a[i])
            i += 1
    return " ".join(out) or "default"


def budget_label(r):
    return "1/%d B%d" % (round(r["context"] / r["budget_tokens"]), r["block_size"])


def fmt(v):
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    return "%.4g" % v if isinstance(v, float) else str(v)


budget = [r for r in rows if r["target_delta"] is None and r["selector"] != "dense"]
target = [r for r in rows if r["target_delta"] is not None]
models = sorted({model(r) for r in rows})
names = ["prhs", "hshare", "quest", "streaming", "h2o", "oracle"]
colors = {"prhs": "tab:blue", "hshare": "tab:orange", "quest": "tab:green", "streaming": "tab:gray",
          "h2o": "tab:purple", "oracle": "black"}
marks = {"prhs": "o", "hshare": "s", "quest": "^", "streaming": "v", "h2o": "D", "oracle": "*"}
written = []

for m in models:
    for bl in sorted({budget_label(r) for r in budget if model(r) == m}, key=lambda s: int(s.split("/")[1].split()[0])):
        rs = [r for r in budget if model(r) == m and budget_label(r) == bl and r["offset"] == 0]
        if not rs:
            continue
        # Matched cost: runs attending more than 1.5x HShare's default fraction (dense layers, Quest's
        # dense layers) are left off the plot; the table has them.
        ref = [r for r in rs if r["selector"] == "hshare" and variant(r) == "default"] or \
              [r for r in rs if r["selector"] == "streaming"]
        limit = 1.5 * ref[0]["attended_fraction"] if ref else float("inf")
        shown = [r for r in rs if r["attended_fraction"] <= limit]
        left_off = sorted({"%s %s" % (r["selector"], variant(r)) for r in rs if r["attended_fraction"] > limit})
        fig, axes = plt.subplots(1, 2, figsize=(14, 5.6))
        for ax, metric, xlabel in [(axes[0], "delta_mean", "mean dropped mass δ (measured, lower is better)"),
                                   (axes[1], "top1_agreement", "top-1 agreement with dense (higher is better)")]:
            for n in names:
                pts = [r for r in shown if r["selector"] == n]
                if not pts:
                    continue
                ys = [max(r["retrieval_overhead"], 1e-3) for r in pts]
                ax.scatter([r[metric] for r in pts], ys, c=colors[n], marker=marks[n], s=40, label=n, alpha=0.85)
                # One label per point; variants that land on the same point share it.
                at = {}
                for r, y in zip(pts, ys):
                    at.setdefault((round(r[metric], 5), round(y, 6)), []).append(variant(r).replace("--", ""))
                for (x, y), labels in at.items():
                    if labels != ["default"] or n in ("prhs", "hshare"):
                        ax.annotate(" = ".join(labels), (x, y), fontsize=6, alpha=0.8, xytext=(3, 2),
                                    textcoords="offset points")
                for r, y in zip(pts, ys):
                    if variant(r) == "default" and n == "prhs":
                        ax.scatter([r[metric]], [y], s=160, facecolors="none", edgecolors="red", linewidths=1.5)
            if metric == "delta_mean":
                floor = [r for r in rs if r["selector"] == "oracle" and variant(r) == "default"]
                if floor:
                    ax.axvline(floor[0]["delta_mean"], color="black", ls="--", lw=0.8, label="oracle δ (floor)")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("retrieval overhead (per step·layer·query head; 0 at 1e-3)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8, loc="center right")
        fig.suptitle("%s, budget %s, context %d, %d steps; red ring: PrHS defaults\nleft off (attended > 1.5x "
                     "HShare's): %s" % (m, bl, rs[0]["context"], rs[0]["steps"], ", ".join(left_off) or "none"),
                     fontsize=10)
        fig.tight_layout()
        fname = "frontier_%s_%s.png" % (m, bl.replace("/", "-").replace(" ", "_"))
        fig.savefig(os.path.join(out, fname), dpi=110)
        plt.close(fig)
        written.append(fname)

cols = ["selector", "variant", "delta_mean", "oracle_delta_mean", "retrieval_overhead", "attended_fraction",
        "worker_memory_fraction", "top1_agreement", "perplexity_ratio", "bound_claim_fraction", "bound_claim_mean",
        "bound_violations"]
tcols = ["selector", "variant", "max_resident_tokens", "within_target_fraction", "target_missed_fraction",
         "delta_mean", "retrieval_overhead", "attended_fraction", "top1_agreement", "perplexity_ratio",
         "bound_pass_rate", "bound_pass_rate_norm", "bound_check_mean", "bound_check_mean_norm", "bound_violations"]


def table(f, rs, cs):
    f.write("| " + " | ".join(cs) + " |\n|" + "---|" * len(cs) + "\n")
    for r in rs:
        f.write("| " + " | ".join(fmt(variant(r) if c == "variant" else r.get(c)) for c in cs) + " |\n")


with open(os.path.join(out, "eval_tables.md"), "w") as f:
    for m in models:
        for bl in sorted({budget_label(r) for r in budget if model(r) == m}, key=lambda s: int(s.split("/")[1].split()[0])):
            rs = [r for r in budget if model(r) == m and budget_label(r) == bl and r["offset"] == 0]
            rs.sort(key=lambda r: (names.index(r["selector"]), r["retrieval_overhead"]))
            f.write("\n#### %s, budget %s (offset 0)\n\n" % (m, bl))
            table(f, rs, cols)
        ts = [r for r in target if model(r) == m and r["offset"] == 0]
        if ts:
            f.write("\n#### %s, target mode δ* 0.1 (offset 0)\n\n" % m)
            table(f, ts, tcols)
        vs = [r for r in rows if model(r) == m and r["offset"] != 0]
        if vs:
            f.write("\n#### %s, the defaults at other offsets\n\n" % m)
            vc = ["offset", "selector", "variant", "budget_tokens", "block_size", "target_delta", "max_resident_tokens",
                  "delta_mean", "oracle_delta_mean", "retrieval_overhead", "attended_fraction",
                  "within_target_fraction", "top1_agreement", "perplexity_ratio", "bound_violations"]
            table(f, vs, vc)
print("wrote", out, ", ".join(written), file=sys.stderr)

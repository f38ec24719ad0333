#!/usr/bin/env python3
"""Facts recalled per method and ratio on the six short cases (18 facts),
attention matching and KVzip (this folder) beside the recipe, eviction and
summary cells recorded in ../side-by-side, and T24 (3 facts) beside the
recipe's (../reproduce/reproduce-full-*) and eviction's T24 cells. Also the seconds of one compaction and
the fit's output error, where recorded.

usage: python3 experiments/attention-matching/table.py   (from the repository root)
"""
import glob
import json
from collections import defaultdict

RATIOS = [1.6, 2.4, 3.2, 4.8, 6.4]
SHORT = {"t8-claude-md", "t18-auth-middleware"}


def lines(pattern):
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def table(rows, cases, title):
    facts = defaultdict(lambda: [0, 0])
    for r in rows:
        if r["case"] in cases and r["ratio"] in RATIOS:
            cell = facts[(r["method"], r["ratio"])]
            cell[0] += r["facts_correct"]
            cell[1] += r["facts_total"]
    methods = sorted({m for m, _ in facts}, key=lambda m: (not m.startswith("attention"), m != "kvzip", m))
    print(f"\n{title}\n")
    print("| method | " + " | ".join(f"{r}x" for r in RATIOS) + " |")
    print("|---|" + "---|" * len(RATIOS))
    for m in methods:
        cells = [facts.get((m, r)) for r in RATIOS]
        print(f"| {m} | " + " | ".join(f"{c[0]}/{c[1]}" if c else "" for c in cells) + " |")


here = list(lines("experiments/attention-matching/*/results.jsonl"))
recorded = list(lines("experiments/side-by-side/*/results.jsonl")) + list(lines("experiments/reproduce/reproduce-full-*/results.jsonl"))
# The recipe as published: surprisal pooling, V only, full budget, chunk-mean start.
recorded = [r for r in recorded if r["method"] in {"surprisal", "snapkv", "key-norm", "streaming", "summary"}]
own = {r["case"] for r in here} - {"t24-reports"}
seen = set()
unique = []
for r in here + recorded:  # one line per cell: this folder's first
    key = (r["case"], r["method"], r["ratio"])
    if key not in seen:
        seen.add(key)
        unique.append(r)
table(unique, own, f"Six short cases ({len(own)} cases), facts recalled")
table(unique, {"t24-reports"}, "T24 (1,008 tokens, 3 facts)")

print("\nSeconds of one compaction (the span's forward, queries, fit) and fit error, where recorded:\n")
for r in here:
    if r.get("compress_seconds"):
        err = r.get("fit_error")
        print(f"- {r['case']} {r['method']} {r['ratio']}x: {r['compress_seconds']:.2f} s for {r['n_tokens']} tokens"
              + (f", output error {err:.3f}" if err is not None else "") + f", {r['facts_correct']}/{r['facts_total']}")

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
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stats import mcnemar  # noqa: E402

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


# The 0.5B sweeps of the hand-written cases this table is about (the other
# folders hold generated cases or the 1.5B, tabled by paired.py).
FOLDERS = ["short-cases-cpu", "t24-and-timing-cpu", "fitted-recipe-cpu", "reverse-start-cpu", "reverse-start-plain-cpu", "reverse-start-4.8-cpu"]
here = [r for folder in FOLDERS for r in lines(f"experiments/attention-matching/{folder}/results.jsonl") if "0.5b" in r["model"]]
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


def verdicts(rows, cases):
    """(method, ratio) -> {(case, fact id): recalled}"""
    out = defaultdict(dict)
    for r in rows:
        if r["case"] in cases and r["ratio"] in RATIOS:
            for answer in r["answers"]:
                for fact, ok in answer["facts"]:
                    out[(r["method"], r["ratio"])][(r["case"], answer["question_id"], fact)] = ok
    return out


def paired(v, mine, other, ratios):
    """'+wins/-losses p=...' cells of `mine` against `other`, one per ratio."""
    cells = []
    for ratio in ratios:
        a, b = v.get((mine, ratio), {}), v.get((other, ratio), {})
        shared = a.keys() & b.keys()
        wins = sum(a[k] and not b[k] for k in shared)
        losses = sum(b[k] and not a[k] for k in shared)
        cells.append(f"+{wins}/-{losses} p={mcnemar(wins, losses):.2g}" if shared else "")
    return cells


print("\nPaired on the same facts (six short cases): attention-matching against each method;")
print("wins = facts only attention matching recalled, losses = facts only the other did; exact McNemar p.\n")
v = verdicts(unique, own)
print("| against | " + " | ".join(f"{r}x" for r in RATIOS) + " |")
print("|---|" + "---|" * len(RATIOS))
for other in ["kvzip", "streaming", "key-norm", "snapkv", "summary", "surprisal", "attention-matching-both"]:
    print(f"| {other} | " + " | ".join(paired(v, "attention-matching", other, RATIOS)) + " |")

RECIPE_RATIOS = [3.2, 4.8]
print("\nThe recipe's keys with fitted values, paired on the same facts (six short cases); wins/losses of the first method.\n")
print("| first | against | " + " | ".join(f"{r}x" for r in RECIPE_RATIOS) + " |")
print("|---|---|" + "---|" * len(RECIPE_RATIOS))
for mine, other in [("fitted-recipe", "surprisal"), ("fitted-recipe+attention-matching-init", "fitted-recipe"),
                    ("fitted-recipe+attention-matching-init", "surprisal"), ("attention-matching", "fitted-recipe"),
                    ("attention-matching", "fitted-recipe+attention-matching-init"),
                    ("surprisal+attention-matching-spread-init", "surprisal"),
                    ("fitted-recipe+attention-matching-init", "surprisal+attention-matching-spread-init"),
                    ("fitted-recipe+attention-matching-spread-init", "fitted-recipe"),
                    ("attention-matching", "fitted-recipe+attention-matching-spread-init")]:
    print(f"| {mine} | {other} | " + " | ".join(paired(v, mine, other, RECIPE_RATIOS)) + " |")

def cell_text(r):
    """'2/3 (fit 0.268, loss 2.45)': facts, the fit's error and the recipe's final loss where recorded."""
    notes = []
    if r.get("fit_error") is not None:
        notes.append(f"fit {r['fit_error']:.3f}")
    if r.get("loss_final") is not None:
        notes.append(f"loss {r['loss_final']:.2f}")
    return f"{r['facts_correct']}/{r['facts_total']}" + (f" ({', '.join(notes)})" if notes else "")


print("\nPer cell (six short cases): facts of 3; the fit's output error and the recipe's final loss where there are.\n")
CELL_METHODS = ["surprisal", "surprisal+attention-matching-spread-init", "fitted-recipe", "fitted-recipe+attention-matching-init", "fitted-recipe+attention-matching-spread-init", "attention-matching"]
by_cell = {(r["case"], r["method"], r["ratio"]): r for r in unique}
print("| cell | " + " | ".join(CELL_METHODS) + " |")
print("|---|" + "---|" * len(CELL_METHODS))
for case in sorted(own):
    for ratio in RECIPE_RATIOS:
        cells = []
        for method in CELL_METHODS:
            r = by_cell.get((case, method, ratio))
            cells.append("" if r is None else cell_text(r))
        print(f"| {case} {ratio}x | " + " | ".join(cells) + " |")

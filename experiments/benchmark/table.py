#!/usr/bin/env python3
"""Markdown tables of a benchmark run folder, from what `cram report` wrote
there: facts recalled per method and ratio with the Wilson 95% interval
(summary.csv, calibrated facts only when the run calibrates), the seconds a
cell took, and the paired comparisons of one method against the others
(comparisons.csv, exact McNemar).

usage: python3 experiments/benchmark/table.py RUN_DIR [METHOD]
       (METHOD, default attention-matching: the one paired against the rest)
"""
import csv
import io
import sys
from collections import defaultdict


def read_tables(run):
    with open(f"{run}/summary.csv") as f:
        _, _, totals = f.read().partition("\n\n")
    with open(f"{run}/comparisons.csv") as f:
        comparisons = list(csv.DictReader(f))
    return list(csv.DictReader(io.StringIO(totals))), comparisons


def ratio_label(text):
    return f"{float(text):g}x" if text else "-"


def main():
    run = sys.argv[1]
    focus = sys.argv[2] if len(sys.argv) > 2 else "attention-matching"
    totals, comparisons = read_tables(run)
    ratios = sorted({row["ratio"] for row in totals if row["ratio"]}, key=float)
    by_method = defaultdict(dict)
    for row in totals:
        by_method[row["method"]][row["ratio"]] = row
    print(f"| method | {' | '.join(ratio_label(r) for r in ratios)} | no ratio | s/cell |")
    print(f"|---|{'---|' * len(ratios)}---|---|")
    for method, cells in sorted(by_method.items()):
        def show(ratio):
            row = cells.get(ratio)
            if row is None:
                return ""
            low, high = float(row["share_low"]), float(row["share_high"])
            return f"{row['facts_recalled']}/{row['facts_asked']} ({low:.2f}-{high:.2f})"
        seconds = [float(row["seconds_per_cell"]) for row in cells.values()]
        print(f"| {method} | {' | '.join(show(r) for r in ratios)} | {show('')} | {sum(seconds) / len(seconds):.1f} |")
    print()
    print(f"Paired against {focus} (facts only {focus} recalled / only the other did, exact McNemar p):")
    print()
    pairs = [c for c in comparisons if focus in (c["method_a"], c["method_b"]) and c["ratio"]]
    for c in sorted(pairs, key=lambda c: (float(c["ratio"]), c["method_a"] + c["method_b"])):
        mine, theirs = ("only_a", "only_b") if c["method_a"] == focus else ("only_b", "only_a")
        other = c["method_b"] if c["method_a"] == focus else c["method_a"]
        print(f"- {ratio_label(c['ratio'])} vs {other}: +{c[mine]}/-{c[theirs]} of {c['facts']}, p={float(c['p_value']):.2g}")


if __name__ == "__main__":
    main()

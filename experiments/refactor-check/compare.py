#!/usr/bin/env python3
"""Compares two sweeps' results.jsonl cell by cell: the loss curve (every
float, bit for bit as JSON prints it), the answers and the entry counts must
be equal; seconds and builds may differ. Exit status 1 on any difference.

usage: compare.py BEFORE/results.jsonl AFTER/results.jsonl
"""
import json
import sys


def cells(path):
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return {(r["case"], r["method"], r["ratio"], r["seed"]): r for r in lines}


def main(before_path, after_path):
    before, after = cells(before_path), cells(after_path)
    if before.keys() != after.keys():
        print(f"different cells: only before {sorted(before.keys() - after.keys())}, only after {sorted(after.keys() - before.keys())}")
        return 1
    different = 0
    for key in sorted(before, key=str):
        b, a = before[key], after[key]
        fields = ["loss_curve", "answers", "n_tokens", "n_virtual", "facts_correct", "steps", "replacement_text"]
        changed = [field for field in fields if b.get(field) != a.get(field)]
        verdict = "same" if not changed else "DIFFERENT: " + ", ".join(changed)
        different += bool(changed)
        curve = b.get("loss_curve") or []
        final = f", final loss {curve[-1]}" if curve else ""
        print(f"{key[0]} {key[1]} {key[2]}: {b['facts_correct']}/{b['facts_total']} facts, {len(curve)} losses{final}: {verdict}")
        print(f"    builds: {b.get('build')} -> {a.get('build')}")
    print(f"{len(before) - different} of {len(before)} cells identical")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))

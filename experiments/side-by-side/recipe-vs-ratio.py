"""The recipe's rows of the side-by-side at every ratio, beside the others.

Reads the recipe's cells (V only, surprisal pooling, full budget) at 2.4x
from side-by-side-cpu-recipe{,-own} and at 1.6, 3.2, 4.8, 6.4x from
side-by-side-cpu-recipe-ratios; its K + V cells (`surprisal-kv`) from
side-by-side-cpu-recipe (2.4x, T8 and T18), -kv-ratios (T8 and T18 at
the other ratios) and -kv-own (the own cases at every ratio); and the
eviction and summary cells from side-by-side-cpu. Prints facts per
case and summed over the six cases, per method and ratio, as markdown.

    python3 experiments/side-by-side/recipe-vs-ratio.py
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ["t8-claude-md", "t18-auth-middleware", "t4-agents-md", "t6-settings", "t4-hacking-md", "t6-config"]
RATIOS = [1.6, 2.4, 3.2, 4.8, 6.4]
OTHERS = ["streaming", "snapkv", "key-norm", "summary"]
RECIPE_RUNS = {  # directory -> the label its V-only full-budget recipe cells carry
    "side-by-side-cpu-recipe": "surprisal-full-budget",
    "side-by-side-cpu-recipe-own": "surprisal",
    "side-by-side-cpu-recipe-ratios": "surprisal",
}
KV_RUNS = ["side-by-side-cpu-recipe", "side-by-side-cpu-kv-ratios", "side-by-side-cpu-kv-own"]


def results(directory):
    with open(os.path.join(HERE, directory, "results.jsonl")) as lines:
        return [json.loads(line) for line in lines if line.strip()]


def facts_table():
    """(method, case, ratio) -> facts recalled."""
    table = {}
    for directory, label in RECIPE_RUNS.items():
        for cell in results(directory):
            if cell["method"] == label:
                table[("recipe", cell["case"], cell["ratio"])] = cell["facts_correct"]
    for directory in KV_RUNS:
        for cell in results(directory):
            if cell["method"] == "surprisal-kv":
                table[("recipe-kv", cell["case"], cell["ratio"])] = cell["facts_correct"]
    for cell in results("side-by-side-cpu"):
        if cell["method"] in OTHERS:
            table[(cell["method"], cell["case"], cell["ratio"])] = cell["facts_correct"]
    return table


def main():
    table = facts_table()
    methods = ["recipe", "recipe-kv"] + OTHERS
    print("| method \\ ratio | " + " | ".join(str(r) for r in RATIOS) + " |")
    print("|---" * (len(RATIOS) + 1) + "|")
    for method in methods:
        sums = [sum(table[(method, case, ratio)] for case in CASES) for ratio in RATIOS]
        print(f"| {method} | " + " | ".join(str(s) for s in sums) + " |")
    print()
    print("| method | " + " | ".join(str(r) for r in RATIOS) + " |")
    print("|---" * (len(RATIOS) + 1) + "|")
    for method in methods:
        per_case = [" ".join(str(table[(method, case, ratio)]) for case in CASES) for ratio in RATIOS]
        print(f"| {method} | " + " | ".join(per_case) + " |")


if __name__ == "__main__":
    main()

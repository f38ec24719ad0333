"""Fact recall on the GPU in bf16 against the CPU in f32, fact by fact, on
the cells both ran (same case, method, ratio, rendering and settings).

    python3 experiments/gpu/compare_dtypes.py

Prints, per method, the facts recalled on each side, how many facts agree,
and the facts where they differ (an exact McNemar two-sided p on the
discordant pairs).
"""

import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stats import mcnemar  # noqa: E402

HERE = Path(__file__).parent
EXPERIMENTS = HERE.parent
PAIRS = [
    # (GPU bf16 results, CPU f32 results)
    (HERE / "recall-run/short/results.jsonl", EXPERIMENTS / "attention-matching/short-cases-cpu/results.jsonl"),
    (HERE / "recall-run/recall/results.jsonl", EXPERIMENTS / "side-by-side/side-by-side-cpu-recipe-ratios/results.jsonl"),
    (HERE / "recall-run/recall/results.jsonl", EXPERIMENTS / "attention-matching/short-cases-cpu/results.jsonl"),
]


def method_name(row):
    queries = (row.get("knobs") or {}).get("queries")
    return row["method"] + (f"[{queries}]" if queries else "")


def verdicts(path):
    """(case, method, ratio, fact) -> recalled, for compressed cells."""
    facts = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("ratio") is None:
            continue
        for answer in row["answers"]:
            for fact, recalled in answer["facts"]:
                facts[(row["case"], method_name(row), row["ratio"], fact)] = recalled
    return facts


def main():
    gpu_all, cpu_all = {}, {}
    for gpu_path, cpu_path in PAIRS:
        gpu, cpu = verdicts(gpu_path), verdicts(cpu_path)
        for key in gpu.keys() & cpu.keys():
            gpu_all[key], cpu_all[key] = gpu[key], cpu[key]
    by_method = collections.defaultdict(list)
    for key in sorted(gpu_all):
        by_method[key[1]].append(key)
    print("| method | facts | GPU bf16 recalled | CPU f32 recalled | agree | only GPU | only CPU | McNemar p |")
    print("|---|---|---|---|---|---|---|---|")
    differing = []
    for method, keys in by_method.items():
        gpu_only = [k for k in keys if gpu_all[k] and not cpu_all[k]]
        cpu_only = [k for k in keys if cpu_all[k] and not gpu_all[k]]
        agree = len(keys) - len(gpu_only) - len(cpu_only)
        print(f"| {method} | {len(keys)} | {sum(gpu_all[k] for k in keys)} | {sum(cpu_all[k] for k in keys)} | "
              f"{agree} | {len(gpu_only)} | {len(cpu_only)} | {mcnemar(len(gpu_only), len(cpu_only)):.2f} |")
        differing += [(k, "GPU") for k in gpu_only] + [(k, "CPU") for k in cpu_only]
    print("\nFacts recalled on one side only:")
    for (case, method, ratio, fact), side in differing:
        print(f"  {case} {method} {ratio}x {fact}: only {side}")


if __name__ == "__main__":
    main()

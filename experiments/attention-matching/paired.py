"""Facts recalled by methods of one sweep folder at one ratio, on the
calibrated facts (full context recalls, no context misses) that every
named method was asked, with the exact McNemar p-value of the first two;
and per method its cells' mean fit error (`fit_error`, methods that fit)
and median `compress_seconds`, over all its cells at that ratio.
For a folder whose sweep stopped early, where `cram report`'s pairs each
use all the facts two methods share.

    python3 experiments/attention-matching/paired.py RUN_DIR RATIO METHOD [METHOD ...]
"""
import collections
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stats import mcnemar  # noqa: E402


def main(run, ratio, methods):
    verdicts = collections.defaultdict(dict)
    cells = collections.defaultdict(list)
    for line in open(f"{run}/results.jsonl"):
        result = json.loads(line)
        cells[(result["method"], result["ratio"])].append(result)
        for answer in result["answers"]:
            for fact, recalled in answer["facts"]:
                verdicts[(result["method"], result["ratio"])][(result["case"], answer["question_id"], fact)] = recalled
    full, none = verdicts[("full", None)], verdicts[("none", None)]
    calibrated = {key for key, recalled in full.items() if recalled and not none.get(key, False)}
    common = set(calibrated)
    for method in methods:
        common &= set(verdicts[(method, ratio)])
    print(f"{len(common)} calibrated facts asked of all ({len(calibrated)} calibrated) at {ratio}x")
    for method in methods:
        own = cells[(method, ratio)]
        errors = [cell["fit_error"] for cell in own if cell.get("fit_error") is not None]
        seconds = [cell["compress_seconds"] for cell in own]
        fit = f", mean fit error {sum(errors) / len(errors):.3f}" if errors else ""
        print(f"  {method}: {sum(verdicts[(method, ratio)][key] for key in common)}{fit}, median compress {statistics.median(seconds):.1f} s over {len(own)} cells")
    if len(methods) >= 2:
        a, b = (verdicts[(method, ratio)] for method in methods[:2])
        only_a = sum(a[key] and not b[key] for key in common)
        only_b = sum(b[key] and not a[key] for key in common)
        print(f"  only {methods[0]}: {only_a}, only {methods[1]}: {only_b}, McNemar p = {mcnemar(only_a, only_b):.2g}")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3:])

"""Tables of a prepared GPU run (scripts/gpu-run.sh): cram's synthetic bench
beside PyTorch's step, and the self-test's verdicts.

    python3 experiments/gpu/table.py experiments/gpu/first-run
"""

import collections
import json
import sys
from pathlib import Path


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main(run):
    run = Path(run)
    tests = lines(run / "self-test.jsonl")
    outcomes = collections.Counter(test["outcome"] for test in tests)
    print(f"self-test: {len(tests)} checks, " + ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items())))
    for test in tests:
        if test["outcome"] != "passed":
            print(f"  {test['check']} {test['model']} {test['dtype']}: {test['outcome']} {json.dumps(test['detail'])[:200]}")

    torch_steps = {(t["shape"], t["n_virtual"]): t for t in lines(run / "pytorch.jsonl") if "step_seconds" in t}
    print("\n| shape | virtual | span | cram step s | PyTorch step s | cram/PyTorch | 5 ratios together s | together/one | "
          "GPU peak step MiB | GPU peak target MiB | 300-step compression s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for b in lines(run / "bench.jsonl"):
        shape = b["model"].removeprefix("random weights, ").removesuffix(" shapes")
        torch = torch_steps.get((shape, b["n_virtual"]))
        fmt = lambda value, digits: "-" if value is None else f"{value:.{digits}f}"
        ratio = None if torch is None else b["step_seconds"] / torch["step_seconds"]
        print(f"| {shape.removeprefix('qwen2.5-coder-')} | {b['n_virtual']} | {b['span_tokens']} | {b['step_seconds']:.3f} | "
              f"{fmt(torch and torch['step_seconds'], 3)} | {fmt(ratio, 2)} | {fmt(b['together_step_seconds'], 3)} | "
              f"{fmt(b['together_over_single'], 2)} | {fmt(b['step_peak_device_mib'], 0)} | {fmt(b['target_peak_device_mib'], 0)} | "
              f"{fmt(b['compression_seconds'], 1)} |")


if __name__ == "__main__":
    main(sys.argv[1])

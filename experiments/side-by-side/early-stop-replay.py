"""Where early stopping would stop the recorded (deterministic) recipe runs.

Replays cram's rule (`EarlyStop::plateaued`: stop before a step when the
best loss of the last `patience` steps is less than `min_improvement`
(relative) below the best before them) on the loss curves in results.jsonl
files. A CPU run is deterministic, so the early-stopped run's curve is the
full run's curve up to the stop.

usage: python3 experiments/side-by-side/early-stop-replay.py DIR/results.jsonl ...
"""
import json
import sys

RULES = [(25, 0.01), (25, 0.03), (25, 0.05)]


def plateaued(losses, patience, min_improvement):
    if patience == 0 or len(losses) <= patience:
        return False
    before, recent = losses[:-patience], losses[-patience:]
    return min(recent) > min(before) * (1.0 - min_improvement)


def stop_step(curve, budget, patience, min_improvement):
    pre_step = curve[:budget]  # the loss before each step
    for taken in range(budget + 1):
        if taken == budget or plateaued(pre_step[:taken], patience, min_improvement):
            return taken
    return budget


print("| run | case | method | ratio | steps | final loss | " + " | ".join(f"stop at ({p}, {m:g}): step, loss" for p, m in RULES) + " |")
print("|---" * (6 + len(RULES)) + "|")
for path in sys.argv[1:]:
    for line in open(path):
        r = json.loads(line)
        curve, steps = r.get("loss_curve") or [], r.get("steps", 0)
        if not curve or steps == 0 or r["case"].startswith("seq"):
            continue
        cells = []
        for patience, min_improvement in RULES:
            at = stop_step(curve, steps, patience, min_improvement)
            cells.append(f"{at}, {curve[at]:.3f}" if at < steps else f"none ({steps})")
        run = path.split("/")[-2]
        print(f"| {run} | {r['case']} | {r['method']} | {r['ratio']} | {steps} | {curve[-1]:.3f} | " + " | ".join(cells) + " |")

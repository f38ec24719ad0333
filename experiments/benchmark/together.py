"""Answers of two runs of the same cells, side by side: how many are
identical, which differ (and whether the fact's score moved), and the
seconds each cell spent outside its compaction (on the suffix and the
answers): the recorded `answer_seconds`, or for lines written before it
was recorded, `seconds` minus `compress_seconds`.

    python3 experiments/benchmark/together.py BEFORE AFTER
"""
import json
import statistics
import sys
from pathlib import Path


def cells(run):
    path = Path(run) / "results.jsonl"
    if not path.is_file():
        sys.exit(f"{path}: no results")
    lines = [json.loads(line) for line in path.open()]
    return {(r["case"], r["method"], r["ratio"], r["seed"]): r for r in lines}


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    before, after = cells(sys.argv[1]), cells(sys.argv[2])
    shared = sorted(set(before) & set(after), key=str)
    if not shared:
        sys.exit("the two runs share no cell")
    same = differ = moved = 0
    answer_seconds = {"before": [], "after": []}
    for key in shared:
        for label, run in (("before", before), ("after", after)):
            line = run[key]
            answer_seconds[label].append(line.get("answer_seconds", line["seconds"] - line["compress_seconds"]))
        for old, new in zip(before[key]["answers"], after[key]["answers"]):
            if old["answer"] == new["answer"]:
                same += 1
                continue
            differ += 1
            scores_moved = old["facts"] != new["facts"]
            moved += scores_moved
            print(f"{key[0]} {key[1]} {old['question_id']}{' (score moved)' if scores_moved else ''}")
            print(f"  before: {old['answer']!r}\n  after:  {new['answer']!r}")
    print(f"{len(shared)} cells, {same + differ} answers: {same} identical, {differ} differ ({moved} of them change a fact's score)")
    for label, seconds in answer_seconds.items():
        print(f"{label}: outside compaction, median {statistics.median(seconds):.1f} s a cell (min {min(seconds):.1f}, max {max(seconds):.1f})")


if __name__ == "__main__":
    main()

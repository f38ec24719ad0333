#!/usr/bin/env python3
"""Keeps, in a folder merged by `cram report DIR --merge ...`, the baselines
and the cells at RATIO (3.2x unless named) of the methods every pooled case
set ran, and writes the config.toml that makes the report calibrate (the
merged folders' configs differ, so `--merge` copied none).

usage: python3 experiments/benchmark/pool.py DIR [RATIO ...]
"""
import json
import sys

METHODS = {"attention-matching-spread", "attention-matching-spread-on-policy", "kvzip", "snapkv", "streaming", "key-norm"}
BASELINES = {"full", "none", "truncated"}


def main(folder, ratios):
    kept = []
    for line in open(f"{folder}/results.jsonl"):
        cell = json.loads(line)
        if cell["method"] in BASELINES or (cell["method"] in METHODS and cell["ratio"] in ratios):
            kept.append(line)
    with open(f"{folder}/results.jsonl", "w") as out:
        out.writelines(kept)
    with open(f"{folder}/config.toml", "w") as out:
        out.write("# Pooled by experiments/benchmark/pool.py from the run folders named in\n"
                  "# experiments/benchmark/README.md: only `calibrate` is read.\n"
                  "calibrate = true\n")
    print(f"{len(kept)} cells kept")


if __name__ == "__main__":
    main(sys.argv[1], [float(ratio) for ratio in sys.argv[2:]] or [3.2])

#!/usr/bin/env python3
"""Copies a run folder's results and case files to a new folder with some
methods renamed, all at once (`a=b b=a` swaps), so that cells run under an
old default's name pool with the same configuration in a later run: e.g.
methods-1000's `kvzip-q8192` is today's `kvzip`.

usage: python3 experiments/benchmark/rename.py SOURCE DEST OLD=NEW [OLD=NEW ...]
"""
import json
import shutil
import sys
from pathlib import Path


def main(source, dest, pairs):
    malformed = [pair for pair in pairs if "=" not in pair]
    if malformed or not pairs:
        sys.exit(f"rename.py: give renames as OLD=NEW (got {malformed or 'none'})")
    renames = dict(pair.split("=", 1) for pair in pairs)
    source, dest = Path(source), Path(dest)
    if not (source / "results.jsonl").is_file():
        sys.exit(f"rename.py: {source} has no results.jsonl")
    dest.mkdir(parents=True, exist_ok=True)
    if (source / "cases").is_dir():
        shutil.copytree(source / "cases", dest / "cases", dirs_exist_ok=True)
    lines = []
    for line in open(source / "results.jsonl"):
        cell = json.loads(line)
        cell["method"] = renames.get(cell["method"], cell["method"])
        lines.append(json.dumps(cell) + "\n")
    (dest / "results.jsonl").write_text("".join(lines))
    print(f"{len(lines)} cells copied to {dest}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])

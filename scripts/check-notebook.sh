#!/usr/bin/env bash
# Runs notebooks/sweep_results.ipynb top to bottom, headless, on a shipped
# results folder (default: experiments/benchmark/methods-250), in a virtual
# environment of its own under target/; fails if any cell raises.
#   scripts/check-notebook.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
run=$(realpath "${1:-experiments/benchmark/methods-250}")
venv=target/notebook-venv
if [ ! -x "$venv/bin/jupyter" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet nbconvert ipykernel pandas matplotlib
fi
out=$(mktemp -d)
# nbconvert exits non-zero when a cell raises.
(cd notebooks && CRAM_RUN="$run" "../$venv/bin/jupyter" nbconvert --to notebook --execute sweep_results.ipynb --output "$out/executed.ipynb")
# Every figure drawn: the plots are part of what is checked.
figures=$(grep -c '"image/png"' "$out/executed.ipynb" || true)
[ "$figures" -ge 2 ] || { echo "the notebook drew $figures figures, expected at least 2" >&2; exit 1; }
echo "notebook ran top to bottom on $run, $figures figures"

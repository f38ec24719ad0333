#!/usr/bin/env bash
# One sweep as N shards running at once on this machine (a GPU's kernels are
# launch-bound at the 0.5B's size, so several processes share one well),
# then one report merged from them: also when the run is stopped early
# (SIGTERM, `timeout`), from whatever cells the shards had finished.
#
#   scripts/sharded-sweep.sh CRAM CONFIG OUT_DIR SHARDS [cram sweep options]
#
# Shard I writes OUT_DIR/shard-I-of-N/ (its results.jsonl grows cell by cell;
# rerunning resumes), the merged report goes to OUT_DIR, each shard's output
# to OUT_DIR/shard-I-of-N.log.
set -uo pipefail
CRAM=${1:?usage: scripts/sharded-sweep.sh CRAM CONFIG OUT_DIR SHARDS [cram sweep options]}
CONFIG=${2:?}
OUT=${3:?}
SHARDS=${4:?}
shift 4
mkdir -p "$OUT"
pids=()
dirs=()
for shard in $(seq 1 "$SHARDS"); do
  dir=$OUT/shard-$shard-of-$SHARDS
  dirs+=("$dir")
  "$CRAM" sweep "$CONFIG" --shard "$shard/$SHARDS" --out "$dir" "$@" >"$dir.log" 2>&1 &
  pids+=($!)
done
merge() {
  # A stopped shard may leave no folder at all: merge the ones that exist.
  local present=()
  for dir in "${dirs[@]}"; do [[ -s $dir/results.jsonl ]] && present+=("$dir"); done
  if (( ${#present[@]} )); then
    "$CRAM" report "$OUT" --merge "${present[@]}"
  else
    echo "no shard finished a cell" >&2
  fi
}
stopped() {
  kill "${pids[@]}" 2>/dev/null
  wait
  echo "stopped: merging the cells finished so far" >&2
  merge
  exit 124
}
trap stopped TERM INT
failed=0
for index in "${!pids[@]}"; do
  if ! wait "${pids[$index]}"; then
    failed=1
    echo "shard $((index + 1))/$SHARDS failed (${dirs[$index]}.log):" >&2
    # The error line, not the backtrace that may follow it.
    grep -m 1 "^Error" "${dirs[$index]}.log" >&2 || tail -n 5 "${dirs[$index]}.log" >&2
  fi
done
merge
exit $failed

#!/usr/bin/env bash
# Issue 27's benchmark on one GPU (scripts/gpu-run.sh's `benchmark` step):
# the configs of experiments/benchmark/configs/ (full-250, full-1000,
# recipe-250-3.2x) at once, each as shards running side by side
# (scripts/sharded-sweep.sh), each merged into OUT_DIR/NAME/. Stopped early
# (SIGTERM, `timeout`), every sweep merges the cells it finished.
#
#   scripts/gpu-benchmark.sh CRAM MODEL_GGUF OUT_DIR
set -uo pipefail
CRAM=${1:?usage: scripts/gpu-benchmark.sh CRAM MODEL_GGUF OUT_DIR}
MODEL=${2:?}
OUT=${3:?}
REPO=$(cd "$(dirname "$0")/.." && pwd)
CONFIGS=$REPO/experiments/benchmark/configs
# One CPU thread a shard: the GPU does the arithmetic, and 14 shards share 16 cores.
export RAYON_NUM_THREADS=1
sweep() { "$REPO/scripts/sharded-sweep.sh" "$CRAM" "$CONFIGS/$1.toml" "$OUT/$1" "$2" --model "$MODEL" --device cuda & }
sweep full-250 8
sweep full-1000 4
sweep recipe-250-3.2x 2
trap 'kill -TERM $(jobs -p) 2>/dev/null; wait' TERM INT
wait

#!/usr/bin/env bash
# The prepared GPU run (issue 28): everything cram measures on a GPU, in one
# command that fits a short GPU window (under 8 minutes on an H100/H200).
#
#   scripts/gpu-run.sh BINARY OUT_DIR [MODEL_GGUF]
#
# BINARY: the CUDA build of `cram` (scripts/build-cuda.sh), plain or .xz.
# OUT_DIR: every result goes here as soon as it exists, so a crash or a
# time-out keeps what was written: env.txt (GPU, driver, libraries),
# self-test.jsonl, bench.jsonl (cram bench --synthetic, with compaction
# timings in its `compactions`), pytorch.jsonl (the
# same step in PyTorch), check.json (fact recall, only with MODEL_GGUF) and
# run.log (everything printed, with each step's wall time).
# Needs only the binary, the NVIDIA driver and the CUDA 13 libraries that
# ship with PyTorch (python3 -c 'import torch' must work); no Rust, no network.
# GPU_RUN_SECONDS (default 450) bounds the whole run: each step gets what
# is left, and the steps run most important first. GPU_RUN_STEPS (names of
# steps, space-separated; default all) runs only those.
# With MODEL_GGUF: `cram check` on the GPU (check.json) and a short recall
# sweep in bf16 (recall/, experiments/gpu/configs/recall-gpu.toml); and,
# only with GPU_RUN_STEPS=benchmark (alone: it takes the whole window, give
# GPU_RUN_SECONDS=560), issue 27's benchmark (benchmark/, scripts/gpu-benchmark.sh).
set -uo pipefail
BINARY=${1:?usage: scripts/gpu-run.sh BINARY OUT_DIR [MODEL_GGUF]}
OUT_DIR=${2:?usage: scripts/gpu-run.sh BINARY OUT_DIR [MODEL_GGUF]}
MODEL=${3:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/run.log
DEADLINE=$(( $(date +%s) + ${GPU_RUN_SECONDS:-450} ))
export PYTHONUNBUFFERED=1

log() { echo "[gpu-run $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

# step NAME BUDGET_SECONDS COMMAND...: runs it with at most BUDGET seconds
# (less if the deadline is nearer), its output appended to run.log.
step() {
  local name=$1 budget=$2; shift 2
  if [[ -n "${GPU_RUN_STEPS:-}" && " $GPU_RUN_STEPS " != *" $name "* ]]; then return; fi
  local left=$(( DEADLINE - $(date +%s) ))
  if (( left < 10 )); then log "$name: skipped, the run's time is spent"; return; fi
  (( budget > left )) && budget=$left
  log "$name: start (at most ${budget}s): $*"
  local started=$(date +%s.%N)
  timeout --kill-after=5 "$budget" "$@" >>"$LOG" 2>&1
  local rc=$?
  log "$name: exit $rc after $(python3 -c "print(f'{$(date +%s.%N) - $started:.1f}')")s"
}

# The binary and the CUDA libraries PyTorch ships.
CRAM=/tmp/cram-gpu-run/cram
mkdir -p "$(dirname "$CRAM")"
case "$BINARY" in
  *.xz) python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$BINARY" "$CRAM" ;;
  *) cp "$BINARY" "$CRAM" ;;
esac
chmod +x "$CRAM"
SITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
export LD_LIBRARY_PATH=$SITE/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
  "$CRAM" --version
  ldd "$CRAM"
} >"$OUT_DIR/env.txt" 2>&1
if grep -q "not found" "$OUT_DIR/env.txt"; then
  log "a library the binary needs is missing (env.txt); stopping"
  exit 1
fi

BENCH="$CRAM bench --device cuda --out $OUT_DIR/bench.jsonl"
PYTORCH="python3 $REPO/experiments/pytorch/recipe_reference.py --device cuda --dtype bf16 --out $OUT_DIR/pytorch.jsonl"
# T8's span at 3.2x is 76 virtual tokens, T24's 315.
step self-test 150 "$CRAM" self-test --device cuda --out "$OUT_DIR/self-test.jsonl"
step bench-1.5b-t8 60 $BENCH --synthetic qwen2.5-coder-1.5b --virtual 76 --compress-steps 300
step bench-7b-t8 90 $BENCH --synthetic qwen2.5-coder-7b --virtual 76 --compress-steps 300
step bench-7b-t24 60 $BENCH --synthetic qwen2.5-coder-7b --virtual 315
step pytorch-7b 60 $PYTORCH --synthetic qwen2.5-coder-7b --virtual 76,315
# Attention matching's and KVzip's seconds at real shapes (issue 26: "in
# seconds"): the repeat pass on the GPU, the per-head fits on the host's cores.
COMPACTIONS=(kvzip 'attention-matching:{"budgets":"spread"}' 'attention-matching:{"budgets":"spread","queries":"context"}')
step compaction-0.5b 45 $BENCH --synthetic qwen2.5-coder-0.5b --virtual 78,312 --steps 2 --no-together --methods "${COMPACTIONS[@]}"
step compaction-7b 45 $BENCH --synthetic qwen2.5-coder-7b --virtual 78 --steps 2 --no-together --methods "${COMPACTIONS[@]}"
step bench-0.5b-sizes 60 $BENCH --synthetic qwen2.5-coder-0.5b --virtual 64,128,256,512,1024
step pytorch-0.5b 40 $PYTORCH --synthetic qwen2.5-coder-0.5b --virtual 64,256,1024
step bench-1.5b-sizes 60 $BENCH --synthetic qwen2.5-coder-1.5b --virtual 64,128,256,512,1024
step bench-7b-sizes 60 $BENCH --synthetic qwen2.5-coder-7b --virtual 64,128,256,512,1024 --no-together
step pytorch-1.5b 40 $PYTORCH --synthetic qwen2.5-coder-1.5b --virtual 76,1024
if [[ -n "$MODEL" && -f "$MODEL" ]]; then
  step check-0.5b 90 "$CRAM" check --model "$MODEL" --device cuda --out "$OUT_DIR/check.json"
  step recall-sweep 240 "$CRAM" sweep "$REPO/experiments/gpu/configs/recall-gpu.toml" --model "$MODEL" --device cuda --out "$OUT_DIR/recall"
  # Only when asked for by name (GPU_RUN_STEPS=benchmark): it takes the whole window.
  if [[ " ${GPU_RUN_STEPS:-} " == *" benchmark "* ]]; then
    step benchmark 540 "$REPO/scripts/gpu-benchmark.sh" "$CRAM" "$MODEL" "$OUT_DIR/benchmark"
  fi
fi
log "done"

#!/usr/bin/env bash
# The runs behind "Then with the fix in the binary" in experiments/speed/README.md, in the
# order they ran, on a quiet machine, from the repository root (release build).
# The two sweeps wrote perf-stat.txt (and the second its folder) under /tmp
# first; they were copied here unchanged.
set -euo pipefail
D=experiments/speed/allocator
perf stat -e page-faults,task-clock -o $D/t24-3.2x-30-steps-keep-freed/perf-stat.txt \
  target/release/cram sweep experiments/speed/configs/t24-3.2x-timing.toml --out $D/t24-3.2x-30-steps-keep-freed
MIMALLOC_PURGE_DELAY=1000 perf stat -e page-faults,task-clock -o $D/t24-3.2x-30-steps-purge-1000ms/perf-stat.txt \
  target/release/cram sweep experiments/speed/configs/t24-3.2x-timing.toml --out $D/t24-3.2x-30-steps-purge-1000ms
target/release/cram bench --virtual 64,320 --steps 8 --no-together --threads 2 --out $D/bench-keep-freed.jsonl
MIMALLOC_PURGE_DELAY=1000 target/release/cram bench --virtual 64,320 --steps 8 --no-together --threads 2 \
  --out $D/bench-purge-1000ms.jsonl
# Then .ci/run, then the environment variable and the built-in setting once more
# (the first built-in run above had been 10% slower than the env-var run before it):
MIMALLOC_PURGE_DELAY=-1 perf stat -e page-faults,task-clock -o $D/t24-3.2x-30-steps-purge-never-again/perf-stat.txt \
  target/release/cram sweep experiments/speed/configs/t24-3.2x-timing.toml --out $D/t24-3.2x-30-steps-purge-never-again
perf stat -e page-faults -o $D/t24-3.2x-30-steps-keep-freed-again/perf-stat.txt \
  target/release/cram sweep experiments/speed/configs/t24-3.2x-timing.toml --out $D/t24-3.2x-30-steps-keep-freed-again

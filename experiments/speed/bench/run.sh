#!/bin/sh
# The figures of experiments/speed/README.md, on the 2-core CPU, one after another,
# from the repository root.
set -e
out=experiments/speed/bench
for threads in 1 2; do
  ./target/release/cram bench --virtual 64,128,256,512,1024 --steps 6 --no-together --threads $threads --out $out/sizes.jsonl
done
for threads in 1 2; do
  ./target/release/cram bench --virtual 65 --steps 8 --threads $threads --out $out/together.jsonl
done
# The published ten-turn case's longest turn (1,579 tokens) at 2x after a long cache.
./target/release/cram bench --virtual 790 --prefix 1500 --ratio 2 --steps 2 --no-together --threads 2 --out $out/long-turn.jsonl
# The PyTorch side-by-side's second size (130 virtual tokens after 140).
for threads in 1 2; do
  ./target/release/cram bench --virtual 130 --steps 8 --no-together --threads $threads --out $out/pytorch-sizes.jsonl
done
# The heap peak of one long step, before and after (criterion bench's counting
# allocator): set PREFIX_TOKENS = 1000 and VIRTUAL_TOKENS = [700] in
# benches/benches/optimization_step.rs, then
#   cargo bench -p cram-benches --bench optimization_step
# and read the "peak extra heap" line (run once at 1f774f8, once after).

# Session of 2026-11-21 (afternoon). The parallel f32 softmax (commit 71c572b,
# reverted in 14df59a): /tmp/cram-before-fused-softmax is a release build of
# 7892360, /tmp/cram-after-fused-softmax one of 71c572b.
for build in before after; do
  /tmp/cram-$build-fused-softmax bench --virtual 64,512 --steps 6 --no-together --threads 2 --out $out/fused-softmax-$build.jsonl
done
# The 1.5B model on CPU (fetched with `cram fetch-model qwen2.5-coder-1.5b-instruct`).
cram bench --model qwen2.5-coder-1.5b-instruct --virtual 64,128,256 --steps 4 --no-together --threads 2 --out $out/sizes-1.5b.jsonl

# Session of 2026-11-30. Decoding's matrix-vector products split by weight rows
# across the threads (model/ops.rs, Linear::row_split_product): /tmp/cram-nosplit
# is a release build of 7ef4822, /tmp/cram-split one with the split; run in turn,
# twice each, 2 and 6 steps.
for steps in 2 6; do
  for build in nosplit split nosplit split; do
    /tmp/cram-$build bench --virtual 64 --steps $steps --no-together --threads 2 --out /tmp/ab-$build.jsonl
  done
done
# then decode-split-before.jsonl = the nosplit lines, decode-split-after.jsonl = the split lines.

# Session of 2026-11-30 (evening). Answers decoded together: one answer, then 8
# answers of 32 tokens decoded together, after a 1,000-token prefix and 64
# virtual tokens; /tmp/cram-s6b is a release build of the commit that brought
# `[ask] together`; run twice.
for run in 1 2; do
  /tmp/cram-s6b bench --virtual 64 --prefix 1000 --steps 2 --no-together --threads 2 --answer-rows 8 --out $out/answers-together.jsonl
done

# Session of 2026-12-01. Rows decoded together read the shared cache once
# (model/rows.rs, `Attended::AfterShared`) instead of each holding a copy.
# /tmp/cram-s7 is a release build of 8c407ad (before), /tmp/cram-s8a one of the
# change (after); one run each, 1 thread, while two sweeps ran on both cores.
for build in s7 s8a; do
  /usr/bin/time -v /tmp/cram-$build bench --virtual 64 --prefix 1000 --steps 2 --no-together --threads 1 --answer-rows 8 --out /tmp/ab/$build.jsonl
done
# then shared-once-before.jsonl = s7's line, shared-once-after.jsonl = s8a's.

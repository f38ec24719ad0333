#!/bin/sh
# The figures of experiments/issue6-speed.md, on the 2-core CPU, one after another.
set -e
out=experiments/issue6-bench
for threads in 1 2; do
  ./target/release/cram bench --virtual 64,128,256,512,1024 --steps 6 --no-together --threads $threads --out $out/sizes.jsonl
done
for threads in 1 2; do
  ./target/release/cram bench --virtual 65 --steps 8 --threads $threads --out $out/together.jsonl
done
# The published ten-turn case's longest turn (1,579 tokens) at 2x after a long cache.
./target/release/cram bench --virtual 790 --prefix 1500 --ratio 2 --steps 2 --no-together --threads 2 --out $out/long-turn.jsonl

#!/usr/bin/env bash
# Resumes the T24 1.6x pair from the mid-cell saves committed beside this
# script (t24-1.6x-state/{surprisal,uniform}/*.safetensors.xz): on these
# machines /tmp does not outlive a session, so the saves travel in git.
# Run from the repository root after `cargo build --release` and
# `./target/release/cram fetch-model 0.5b`; each cell then appends to
# /tmp/t24/{surprisal,uniform}-1.6.log. A save only resumes a run whose
# targets hash to its name (same model, settings and arithmetic); otherwise
# the cell starts from step 0, which its log shows.
set -euo pipefail
state=experiments/sweep-checkpoints/t24-1.6x-state
mkdir -p /tmp/t24
cp target/release/cram /tmp/t24/cram16
cp experiments/sweep-checkpoints/t24-1.6x-run-one.sh /tmp/t24/run16-one.sh
for pooling in $(ls "$state"); do  # the cells not yet finished
  cp experiments/sweep-checkpoints/t24-1.6x-$pooling.toml /tmp/t24/$pooling-1.6.toml
  mkdir -p /tmp/t24/out16-$pooling/checkpoints
  for save in "$state"/$pooling/*.safetensors.xz; do
    xz -dc "$save" > /tmp/t24/out16-$pooling/checkpoints/"$(basename "$save" .xz)"
  done
  (cd /tmp/t24 && nohup bash run16-one.sh $pooling > /dev/null 2>&1 &)
done

#!/bin/sh
# The side-by-side's CPU runs, in order (2 cores, one job at a time), from the
# repository root. Each sweep is resumable: rerunning skips the finished cells.
set -e
D=experiments/side-by-side
cargo build --release
./target/release/cram sweep $D/configs/side-by-side-cpu.toml --out $D/side-by-side-cpu
./target/release/cram sweep $D/configs/side-by-side-cpu-recipe.toml --out $D/side-by-side-cpu-recipe
./target/release/cram sweep $D/configs/side-by-side-cpu-init.toml --out $D/side-by-side-cpu-init
./target/release/cram sweep $D/configs/side-by-side-cpu-recipe-own.toml --out $D/side-by-side-cpu-recipe-own
RAYON_NUM_THREADS=1 ./target/release/cram sweep $D/configs/side-by-side-cpu-t24.toml --out $D/side-by-side-cpu-t24

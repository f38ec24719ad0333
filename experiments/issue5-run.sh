#!/bin/sh
# Issue 5's CPU runs, in order (2 cores, one job at a time). Each sweep is
# resumable: rerunning skips the finished cells.
set -e
cargo build --release
./target/release/cram sweep configs/side-by-side-cpu.toml --out experiments/issue5-side-by-side-cpu
./target/release/cram sweep configs/side-by-side-cpu-recipe.toml --out experiments/issue5-side-by-side-cpu-recipe
./target/release/cram sweep configs/side-by-side-cpu-init.toml --out experiments/issue5-side-by-side-cpu-init
./target/release/cram sweep configs/side-by-side-cpu-recipe-own.toml --out experiments/issue5-side-by-side-cpu-recipe-own
RAYON_NUM_THREADS=1 ./target/release/cram sweep configs/side-by-side-cpu-t24.toml --out experiments/issue5-side-by-side-cpu-t24

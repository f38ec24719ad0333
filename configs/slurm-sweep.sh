#!/bin/bash
# A sweep over a Slurm job array: one shard of the sweep's cells per array
# task, each into its own folder, then one job that merges the shards'
# results into a single report once every task has succeeded.
#
#   cram fetch-model 0.5b                 # once, before: tasks must not all fetch it at once
#   mkdir -p runs                         # the logs' folder must exist when a job starts
#   sbatch configs/slurm-sweep.sh configs/side-by-side.toml [cram sweep options]
#
# Results: runs/NAME/shard-I-of-N/ per task, the merged report in runs/NAME/
# (results.jsonl, summary.csv with Wilson intervals, comparisons.csv, plots).
# A task that fails or times out can be resubmitted alone, with the
# array's size (`SHARDS=8 sbatch --array=3 configs/slurm-sweep.sh CONFIG`):
# it resumes from its folder's results and checkpoints. Resubmitting task 1
# queues another merge; merging twice is harmless.
# Every task must run the same config and options: shards of different
# ones slice the cells differently.
#
# Set the array, the resources and the time limit for your cluster; the
# array must count from 1 (I of --shard I/N runs from 1 to N).
#SBATCH --job-name=cram-sweep
#SBATCH --array=1-8
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=12:00:00
#SBATCH --output=runs/slurm-%x-%A_%a.log
# For GPUs, add e.g. `#SBATCH --gres=gpu:1` and pass `--device cuda` (and
# `--batch-virtual-tokens 4096`) in EXTRA below.

set -euo pipefail

CONFIG=${1:?usage: sbatch configs/slurm-sweep.sh CONFIG.toml [cram sweep options]}
shift
EXTRA=("$@")                                   # more `cram sweep` options, the same for every task
CRAM=${CRAM:-cram}                             # the binary; e.g. CRAM=target/release/cram
NAME=$(basename "$CONFIG" .toml)
OUT=runs/$NAME
# The array's size, even when a single task is resubmitted (`--array=3`).
SHARDS=${SHARDS:-$SLURM_ARRAY_TASK_COUNT}
SHARD=$SLURM_ARRAY_TASK_ID

# candle's CPU kernels use as many threads as the task has cores.
export RAYON_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

# The first task queues the merge: it starts when every task of this array
# has ended successfully (afterok), and never if one failed; once a failed
# task has been rerun, merge by hand with the same command.
if [ "$SHARD" -eq 1 ]; then
  SHARD_DIRS=()
  for i in $(seq 1 "$SHARDS"); do SHARD_DIRS+=("$OUT/shard-$i-of-$SHARDS"); done
  sbatch --job-name="$SLURM_JOB_NAME-merge" --dependency="afterok:$SLURM_ARRAY_JOB_ID" \
    --cpus-per-task=1 --mem=2G --time=00:30:00 --output="runs/slurm-%x-%j.log" \
    --wrap="$CRAM report $OUT --merge ${SHARD_DIRS[*]}"
fi

"$CRAM" sweep "$CONFIG" --shard "$SHARD/$SHARDS" --out "$OUT/shard-$SHARD-of-$SHARDS" ${EXTRA[@]+"${EXTRA[@]}"}

#!/bin/sh
# cram's step beside PyTorch's again, with the allocator fix (experiments/speed/README.md,
# "The allocator gave memory back between steps"): the sizes and commands of
# "One step beside PyTorch", both sides in one sitting on a quiet machine,
# each cram size followed at once by PyTorch's, so drift hits both alike.
# From the repository root.
set -e
out=experiments/speed/pytorch-again
model=~/.cache/cram/models/qwen2.5-coder-0.5b-instruct.gguf
python=${PYTHON:-/work/venv-torch/bin/python}
for threads in 1 2; do
  for pair in 3.2:65 1.6:130; do
    ratio=${pair%:*}; virtual=${pair#*:}
    ./target/release/cram bench --virtual $virtual --steps 8 --no-together --threads $threads --out $out/cram.jsonl
    $python experiments/pytorch/recipe_reference.py --tokens experiments/pytorch/t8-tokens.json \
      --gguf $model --ratio $ratio --steps 30 --time-only --threads $threads \
      --out $out/pytorch-t8-$ratio-threads$threads.json
  done
done

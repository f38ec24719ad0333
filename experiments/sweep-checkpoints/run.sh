# T8 at 1.6x (130 virtual tokens), 120 steps, one thread, mimalloc never
# purging, with its resident memory sampled every 5 s. Run in the
# repository root, beside the two T24 2.4x cells (so seconds here are not
# speed figures). Three builds:
#   old   = the build of the previous session's T24 3.2x cells (candle-nn's AdamW)
#   leaky = ab082f9 (cram's own Adam, moments built on the undetached gradient); stopped after 59 samples
#   fixed = 6c5d6eb (the gradient detached)
# t8.toml is configs/reproduce-full.toml cut to T8, surprisal, 1.6x, steps = 120.
for b in old leaky fixed; do
  bin=/path/to/cram-$b
  MIMALLOC_PURGE_DELAY=-1 RAYON_NUM_THREADS=1 $bin sweep experiments/sweep-checkpoints/t8.toml --out /tmp/leak/out-$b > /tmp/leak/$b.log 2>&1 &
  pid=$!
  while kill -0 $pid 2>/dev/null; do echo "$(date +%s) $(ps -o rss= -p $pid)" >> rss-$b.txt; sleep 5; done
done

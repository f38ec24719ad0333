# One cell of the T24 1.6x pair (argument: surprisal or uniform), appending to its log.
# As run: binary, configs (copied here as t24-1.6x-{surprisal,uniform}.toml),
# output and log under /tmp/t24; /work/main is the repository.
cd /work/main
RAYON_NUM_THREADS=1 /tmp/t24/cram16 sweep /tmp/t24/$1-1.6.toml --out /tmp/t24/out16-$1 >> /tmp/t24/$1-1.6.log 2>&1

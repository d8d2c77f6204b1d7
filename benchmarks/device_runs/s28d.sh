# PixArt nested R from cold caches with a cProfile of the first call (the 120 s bar: 158 s in session 24) (~330 s)
. .whl/setup.sh
export TRITON_CACHE_DIR=/tmp/cold-triton TORCHINDUCTOR_CACHE_DIR=/tmp/cold-inductor
rm -rf $TRITON_CACHE_DIR $TORCHINDUCTOR_CACHE_DIR
timeout 560 python3 benchmarks/gpu_bench.py --sections models --models pixart --variants "fxquant-nested:$R" \
  --compile-profile $OUT/pixart-nested-cold-compile-profile.txt --out $OUT/pixart-nested-cold-compile.json 2>&1 \
  | grep -v Warning | tail -20

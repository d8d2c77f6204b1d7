# PixArt nested R from cold caches: the first call's torch.compile phases (JSON "compile_phases_seconds", no profiler:
# session 29's cProfile run of the same did not finish in 450 s) -- where the 158 s of the 120 s bar go (~5 min)
. .whl/setup.sh
export TRITON_CACHE_DIR=/tmp/cold-triton TORCHINDUCTOR_CACHE_DIR=/tmp/cold-inductor
rm -rf $TRITON_CACHE_DIR $TORCHINDUCTOR_CACHE_DIR
timeout 560 python3 benchmarks/gpu_bench.py --sections models --models pixart --variants "fxquant-nested:$R" \
  --out $OUT/pixart-nested-cold-compile-phases.json 2>&1 | grep -v Warning | grep "^pixart" | cut -c1-3000

# Session 29: CogVideoX R regional vs bf16 compile (the 1.4x bar; static scales now read in place) (~6 min)
. .whl/setup.sh
timeout 560 python3 benchmarks/gpu_bench.py --sections models --models cogvideox --variants bf16_compile \
  "fxquant-blocks:$R" --out $OUT/cogvideox-regional.json 2>&1 | grep -v Warning | tail -12

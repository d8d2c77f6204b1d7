# SDXL nested S vs bf16 compile: the 1.2x bar with session 25's wave rule (~400 s)
. .whl/setup.sh
timeout 560 python3 benchmarks/gpu_bench.py --sections models --models sdxl --variants bf16_compile "fxquant-nested:$S" \
  --out $OUT/sdxl-nested-wave-rule.json 2>&1 | grep -v Warning | tee $OUT/sdxl-nested-wave-rule.log | tail -40

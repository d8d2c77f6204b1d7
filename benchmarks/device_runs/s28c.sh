# w4a8-fp8 on Flux and CogVideoX against w8a8-fp8, regional (~560 s)
. .whl/setup.sh
timeout 250 python3 benchmarks/gpu_bench.py --sections models --models flux --variants bf16_compile \
  "fxquant-blocks:$R" "fxquant-blocks:w4a8-fp8:$O" --out $OUT/flux-w4a8-fp8-regional.json 2>&1 | grep -v Warning | tail -20
timeout 320 python3 benchmarks/gpu_bench.py --sections models --models cogvideox --variants bf16_compile \
  "fxquant-blocks:w4a8-fp8:$O" --out $OUT/cogvideox-w4a8-fp8-regional.json 2>&1 | grep -v Warning | tail -20

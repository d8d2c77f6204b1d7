# PixArt regional W8 / W4 fp8 after session 27's K-loop changes, then the kernel checks (~400 s)
. .whl/setup.sh
timeout 330 python3 benchmarks/gpu_bench.py --sections models --models pixart --variants bf16_compile \
  "fxquant-blocks:$R" "fxquant-blocks:w4a8-fp8:$O" --out $OUT/pixart-w4a8-fp8-sign-magnitude.json 2>&1 \
  | grep -v Warning | tee $OUT/pixart-w4a8-fp8-sign-magnitude.log | tail -30
timeout 200 python3 benchmarks/gpu_bench.py --sections kernels --out $OUT/kernels-sign-magnitude.json 2>&1 \
  | grep -v Warning | tail -30

# Session 30: group-wise W4 GEMMs at DiT shapes (correctness against the reference ops, then times against
# per-channel W4 and W8), then PixArt-alpha 256 px batch 1, w4a8-fp8 per-channel vs group-wise 128, regional (~7 min)
. .whl/setup.sh
timeout 200 python3 benchmarks/group_wise_gemm.py --out $OUT/group-wise-gemm.json 2>&1 | grep -v Warning | tail -12
timeout 300 python3 benchmarks/gpu_bench.py --sections models --models pixart_256 --variants bf16_compile \
  "fxquant-blocks:w4a8-fp8:$O" "fxquant-blocks:w4a8-fp8:$O,weight_granularity=per_group,weight_group_size=128" \
  --out $OUT/pixart-256-w4-group-wise.json 2>&1 | grep -v Warning | grep "^pixart" | cut -c1-300

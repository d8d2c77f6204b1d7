# PixArt-alpha 1024 regional w4a8-fp8, per-channel against group-wise 128 (untimed at this size so far; ~6 min)
. .whl/setup.sh
timeout 500 python3 benchmarks/gpu_bench.py --sections models --models pixart --variants bf16_compile \
  "fxquant-blocks:w4a8-fp8:$O" "fxquant-blocks:w4a8-fp8:$O,weight_granularity=per_group,weight_group_size=128" \
  --out $OUT/pixart-1024-w4-group-wise.json 2>&1 | grep -v Warning | grep "^pixart" | cut -c1-300

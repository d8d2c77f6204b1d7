# Session 29: PixArt-alpha 256 px batch 1 (256 tokens), W8 / W4 fp8 regional against bf16 compile after the few-token
# rule and the W4 attention operand GEMMs on packed codes, then the W4 packed tiles (128-deep ones new) and the
# few-token 8-bit tiles (~9 min)
. .whl/setup.sh
timeout 250 python3 benchmarks/gpu_bench.py --sections models --models pixart_256 --variants bf16_compile \
  "fxquant-blocks:$R" "fxquant-blocks:w4a8-fp8:$O" --out $OUT/pixart-256-w4-w8.json 2>&1 | grep -v Warning | tail -8
timeout 150 python3 benchmarks/gpu_bench.py --sections packed_tiles --out $OUT/packed-tiles.json 2>&1 \
  | grep -v Warning > $OUT/packed-tiles.log; tail -3 $OUT/packed-tiles.log
timeout 150 python3 benchmarks/gpu_bench.py --sections few_token_tiles --out $OUT/few-token-tiles.json 2>&1 \
  | grep -v Warning > $OUT/few-token-tiles.log; tail -3 $OUT/few-token-tiles.log

# W4A8 where the issue expects it to win: PixArt-alpha at 256 px, batch 1 (256 tokens), W8 / W4 fp8 regional against
# bf16 compile (~4 min), then the few-token GEMM tiles (~2.5 min)
. .whl/setup.sh
timeout 330 python3 benchmarks/gpu_bench.py --sections models --models pixart_256 --variants bf16_compile \
  "fxquant-blocks:$R" "fxquant-blocks:w4a8-fp8:$O" --out $OUT/pixart-256-w4-w8.json 2>&1 | grep -v Warning | tail -8
timeout 200 python3 benchmarks/gpu_bench.py --sections few_token_tiles --out $OUT/few-token-tiles.json 2>&1 \
  | grep -v Warning | tee $OUT/few-token-tiles.log | tail -10

# PixArt-alpha 256 px batch 1: session 29's modulation-table rewrite A/B in one process (R with and without it),
# against bf16 compile, then the same at 1024 px (~8 min)
. .whl/setup.sh
timeout 220 python3 benchmarks/gpu_bench.py --sections models --models pixart_256 --variants bf16_compile \
  "fxquant-blocks:$R" "fxquant-blocks:$R@fxquant.fuse_modulation_tables=0" --out $OUT/pixart-256-modulation-table.json \
  2>&1 | grep -v Warning | grep "^pixart" | cut -c1-400
timeout 340 python3 benchmarks/gpu_bench.py --sections models --models pixart --variants bf16_compile \
  "fxquant-blocks:$R" "fxquant-blocks:$R@fxquant.fuse_modulation_tables=0" --out $OUT/pixart-modulation-table.json \
  2>&1 | grep -v Warning | grep "^pixart" | cut -c1-400

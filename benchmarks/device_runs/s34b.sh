# Session 34, after s34a: with a FASTEST_CONFIGS entry for PixArt's head dim 72 as argument (e.g. "72: (64, 128, 4,
# 3)", given where s34a's kernel times show the Gluon kernel ahead), PixArt-alpha 1024 regional R with and without the
# Gluon attention kernel; then SD3 (head dim 64, where the kernels tied alone) the same way (~9 min)
. .whl/setup.sh
if [ -n "$1" ]; then
  sed -i "s/^FASTEST_CONFIGS = {/FASTEST_CONFIGS = {$1, /" backends/triton/attention_hopper.py
  grep "^FASTEST_CONFIGS" backends/triton/attention_hopper.py
  timeout 300 python3 benchmarks/gpu_bench.py --sections models --models pixart --variants bf16_compile \
    "fxquant-blocks:$R@fxquant.gluon_attention=1" "fxquant-blocks:$R" --out $OUT/pixart-gluon-attention.json 2>&1 \
    | grep -v Warning | grep "^pixart" | cut -c1-400
fi
timeout 270 python3 benchmarks/gpu_bench.py --sections models --models sd3 --variants bf16_compile \
  "fxquant-blocks:$R@fxquant.gluon_attention=1" "fxquant-blocks:$R" --out $OUT/sd3-gluon-attention.json 2>&1 \
  | grep -v Warning | grep "^sd3" | cut -c1-400

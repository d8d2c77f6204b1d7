# Session 33, then: PixArt-alpha 1024 (head dim 72: 128-wide Gluon tiles) and the Flux stack (head dim 128) regional R
# with and without the Gluon attention kernel, against bf16 compile (~9 min)
. .whl/setup.sh
timeout 300 python3 benchmarks/gpu_bench.py --sections models --models pixart --variants bf16_compile \
  "fxquant-blocks:$R@fxquant.gluon_attention=1" "fxquant-blocks:$R" --out $OUT/pixart-gluon-attention.json 2>&1 \
  | grep -v Warning | grep "^pixart" | cut -c1-400
timeout 260 python3 benchmarks/gpu_bench.py --sections models --models flux --variants bf16_compile \
  "fxquant-blocks:$R@fxquant.gluon_attention=1" "fxquant-blocks:$R" --out $OUT/flux-gluon-attention.json 2>&1 \
  | grep -v Warning | grep "^flux" | cut -c1-400

# Session 33, if s33a's checks pass and the Gluon kernel is faster: CogVideoX-2B regional R with the attention by the
# Gluon kernel (backend option fxquant.gluon_attention) against the Triton kernel and bf16 compile (~6 min)
. .whl/setup.sh
timeout 560 python3 benchmarks/gpu_bench.py --sections models --models cogvideox --variants bf16_compile \
  "fxquant-blocks:$R@fxquant.gluon_attention=1" "fxquant-blocks:$R" --out $OUT/cogvideox-gluon-attention.json 2>&1 \
  | grep -v Warning | grep -v "^ *warn" | tail -25

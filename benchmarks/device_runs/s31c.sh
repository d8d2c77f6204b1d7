# Session 31: Flux regional R with the attention by cuDNN (fxquant.cudnn_attention; 1.22x the Triton kernel at
# Flux's head dim 128 in s31b's probe) against the Triton kernel and bf16 compile (~4 min)
# (the backend option fxquant.cudnn_attention was measured, found no faster than the Triton kernel and removed after
# this run: commit 0fb6089 has it)
. .whl/setup.sh
timeout 330 python3 benchmarks/gpu_bench.py --sections models --models flux --variants bf16_compile \
  "fxquant-blocks:$R@fxquant.cudnn_attention=1" "fxquant-blocks:$R" --out $OUT/flux-cudnn-attention.json 2>&1 \
  | grep -v Warning | grep "^flux" | cut -c1-400

# Session 31: cuDNN's fp8 flash attention at the models' shapes (~2 min), then CogVideoX-2B regional R with the
# attention by cuDNN (backend option fxquant.cudnn_attention) against the Triton kernel and bf16 compile (~6 min)
# (the backend option fxquant.cudnn_attention was measured, found no faster than the Triton kernel and removed after
# this run: commit 0fb6089 has it)
. .whl/setup.sh
timeout 200 python3 benchmarks/cudnn_fp8_attention.py --out $OUT/cudnn-fp8-attention.json 2>&1 | grep -v Warning | tail -30
timeout 370 python3 benchmarks/gpu_bench.py --sections models --models cogvideox --variants bf16_compile \
  "fxquant-blocks:$R@fxquant.cudnn_attention=1" "fxquant-blocks:$R" --out $OUT/cogvideox-cudnn-attention.json 2>&1 \
  | grep -v Warning | grep -v "^ *warn" | tail -25

# Session 32 plan: the attention tiles at Flux's head dim 128 (cuDNN's fp8 kernel was 18 % faster there in session
# 31; ~3 min), then the group-wise GEMMs as CUDA-graph replays (~2.5 min)
. .whl/setup.sh
timeout 240 python3 benchmarks/gpu_bench.py --sections attention attention_configs --attention-shapes flux \
  --out $OUT/attention-flux-tiles.json 2>&1 | grep -v Warning | tail -12
timeout 220 python3 benchmarks/group_wise_gemm.py --out $OUT/group-wise-gemm-cuda-graphs.json 2>&1 \
  | grep -v Warning | tail -12

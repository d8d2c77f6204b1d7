# one command for whichever card comes: an H200 times the GEMM bar as the issue measured it (+ few-token tiles,
# kernel checks); an H100 runs W4 / W8 PixArt at 256 tokens (+ few-token tiles: s28g.sh)
. .whl/setup.sh
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  timeout 200 python3 benchmarks/gpu_bench.py --sections gemm --out $OUT/gemm-h200.json 2>&1 | grep -v Warning | tee $OUT/gemm-h200.log | tail -10
  timeout 160 python3 benchmarks/gpu_bench.py --sections few_token_tiles --out $OUT/few-token-tiles-h200.json 2>&1 | grep -v Warning | tee $OUT/few-token-tiles-h200.log | tail -10
  timeout 80 python3 benchmarks/gpu_bench.py --sections residual_parts --out $OUT/residual-parts-h200.json 2>&1 | grep -v Warning | tail -5
  timeout 90 python3 benchmarks/gpu_bench.py --sections kernels --out $OUT/kernels-h200.json 2>&1 | grep -v Warning | tail -20
else
  bash .whl/s28g.sh  # (setup again: a no-op reinstall)
fi

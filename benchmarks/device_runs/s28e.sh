# GEMM microbenchmark (the 1.5x-bf16 bar: the issue's figures are an H200's), 8-bit tiles at a few hundred tokens,
# kernel checks at full shapes (~8 min)
. .whl/setup.sh
timeout 180 python3 benchmarks/gpu_bench.py --sections few_token_tiles --out $OUT/few-token-tiles.json 2>&1 | grep -v Warning | tail -12
timeout 170 python3 benchmarks/gpu_bench.py --sections gemm --out $OUT/gemm.json 2>&1 | grep -v Warning | tail -12
timeout 100 python3 benchmarks/gpu_bench.py --sections residual_parts --out $OUT/residual-parts.json 2>&1 | grep -v Warning | tail -6
timeout 100 python3 benchmarks/gpu_bench.py --sections kernels --out $OUT/kernels.json 2>&1 | grep -v Warning | tail -25

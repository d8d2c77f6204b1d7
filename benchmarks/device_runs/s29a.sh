# Session 29, first command (~6 min): the pipe probe (does the fp32 -> e4m3 conversion share the exp2 unit?), then
# PixArt nested R from cold caches with a cProfile of the first call (the 120 s bar: 158 s in session 24)
. .whl/setup.sh
timeout 60 python3 benchmarks/gpu_bench.py --sections pipes --out $OUT/pipes.json 2>&1 | grep -v Warning | tail -5
bash .whl/s28d.sh

# Session 36, after s36a on the same machine: SDXL nested S without fill tiles (the rule before session 35) against
# the same with them, one process (~9 min; the A/B of s36a's figure)
. .whl/setup.sh
timeout 590 python3 benchmarks/gpu_bench.py --sections models --models sdxl --variants "fxquant-nested:$S" \
  "fxquant-nested:$S@bench.fill_tiles=0" --out $OUT/sdxl-fill-tiles-ab.json 2>&1 | grep -v Warning \
  | grep "^sdxl\|Error" | cut -c1-400

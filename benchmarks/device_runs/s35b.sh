# Session 35, after s35a (its sweep copied to .whl/): SDXL nested S on fixed_config's GEMM tiles against the same on
# the sweep's fastest tiles, same process (~6 min)
. .whl/setup.sh
timeout 480 python3 benchmarks/gpu_bench.py --sections models --models sdxl --swept-tiles .whl/sdxl-gemm-tiles-s35.json \
  --variants "fxquant-nested:$S" "fxquant-nested:$S@bench.sweep_tiles=1" --out $OUT/sdxl-swept-tiles-ab-s35.json \
  2>&1 | grep -v Warning | grep "^sdxl\|swept\|Error" | cut -c1-400

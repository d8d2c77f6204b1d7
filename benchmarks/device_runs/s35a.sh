# Session 35 (one start, ~8 min): SDXL's fp8 GEMMs at seven tiles: fixed_config's, 64-row / 64-column ones, and
# 128 x 128 tiles whose last wave's rows go to smaller fill tiles (2048 x 1280 x 1280: 160 programs of 128 x 128 on
# 132 SMs, 1.2 waves); then SDXL nested S on the sweep's fastest tiles at those shapes against bf16 compile
. .whl/setup.sh
timeout 150 python3 benchmarks/gpu_bench.py --sections model_gemms --model-gemms sdxl_proj sdxl_ff1 sdxl_ff2 \
  sdxl_proj_640 sdxl_ff1_640 sdxl_ff2_640 --model-gemm-tiles 128x128x128_w8_s3 128x128x128_w8_s3_f64x64 \
  128x128x128_w8_s3_f64x128 128x128x128_w8_s3_f128x64 64x128x128_w4_s4 64x64x128_w4_s4 \
  --out $OUT/sdxl-gemm-tiles-s35.json 2>&1 | grep "model gemm\|Error" | cut -c1-400
timeout 420 python3 benchmarks/gpu_bench.py --sections models --models sdxl --swept-tiles $OUT/sdxl-gemm-tiles-s35.json \
  --variants bf16_compile "fxquant-nested:$S@bench.sweep_tiles=1" --out $OUT/sdxl-swept-tiles-s35.json 2>&1 \
  | grep -v Warning | grep "^sdxl\|swept\|Error" | cut -c1-400

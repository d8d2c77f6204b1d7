# Session 36 (NOTES "GPU plan for session 36"): the fill tiles' output at SDXL's GEMM shapes (rel_l2_vs_128x128,
# expected 0), then SDXL nested S with fill tiles (the rule's default since session 35) against bf16 compile (~7 min)
. .whl/setup.sh
timeout 120 python3 benchmarks/gpu_bench.py --sections model_gemms --model-gemms sdxl_proj sdxl_ff2 sdxl_proj_640 \
  --model-gemm-tiles 128x128x128_w8_s3_f64x64 128x128x128_w8_s3_f64x128 --out $OUT/sdxl-fill-tiles-check.json 2>&1 \
  | grep "model gemm\|Error" | cut -c1-300
python3 -c "import json; print({r['name']: r['rel_l2_vs_128x128'] for r in json.load(open('$OUT/sdxl-fill-tiles-check.json'))['model_gemms']})"
timeout 450 python3 benchmarks/gpu_bench.py --sections models --models sdxl --variants bf16_compile "fxquant-nested:$S" \
  --out $OUT/sdxl-fill-tiles.json 2>&1 | grep -v Warning | grep "^sdxl\|Error" | cut -c1-400

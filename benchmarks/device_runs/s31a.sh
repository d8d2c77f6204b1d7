# Session 31: cuDNN's fp8 flash attention against fxquant's fp8-static kernel (~2 min), then the group-wise GEMMs
# against the torch references (~2.5 min)
. .whl/setup.sh
python3 -c "import torch; print(torch.backends.cudnn.version())"
timeout 240 python3 benchmarks/cudnn_fp8_attention.py --out $OUT/cudnn-fp8-attention.json 2>&1 | grep -v Warning | tail -30
bash .whl/s30d.sh

# Session 30: group-wise W4 GEMMs again, checked against the torch references at full shapes (~2.5 min)
. .whl/setup.sh
timeout 220 python3 benchmarks/group_wise_gemm.py --out $OUT/group-wise-gemm.json 2>&1 | grep -v Warning | tail -12

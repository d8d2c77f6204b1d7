# Session 32: the Gluon fp8-static attention kernel (MMAs in flight across the softmax) against the Triton kernel:
# each correctness case in a process of its own (a hung kernel shows as a timeout), then kernel times (~5 min)
# (as run: every case with more key tiles than the prologue loaded hung; session 33's s33a.sh reruns it fixed)
. .whl/setup.sh
for check in one_tile two_tiles one_tile_d128 two_tiles_d128 partial_tiles cross_attention d32; do
  timeout 45 python3 benchmarks/gluon_attention.py --checks $check --shapes --out $OUT/gluon-check-$check.json \
    2>&1 | grep -v Warning | tail -3 | cut -c1-1500 || true
  [ -s $OUT/gluon-check-$check.json ] || echo "$check: no result (timeout 45 s)"
done
for shape in cogvideox sd3 flux; do
  timeout 150 python3 benchmarks/gluon_attention.py --checks --shapes $shape --out $OUT/gluon-attention-$shape.json \
    2>&1 | grep -v Warning | tail -4 | cut -c1-1500
done

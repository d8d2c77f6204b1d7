# Session 34, first: the Gluon attention kernel's split head-dim tails (built in session 33 after its GPU runs:
# PixArt's 72 as 64 + 32 / 16) checked case by case in processes of their own (a case without a result stops the
# script), then kernel times and the host's time per call (launchers and ops) at the four models' shapes (~6 min)
. .whl/setup.sh
for check in d72 partial_tiles two_tiles two_tiles_d128 d32; do
  timeout 60 python3 benchmarks/gluon_attention.py --checks $check --shapes --out $OUT/gluon-check-$check.json \
    2>&1 | grep -v Warning | tail -3 | cut -c1-1500 || true
  [ -s $OUT/gluon-check-$check.json ] || { echo "$check: no result in 60 s, stopping"; exit 1; }
done
timeout 330 python3 benchmarks/gluon_attention.py --checks --out $OUT/gluon-attention.json 2>&1 | grep -v Warning \
  | tail -6 | cut -c1-2500

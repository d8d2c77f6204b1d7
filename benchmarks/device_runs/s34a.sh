# Session 34, first: the Gluon attention kernel's split head-dim tails (built in session 33 after its GPU runs:
# PixArt's 72 as 64 + 32 / 16) checked case by case in processes of their own (a case without a result stops the
# script), then kernel times and the host's time per call (launchers and ops) at the four models' shapes (~6 min)
. .whl/setup.sh
gluon_checks d72 partial_tiles two_tiles two_tiles_d128 d32 || exit 1
timeout 400 python3 benchmarks/gluon_attention.py --checks --out $OUT/gluon-attention.json 2>&1 | grep -v Warning \
  | tail -6 | cut -c1-2500

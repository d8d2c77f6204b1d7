# Session 33, first: the Gluon fp8-static attention kernel (MMAs in flight across the softmax) against the Triton
# kernel. Each correctness case in a process of its own; a case without a result (a hang: session 32's multi-tile
# hang was the prologue loading NUM_STAGES - 1 tiles, fixed) stops the script. Then kernel times of both schedules
# and every tile at the four models' shapes (~9 min)
. .whl/setup.sh
gluon_checks one_tile two_tiles one_tile_d128 two_tiles_d128 partial_tiles cross_attention d32 d72 || exit 1
timeout 360 python3 benchmarks/gluon_attention.py --checks --out $OUT/gluon-attention.json 2>&1 | grep -v Warning \
  | tail -6 | cut -c1-1500

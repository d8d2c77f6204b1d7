# sourced by the device scripts: wheels into /tmp/site, fxquant editable
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
O=static_hidden_activations=true,keep_condition_layers=false,attention=fp8-static,static_attention_outputs=true
R=w8a8-fp8:$O
S=w8a8-fp8:static_conv_activations=true,$O
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
# gluon_checks CASE...: the Gluon attention kernel's correctness cases (benchmarks/gluon_attention.py), each in a
# process of its own with a 60 s limit, results in $OUT/gluon-check-CASE.json; fails at the first case without a
# result (a hang), so that a new kernel's hang cannot eat the device budget
gluon_checks() {
  for check in "$@"; do
    timeout 60 python3 benchmarks/gluon_attention.py --checks $check --shapes --out $OUT/gluon-check-$check.json \
      2>&1 | grep -v Warning | tail -3 | cut -c1-1500 || true
    [ -s $OUT/gluon-check-$check.json ] || { echo "$check: no result in 60 s, stopping"; return 1; }
  done
}

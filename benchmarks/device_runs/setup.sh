# sourced by the device scripts: wheels into /tmp/site, fxquant editable
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
O=static_hidden_activations=true,keep_condition_layers=false,attention=fp8-static,static_attention_outputs=true
R=w8a8-fp8:$O
S=w8a8-fp8:static_conv_activations=true,$O
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader

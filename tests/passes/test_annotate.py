"""annotate: roles by reachability, layer groups by graph structure, the keep decisions of the plan."""

import pytest
import torch

import fxquant
from families import FAMILIES
from fxquant.metrics import relative_l2
from fxquant.quantizer import pack_sign_magnitude, quantize_fp8, unpack_bits


def _annotated(name):
    family = FAMILIES[name]
    return fxquant.inspect_passes(family.build(), "w8a8", family.inputs(), until="annotate")


@pytest.fixture(scope="module")
def pixart():
    return _annotated("pixart")


def test_input_roles(pixart):
    assert pixart.plan.input_roles == {"hidden_states": "latent", "encoder_hidden_states": "condition",
                                       "timestep": "timestep"}


def test_pixart_groups_and_roles(pixart):
    layers = pixart.plan.layers
    assert layers["transformer_blocks.0.attn1.to_q"].group == "self-attention"
    assert layers["transformer_blocks.0.attn1.to_out.0"].group == "self-attention"
    assert layers["transformer_blocks.0.attn2.to_q"].group == "cross-attention"
    assert layers["transformer_blocks.0.attn2.to_k"].group == "cross-attention"
    assert layers["transformer_blocks.0.attn2.to_k"].role == "condition"
    assert layers["transformer_blocks.0.attn2.to_q"].role == "latent"
    assert layers["transformer_blocks.0.ff.net.2"].group == "mlp"
    assert layers["adaln_single.emb.timestep_embedder.linear_1"].role == "timestep"
    assert layers["caption_projection.linear_1"].group == "embedding"
    assert layers["transformer_blocks.0.attn1"].op == "sdpa"


def test_condition_and_io_layers_kept_with_reasons(pixart):
    layers = pixart.plan.layers
    for fqn in ("adaln_single.linear", "adaln_single.emb.timestep_embedder.linear_2", "caption_projection.linear_2"):
        assert not layers[fqn].quantized and "condition-only" in layers[fqn].keep_reason
    assert "first latent-path layer" in layers["pos_embed.proj"].keep_reason
    assert "last latent-path layer" in layers["proj_out"].keep_reason
    assert layers["transformer_blocks.1.attn2.to_v"].quantized  # cross-attention K/V are quantized


def test_graph_nodes_carry_annotations(pixart):
    annotated = [n for n in pixart.graph.nodes if "fxquant_fqn" in n.meta]
    assert {n.meta["fxquant_group"] for n in annotated} >= {"self-attention", "cross-attention", "mlp", "conv"}
    assert all(n.meta["fxquant_fqn"] in pixart.plan.layers for n in annotated)


def test_temporal_attention_in_latte():
    groups = {layer.group for fqn, layer in _annotated("latte").plan.layers.items()
              if fqn.startswith("temporal_transformer_blocks") and ".attn" in fqn}
    assert groups == {"temporal-attention"}


def test_unet_convs_and_cross_attention():
    plan = _annotated("unet").plan
    assert plan.layers["down_blocks.0.resnets.0.conv1"].group == "conv"
    assert plan.layers["down_blocks.0.resnets.0.time_emb_proj"].role == "timestep"
    assert plan.layers["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"].group == "cross-attention"
    assert not plan.layers["conv_in"].quantized and not plan.layers["conv_out"].quantized


def test_user_rule_keeps_layer():
    family = FAMILIES["pixart"]
    config = fxquant.W8A8DynamicConfig(keep_full_precision={"re:attn2\\.to_(k|v)$": "sensitive text K/V"})
    plan = fxquant.inspect_passes(family.build(), config, family.inputs(), until="annotate").plan
    assert plan.layers["transformer_blocks.0.attn2.to_k"].keep_reason == "recipe rule: sensitive text K/V"
    assert plan.layers["transformer_blocks.0.attn2.to_q"].quantized


def test_run_until_each_pass():
    family = FAMILIES["dit"]
    calibration = [family.inputs(seed=1)]
    observed = fxquant.inspect_passes(family.build(), "w8a8-static", calibration, until="observe")
    assert observed.observers and all(o.calls == 1 for o in observed.observers.values())
    calibrated = fxquant.inspect_passes(family.build(), "w8a8-static", calibration, until="calibrate")
    assert all(layer.act_scale and layer.act_zero is not None for layer in calibrated.plan.quantized_layers())
    lowered = fxquant.inspect_passes(family.build(), "w8a8-static", calibration, until="lower")
    assert lowered.passes_run == ["annotate", "observe", "calibrate", "balance", "sensitivity", "lower"]
    assert all(n.meta.get("fxquant_lowered") for n in lowered.graph.nodes
               if n.meta.get("fxquant_fqn") in {l.fqn for l in lowered.plan.quantized_layers()})


def test_dump_writes_each_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("FXQUANT_DUMP", str(tmp_path))
    family = FAMILIES["dit"]
    fxquant.inspect_passes(family.build(), "w8a8", [family.inputs()], until="lower")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00-annotate.txt", "01-observe.txt", "02-calibrate.txt", "03-balance.txt", "04-sensitivity.txt",
                     "05-lower.txt"]
    text = (tmp_path / "05-lower.txt").read_text()
    assert "lowered=QuantLinear" in text and "group=self-attention" in text and "# plan" in text


STATIC_INPUTS = {  # recipe option -> the linears it gives static activations: the feed-forwards' second linears
    # (reading a GELU of another linear, or the UNet's GEGLU of its halves), the attention output projections (SD3's
    # context stream: to_add_out)
    "static_hidden_activations": (".net.2",), "static_attention_outputs": (".to_out.0", ".to_add_out")}


@pytest.mark.parametrize("name,option", [(name, option) for name in ("pixart", "sd3") for option in STATIC_INPUTS]
                         + [("unet", "static_hidden_activations")])
def test_static_input_options_calibrate_exactly_their_linears(quantized_family, name, option):
    """With static_hidden_activations / static_attention_outputs, exactly the linears reading a GELU (GEGLU) of
    another linear / an attention's output get a static fp8 scale: the absmax of their input over the calibration
    calls / 448."""
    reference, qmodel, calibration = quantized_family(name, f"w8a8-fp8:{option}=true")
    static = [layer for layer in qmodel.plan.quantized_layers() if layer.act_mode == "static_per_tensor"]
    expected = [layer.fqn for layer in qmodel.plan.quantized_layers() if layer.fqn.endswith(STATIC_INPUTS[option])]
    assert [layer.fqn for layer in static] == expected and expected
    absmax = {}

    def record(module, args, fqn):
        absmax[fqn] = max(absmax.get(fqn, 0.0), args[0].abs().max().item())

    hooks = [reference.get_submodule(layer.fqn).register_forward_pre_hook(
        lambda module, args, fqn=layer.fqn: record(module, args, fqn)) for layer in static]
    with torch.no_grad():
        for inputs in calibration:
            reference(**inputs)
    for hook in hooks:
        hook.remove()
    for layer in static:
        assert layer.act_zero == [0] and layer.act_scale == pytest.approx([absmax[layer.fqn] / 448], rel=1e-6)


def test_static_conv_activations_calibrate_exactly_the_convolutions(quantized_family):
    """static_conv_activations: every quantized convolution takes one calibrated scale and zero point (the input the
    implicit-GEMM conv kernel needs), the linears stay per token; the model stays close to full precision."""
    reference, qmodel, _ = quantized_family("unet", "w8a8:static_conv_activations=true")
    layers = qmodel.plan.quantized_layers()
    convs = [layer for layer in layers if layer.op == "conv2d"]
    assert convs and all(layer.act_mode == "static_per_tensor" and layer.act_scale for layer in convs)
    assert all(layer.act_mode == "dynamic_per_token" for layer in layers if layer.op == "linear")
    inputs = FAMILIES["unet"].inputs(batch=2, seed=9)
    with torch.no_grad():
        expected, out = (model(**inputs, return_dict=False)[0] for model in (reference, qmodel))
    assert relative_l2(out, expected) < 0.05


def test_fp8_recipes_run_static_convolutions_in_fp8(quantized_family, tmp_path):
    """w8a8-fp8 with static_conv_activations: convolutions hold float8 e4m3 weights (absmax / 448 per output channel)
    and one calibrated fp8 activation scale (zero point 0), and compute exactly a float convolution of those codes;
    without static conv activations they stay int8 per patch. The model survives a checkpoint bit for bit."""
    reference, qmodel, _ = quantized_family("unet", "w8a8-fp8:static_conv_activations=true")
    convs = [layer for layer in qmodel.plan.quantized_layers() if layer.op == "conv2d"]
    assert convs and all(layer.number_format == "fp8" and layer.act_zero == [0] for layer in convs)
    _, int8_convs, _ = quantized_family("unet", "w8a8-fp8")
    assert all(layer.number_format == "int" for layer in int8_convs.plan.quantized_layers() if layer.op == "conv2d")
    inputs = FAMILIES["unet"].inputs(batch=2, seed=9)
    seen = {}

    def record(module, args, out, fqn):
        seen.setdefault(fqn, (args[0], out))

    hooks = [qmodel.model.get_submodule(layer.fqn).register_forward_hook(
        lambda module, args, out, fqn=layer.fqn: record(module, args, out, fqn)) for layer in convs]
    with torch.no_grad():
        expected, out = (model(**inputs, return_dict=False)[0] for model in (reference, qmodel))
    for hook in hooks:
        hook.remove()
    for layer in convs:
        module, float_weight = qmodel.model.get_submodule(layer.fqn), reference.get_submodule(layer.fqn).weight
        w_scale = float_weight.abs().amax(dim=(1, 2, 3)) / 448
        assert module.weight_q.dtype == torch.float8_e4m3fn and module.weight_sum is None
        assert torch.equal(module.weight_q.float(), (float_weight / w_scale[:, None, None, None]).to(
            torch.float8_e4m3fn).float()) and torch.allclose(module.weight_scale, w_scale)
        x, y = seen[layer.fqn]
        x_codes = (x / layer.act_scale[0]).clamp(-448, 448).to(torch.float8_e4m3fn).float() * layer.act_scale[0]
        w = module.weight_q.float() * module.weight_scale[:, None, None, None]
        assert relative_l2(y, torch.nn.functional.conv2d(x_codes, w, module.bias, module.stride, module.padding,
                                                         module.dilation)) < 1e-6
    # e4m3's 3-bit mantissa: ~3.5 % per Gaussian-input conv against int8's 1.4 % (gpu-bench-h100/conv-tiles-int8-fp8.json)
    assert relative_l2(out, expected) < 0.1
    fxquant.save(qmodel, tmp_path / "fp8-convs")
    loaded = fxquant.load(tmp_path / "fp8-convs")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs, return_dict=False)[0], out)


def test_w4a8_fp8_runs_int4_codes_against_fp8_activations(quantized_family):
    """w4a8-fp8: every quantized linear keeps W4A8's packed int4 codes and per-channel scales (no row sums: fp8
    activations have no zero point) and runs them as e4m3 values, which hold the codes exactly, against fp8
    activations: each linear computes a float matmul of its fp8-quantized input and its dequantized int4 weights.
    Convolutions stay int8 even with static_conv_activations (the fp8 conv kernel takes 8-bit weights)."""
    reference, qmodel, _ = quantized_family("pixart", "w4a8-fp8")
    _, int4, _ = quantized_family("pixart", "w4a8")
    linears = [layer for layer in qmodel.plan.quantized_layers() if layer.op == "linear"]
    assert linears and all(layer.number_format == "fp8" and layer.weight_bits == 4 for layer in linears)
    inputs = FAMILIES["pixart"].inputs(batch=2, seed=9)
    seen = {}

    def record(args, out, fqn):  # returns None: the hook leaves the output alone
        seen.setdefault(fqn, (args[0], out))

    hooks = [qmodel.model.get_submodule(layer.fqn).register_forward_hook(
        lambda module, args, out, fqn=layer.fqn: record(args, out, fqn)) for layer in linears]
    with torch.no_grad():
        expected, out, int4_out = (model(**inputs, return_dict=False)[0] for model in (reference, qmodel, int4))
    for hook in hooks:
        hook.remove()
    for layer in linears:
        module, int4_module = qmodel.model.get_submodule(layer.fqn), int4.model.get_submodule(layer.fqn)
        assert module.weight_q.dtype == torch.uint8 and module.weight_sum is None
        codes = unpack_bits(int4_module.weight_q, 4)  # the same codes, in an fp8 layer's sign / magnitude layout
        assert torch.equal(module.weight_q, pack_sign_magnitude(codes))
        assert torch.equal(module.weight_scale, int4_module.weight_scale)
        x, y = seen[layer.fqn]
        rows = x.reshape(-1, x.shape[-1]).float()
        x_q, x_scale = quantize_fp8(rows)
        x_codes = x_q.float() * x_scale
        w = codes.float() * module.weight_scale[:, None]
        assert relative_l2(y.reshape(rows.shape[0], -1), torch.nn.functional.linear(x_codes, w, module.bias)) < 1e-5
    # int4 weights dominate the error: fp8 activations add little to W4A8 int8's
    error, int4_error = relative_l2(out, expected), relative_l2(int4_out, expected)
    assert error < 0.05 and error < 1.5 * int4_error, (error, int4_error)
    _, unet, _ = quantized_family("unet", "w4a8-fp8:static_conv_activations=true")
    convs = [layer for layer in unet.plan.quantized_layers() if layer.op == "conv2d"]
    assert convs and all(layer.number_format == "int" for layer in convs)

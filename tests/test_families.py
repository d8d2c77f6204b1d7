"""W8A8 on all seven diffusers families: accuracy against full precision, real int8 storage, other resolutions."""

import copy

import pytest
import torch

import fxquant
from families import FAMILIES
from fxquant.metrics import relative_l2
from fxquant.modules import QUANT_MODULES

# The Foundation issue's bar is for the main W8A8 recipe (dynamic per-token). The static per-tensor recipe is the
# naive baseline that ViDiT-Q / MixDQ show degrading; it only has to stay usable (the measured values are in
# README's table).
# fp8 e4m3 keeps 3 mantissa bits: coarser than int8 per token, so it gets its own, measured bound.
MAX_REL_L2 = {"w8a8": 0.02, "w8a8-static": 0.05, "w8a8-fp8": 0.03}
MAX_W8A8_REL_L2 = MAX_REL_L2["w8a8"]


def _output(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("recipe", list(MAX_REL_L2))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_w8a8_matches_full_precision(quantized_family, name, recipe):
    reference, qmodel, _ = quantized_family(name, recipe)
    inputs = FAMILIES[name].inputs(batch=2, seed=7)  # not a calibration batch
    error = relative_l2(_output(qmodel, inputs), _output(reference, inputs))
    assert error <= MAX_REL_L2[recipe], f"{name} {recipe}: relative L2 {error:.4f} > {MAX_REL_L2[recipe]}"
    assert error > 0, "quantized output is bit-identical to full precision: nothing was quantized"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_runs_at_second_resolution_and_batch(quantized_family, name):
    reference, qmodel, _ = quantized_family(name, "w8a8")
    family = FAMILIES[name]
    inputs = family.inputs(batch=3, size=family.second_size, seed=11)
    expected = _output(reference, inputs)
    out = _output(qmodel, inputs)
    assert out.shape == expected.shape
    assert relative_l2(out, expected) <= MAX_W8A8_REL_L2


@pytest.mark.parametrize("name", list(FAMILIES))
def test_no_full_precision_copy_of_quantized_weights(quantized_family, name):
    reference, qmodel, _ = quantized_family(name, "w8a8")
    quantized = qmodel.plan.quantized_layers()
    assert quantized, f"{name}: no layer was quantized"
    for layer in quantized:
        module = qmodel.model.get_submodule(layer.fqn)
        assert isinstance(module, QUANT_MODULES), layer.fqn
        assert not list(module.parameters(recurse=False)), f"{layer.fqn} still holds float parameters"
        assert module.weight_q.dtype == torch.int8
    removed = sum(layer.num_params for layer in quantized)
    remaining_float = sum(p.numel() for p in qmodel.parameters())
    assert remaining_float == sum(p.numel() for p in reference.parameters()) - removed - sum(
        reference.get_submodule(layer.fqn).bias.numel()
        for layer in quantized if reference.get_submodule(layer.fqn).bias is not None
    )


def test_quantized_layer_bytes_at_most_055_of_bf16(quantized_family):
    """A bf16 model of realistic width: stored bytes of quantized layers (int8 weights, scales, sums, biases)."""
    from diffusers import PixArtTransformer2DModel

    import fxquant

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=8,
                                     num_layers=2, cross_attention_dim=256, caption_channels=64, sample_size=8,
                                     patch_size=2, norm_type="ada_norm_single",
                                     use_additional_conditions=False).to(torch.bfloat16).eval()
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, dtype=torch.bfloat16),
                  encoder_hidden_states=torch.randn(2, 5, 64, dtype=torch.bfloat16), timestep=torch.tensor([3, 700]))
    qmodel = fxquant.quantize(model, "w8a8", [inputs])
    stored, bf16 = qmodel.quantized_weight_bytes()
    assert stored / bf16 <= 0.55, f"quantized layers take {stored / bf16:.3f}x their bf16 bytes"
    assert qmodel(**inputs, return_dict=False)[0].dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_fused_qkv_projections_quantize_as_attention(name):
    """diffusers' `fuse_qkv_projections()` (one q / k / v linear, a wider GEMM) before quantizing: the fused linears are
    grouped as self-attention, quantized, and W8A8 stays within the bar."""
    family = FAMILIES[name]
    model = family.build()
    model.fuse_qkv_projections()
    reference = copy.deepcopy(model)
    qmodel = fxquant.quantize(model, "w8a8", [family.inputs(batch=2, seed=seed) for seed in range(2)])
    fused = [layer for layer in qmodel.plan.quantized_layers() if layer.fqn.endswith(("to_qkv", "to_added_qkv"))]
    assert fused and all(layer.group == "self-attention" for layer in fused)
    inputs = family.inputs(batch=2, seed=7)
    assert relative_l2(_output(qmodel, inputs), _output(reference, inputs)) <= MAX_W8A8_REL_L2

"""Quantized attention (recipe field `attention`): which calls it takes, the plan, compile, and what it refuses."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fxquant
import fxquant.ops
from families import FAMILIES, inputs_at_timesteps
from fxquant.attention import OPERAND_SCALES, QuantizedAttention
from fxquant.backends.triton.backend import compile_counter
from fxquant.metrics import relative_l2

fxq = torch.ops.fxquant


class _CountOps(TorchDispatchMode):
    """Counts fxquant::quantized_attention calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is fxq.quantized_attention.default
        return func(*args, **(kwargs or {}))


def test_mode_quantizes_plain_calls_and_leaves_the_others():
    q, k, v = (torch.randn(2, 3, 20, 16) for _ in range(3))
    mask = torch.rand(20, 20) > 0.3
    with QuantizedAttention("int8-fp8"):
        plain = F.scaled_dot_product_attention(q, k, v)
        scaled = F.scaled_dot_product_attention(q, k, v, scale=0.1)
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        narrow = F.scaled_dot_product_attention(q[..., :3], k[..., :3], v[..., :3])
    assert torch.equal(plain, fxq.quantized_attention(q, k, v, 16**-0.5, True))
    assert torch.equal(scaled, fxq.quantized_attention(q, k, v, 0.1, True))
    assert torch.equal(masked, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert torch.equal(causal, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert torch.equal(narrow, F.scaled_dot_product_attention(q[..., :3], k[..., :3], v[..., :3]))
    assert relative_l2(plain, F.scaled_dot_product_attention(q, k, v)) < 0.05


@pytest.mark.parametrize("name", ["pixart", "flux", "unet"])
def test_plan_quantizes_attention_layers_and_they_run_the_op(quantized_family, name):
    reference, qmodel, _ = quantized_family(name, "w8a8:attention=int8-fp8")
    _, plain, _ = quantized_family(name, "w8a8")
    attention = qmodel.plan.quantized_attention()
    sdpa = [layer for layer in qmodel.plan.layers.values() if layer.op == "sdpa"]
    assert attention and len(attention) == len(sdpa) and not plain.plan.quantized_attention()
    assert all(layer.attention_format == "int8-fp8" and layer.keep_reason is None for layer in attention)
    assert f"{len(attention)} attention layers quantized" in qmodel.plan.summary()
    inputs = FAMILIES[name].inputs(seed=4)
    with torch.no_grad(), _CountOps() as counter:
        out = qmodel(**inputs, return_dict=False)[0]
    with torch.no_grad():
        fp = reference(**inputs, return_dict=False)[0]
        w8a8 = plain(**inputs, return_dict=False)[0]
    if name == "unet":  # the tiny UNet's heads are 8 wide, under MIN_HEAD_DIM: its attention stays as it was
        assert counter.calls == 0 and torch.equal(out, w8a8)
    else:
        assert counter.calls >= len(attention)
        assert relative_l2(out, fp) < 2 * relative_l2(w8a8, fp) + 0.005


@pytest.mark.parametrize("attention_format", ["int8-fp8", "fp8-static"])
def test_quantized_model_with_quantized_attention_pickles_whole(quantized_family, attention_format):
    """torch.save / pickle of the whole quantized model: the attention modules' classes are made at run time, so
    they are rebuilt from the attention class on load."""
    _, qmodel, _ = quantized_family("pixart", f"w8a8:attention={attention_format}")
    restored = pickle.loads(pickle.dumps(qmodel))
    inputs = FAMILIES["pixart"].inputs(seed=4)
    with torch.no_grad(), _CountOps() as counter:
        out = restored(**inputs, return_dict=False)[0]
    with torch.no_grad():
        expected = qmodel(**inputs, return_dict=False)[0]
    assert counter.calls >= len(qmodel.plan.quantized_attention()) and torch.equal(out, expected)


def test_recipe_rule_keeps_chosen_attention_in_full_precision():
    family = FAMILIES["pixart"]
    config = fxquant.get_config("w8a8:attention=int8")
    config.keep_full_precision["re:attn2$"] = "cross-attention stays exact"
    qmodel = fxquant.quantize(family.build(), config, [family.inputs()])
    kept = {layer.fqn for layer in qmodel.plan.layers.values() if layer.op == "sdpa" and layer.keep_reason}
    assert kept == {layer.fqn for layer in qmodel.plan.layers.values() if layer.fqn.endswith("attn2")}
    assert all(layer.fqn.endswith("attn1") for layer in qmodel.plan.quantized_attention())


@pytest.mark.parametrize("attention_format", ["int8-fp8", "fp8-static"])
def test_compiled_graph_holds_one_attention_op_per_layer(quantized_family, attention_format):
    torch._dynamo.reset()
    compile_counter.clear()
    _, qmodel, _ = quantized_family("pixart", f"w8a8:attention={attention_format}")
    compiled = torch.compile(qmodel, backend="fxquant")
    inputs = FAMILIES["pixart"].inputs(seed=6)
    with torch.no_grad():
        eager = qmodel(**inputs, return_dict=False)[0]
        fast = compiled(**inputs, return_dict=False)[0]
    assert compile_counter["graphs"] == 1  # the mode is traced, no graph break
    assert compile_counter["attention_ops"] == len(qmodel.plan.quantized_attention())
    assert torch.equal(fast, eager)


@pytest.mark.parametrize("name", ["pixart", "flux", "sd3", "cogvideox"])
def test_quantized_attention_keeps_one_graph_and_every_fusion(quantized_family, name):
    """Inside the attention mode Dynamo traces `x / 1.0` as a method call (PixArt's residual epilogues stopped
    matching) and could not trace Tensor.unflatten (a graph break in Flux's processor): the counts must not move."""
    counts = {}
    for recipe in ("w8a8", "w8a8:attention=fp8-static"):
        torch._dynamo.reset()
        compile_counter.clear()
        _, qmodel, _ = quantized_family(name, recipe)
        with torch.no_grad():
            torch.compile(qmodel, backend="fxquant")(**FAMILIES[name].inputs(seed=6), return_dict=False)
        counts[recipe] = {key: compile_counter[key] for key in ("graphs", "fused_prologues", "fused_residuals",
                                                                "fused_activations")}
    assert counts["w8a8"]["graphs"] == 1 and counts["w8a8"] == counts["w8a8:attention=fp8-static"]


@pytest.mark.parametrize("attention_format", ["int8-fp8", "fp8-static"])
def test_regional_compilation_shares_one_graph_with_quantized_attention(attention_format):
    """Identical blocks share one compiled graph with quantized attention too (a per-module forward wrapper made
    Dynamo recompile every block)."""
    torch._dynamo.reset()
    compile_counter.clear()
    family = FAMILIES["pixart"]
    qmodel = fxquant.quantize(family.build(), f"w8a8:attention={attention_format}", [family.inputs()])
    blocks = qmodel.compile_blocks()
    with torch.no_grad():
        qmodel(**family.inputs(seed=6))
    assert len(blocks) > 1 and compile_counter["graphs"] == 1
    assert compile_counter["attention_ops"] == 2  # the block's self- and cross-attention


@pytest.mark.parametrize("pv_fp8", [False, True])
def test_reference_in_query_chunks_equals_whole_rows(monkeypatch, pv_fp8):
    q, k, v = torch.randn(2, 3, 50, 16), torch.randn(2, 3, 40, 16), torch.randn(2, 3, 40, 16)
    whole = fxq.quantized_attention(q, k, v, 0.25, pv_fp8)
    monkeypatch.setattr(fxquant.ops, "REFERENCE_SCORE_ELEMENTS", 2 * 3 * 40 * 7)  # 7 query rows per chunk
    chunked = fxq.quantized_attention(q, k, v, 0.25, pv_fp8)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)  # same rows; only matmul blocking differs
    assert chunked.stride() == whole.stride()


@pytest.mark.parametrize("name", ["pixart", "cogvideox"])
def test_static_fp8_attention_calibrates_one_scale_per_operand_and_group(name):
    """fp8-static: calibration records |Q|, |K|, |V| maxima per timestep group; each call runs its group's scales."""
    family = FAMILIES[name]
    reference = family.build()
    config = fxquant.get_config("w8a8:attention=fp8-static")
    config.timestep_groups = [500.0]
    calibration = inputs_at_timesteps(family, [900, 800, 100, 50])
    qmodel = fxquant.quantize(copy.deepcopy(reference), config, calibration)
    attention = qmodel.plan.quantized_attention()
    assert attention and all(layer.attention_format == "fp8-static" for layer in attention)
    for layer in attention:
        scales = torch.tensor(layer.attention_scales)
        assert scales.shape == (2, 3) and (scales > 0).all()
        assert torch.equal(getattr(qmodel.model.get_submodule(layer.fqn), OPERAND_SCALES), scales)
    assert any(len(set(map(tuple, layer.attention_scales))) > 1 for layer in attention)  # ranges drift with t
    inputs = calibration[0]
    with torch.no_grad(), _CountOps() as counter:
        out = qmodel(**inputs, return_dict=False)[0]
        fp = reference(**inputs, return_dict=False)[0]
    assert counter.calls >= len(attention)
    assert relative_l2(out, fp) < 0.01
    module, early_inputs = qmodel.model.get_submodule(attention[0].fqn), calibration[-1]  # timesteps 900 / 50
    with torch.no_grad():
        early = qmodel(**early_inputs, return_dict=False)[0]
        getattr(module, OPERAND_SCALES)[0] *= 3  # only the early group's (not a power of two: fp8 would not care)
        assert torch.equal(qmodel(**inputs, return_dict=False)[0], out)
        assert not torch.equal(qmodel(**early_inputs, return_dict=False)[0], early)


def test_static_fp8_attention_keeps_layers_whose_calls_cannot_be_quantized(quantized_family):
    _, qmodel, _ = quantized_family("unet", "w8a8:attention=fp8-static")  # the tiny UNet's heads are 8 wide
    sdpa = [layer for layer in qmodel.plan.layers.values() if layer.op == "sdpa"]
    assert sdpa and not qmodel.plan.quantized_attention()
    assert all("no call during calibration could be quantized" in layer.keep_reason for layer in sdpa)


def test_static_fp8_attention_needs_calibration_of_every_layer():
    family = FAMILIES["pixart"]
    config = fxquant.get_config("w8a8:attention=fp8-static")
    prepared = fxquant.prepare(family.build(), config)
    prepared(**family.inputs())
    attention = prepared._state.plan.quantized_attention()[0]
    prepared._state.attention_observers[attention.fqn].module_calls = 0  # as if its block never ran
    with pytest.raises(fxquant.CalibrationError, match=f"{attention.fqn}.*never called during calibration"):
        fxquant.convert(prepared)

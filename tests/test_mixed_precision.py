"""Mixed precision for real: 2 / 4 / 6 / 8-bit packed weights, nested planes switched per timestep group on the
device, sensitivity probing + integer programming (MixDQ / ViDiT-Q-MP recipes), BOS-aware text key / value."""

import copy
import dataclasses
import json
import re

import pytest
import torch

import fxquant
from families import FAMILIES, inputs_at_timesteps
from fxquant.backends.triton.backend import compile_counter, lower_to_inductor
from fxquant.metrics import relative_l2
from fxquant.modules import QuantConv2d, QuantLinear
from fxquant.ops import int8_linear_reference, quantize_per_token_reference
from fxquant.passes.sensitivity import PrefixReplay, SensitivityPass
from fxquant.plan import LayerPlan
from fxquant.quantizer import pack_bits, plane_widths, quantize_weight_planes, unpack_bits
from fxquant.timestep import TimestepGroup


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_bits_round_trips(bits):
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (5, 32), dtype=torch.int8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 32 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits), codes)


def test_nested_planes_store_every_level_in_one_copy():
    weight = torch.randn(16, 64)
    assert plane_widths([4, 8]) == [4, 4] and plane_widths([4, 6, 8]) == [4, 2, 2] and plane_widths([6]) == [4, 2]
    codes, scale = quantize_weight_planes(weight, [4, 2, 2])
    assert codes[0].abs().max() <= 7 and all(c.min() >= -2 and c.max() <= 1 for c in codes[1:])
    errors, code = [], codes[0].int()
    for level, fine in enumerate([None] + codes[1:]):
        if fine is not None:
            code = code * 4 + fine.int()
        errors.append(relative_l2(code.float() * scale[:, None] / 4**level, weight))
    assert errors[0] > errors[1] > errors[2]  # 4, 6, 8 bits
    assert errors[2] < 0.01 and errors[0] < 0.16
    with pytest.raises(ValueError, match="2, 4 or 8 bits, or at several"):
        plane_widths([2, 8])


def _layer(linear: torch.nn.Linear, **fields) -> LayerPlan:
    return LayerPlan(fqn="probe", op="linear", group="mlp", role="latent", num_params=linear.weight.numel(),
                     in_features=linear.in_features, out_features=linear.out_features,
                     weight_granularity="per_channel", number_format="int", act_bits=8,
                     act_mode="dynamic_per_token", **{"weight_bits": 8, **fields})


def _reference_output(x, codes, scale, bias):
    x_q, x_scale, x_zero = quantize_per_token_reference(x)
    return int8_linear_reference(x_q, x_scale, x_zero, codes, scale, codes.sum(1, dtype=torch.int32), bias,
                                 x.dtype)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_packed_linear_runs_the_integer_reference(bits):
    linear = torch.nn.Linear(64, 24)
    module = QuantLinear.from_float(linear, _layer(linear, weight_bits=bits))
    x = torch.randn(10, 64)
    codes, scale = quantize_weight_planes(linear.weight, plane_widths([bits]))
    code = codes[0].int()
    for fine, width in zip(codes[1:], plane_widths([bits])[1:]):
        code = code * 2**width + fine.int()
    expected = _reference_output(x, code.to(torch.int8), scale / 2 ** (sum(plane_widths([bits])[1:])), linear.bias)
    assert torch.allclose(module(x), expected, atol=1e-5, rtol=1e-5)
    stored = sum(b.numel() * b.element_size() for n, b in module.named_buffers() if n.startswith("weight_q"))
    assert stored == 64 * 24 * bits // 8  # really packed: bits per weight, nothing in fp16


def test_per_timestep_group_bits_switch_on_the_device():
    linear = torch.nn.Linear(64, 24)
    nested = QuantLinear.from_float(linear, _layer(linear, weight_bits=8, group_weight_bits=[8, 4]))
    nested._timestep = TimestepGroup()
    x = torch.randn(6, 64)
    outputs = []
    for group in (0, 1):
        nested._timestep.index = torch.tensor([group])
        outputs.append(nested(x))
    codes, scale = quantize_weight_planes(linear.weight, [4, 4])
    as_w8 = _reference_output(x, (codes[0].int() * 16 + codes[1].int()).to(torch.int8), scale / 16, linear.bias)
    as_w4 = _reference_output(x, codes[0], scale, linear.bias)
    assert torch.allclose(outputs[0], as_w8, atol=1e-5) and torch.allclose(outputs[1], as_w4, atol=1e-5)
    exact = linear(x)
    assert relative_l2(outputs[0], exact) < relative_l2(outputs[1], exact) / 4


@pytest.mark.parametrize("bits", [2, 4])
def test_packed_conv_matches_its_8bit_codes(bits):
    conv = torch.nn.Conv2d(8, 6, 3, padding=1)
    layer = LayerPlan(fqn="c", op="conv2d", group="conv", role="latent", num_params=conv.weight.numel(),
                      in_features=8, out_features=6, weight_bits=bits, number_format="int", act_bits=8,
                      act_mode="dynamic_per_token")
    packed = QuantConv2d.from_float(conv, layer)
    assert packed.weight_q.numel() == conv.weight.numel() * bits // 8
    unpacked = QuantConv2d.from_float(conv, dataclasses.replace(layer, weight_bits=8))
    codes, scale = fxquant.quantizer.quantize_weight_per_channel(conv.weight, bits)
    unpacked.weight_q, unpacked.weight_scale = codes, scale
    unpacked.weight_sum = codes.flatten(1).sum(1, dtype=torch.int32)
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(packed(x), unpacked(x))


@pytest.fixture(scope="module")
def viditq_mp():
    family = FAMILIES["pixart"]
    reference = family.build()
    config = fxquant.ViditqW4A8MPConfig(target_bits=6.0)
    qmodel = fxquant.quantize(copy.deepcopy(reference), config, inputs_at_timesteps(family, [950, 700, 300, 50]))
    return reference, qmodel


def test_viditq_mp_allocates_per_block_group_and_timestep_group(viditq_mp):
    reference, qmodel = viditq_mp
    plan = qmodel.plan
    assert abs(plan.quantized_average_weight_bits - 6.0) <= 0.02 + 1e-9
    layers = [layer for layer in plan.quantized_layers()]
    assert all(layer.sensitivity and layer.sensitivity_metric for layer in layers)
    assert {layer.sensitivity_metric for layer in layers} >= {"fidelity", "text-alignment"}
    assert all(set(layer.sensitivity) == {f"{g}:{b}" for g in (0, 1) for b in (4, 6, 8)} for layer in layers)
    for layer in layers:  # one block x group shares its bits
        peers = [p for p in layers if p.fqn.split(".")[:2] == layer.fqn.split(".")[:2] and p.group == layer.group]
        assert {p.weight_bits for p in peers} == {layer.weight_bits}
    inputs = inputs_at_timesteps(FAMILIES["pixart"], [500])[0]
    with torch.no_grad():
        error = relative_l2(qmodel(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0])
    assert error < 0.1


def _with_a_switching_layer(qmodel) -> LayerPlan:
    """Make the first quantized linear run W8 in timestep group 0 and W4 in group 1 (nested 4 + 4 planes)."""
    layer = next(l for l in qmodel.plan.quantized_layers() if l.op == "linear")
    if layer.group_weight_bits != [8, 4]:
        layer.weight_bits, layer.group_weight_bits = 8, [8, 4]
        rebuilt = QuantLinear.from_float(torch.nn.Linear(layer.in_features, layer.out_features), layer)
        rebuilt._timestep = qmodel.model.get_submodule(layer.fqn)._timestep
        parent, _, child = layer.fqn.rpartition(".")
        setattr(qmodel.model.get_submodule(parent), child, rebuilt)
    return layer


def test_mixed_precision_compiles_once_and_round_trips(viditq_mp, tmp_path):
    _, qmodel = viditq_mp
    layer = _with_a_switching_layer(qmodel)
    torch._dynamo.reset()
    compile_counter.clear()
    compiled = torch.compile(qmodel, backend="fxquant")
    outputs = {}
    for t in (900, 100, 800):  # groups 1, 0, 1
        inputs = inputs_at_timesteps(FAMILIES["pixart"], [t])[0]
        with torch.no_grad():
            eager = qmodel(**inputs, return_dict=False)[0]
            outputs[t] = compiled(**inputs, return_dict=False)[0]
        assert relative_l2(outputs[t], eager) <= 1e-3
    assert compile_counter["graphs"] == 1, f"{compile_counter['graphs']} graphs for two timestep groups"
    loaded = fxquant.load(fxquant.save(qmodel, tmp_path / "mp"))
    assert loaded.model.get_submodule(layer.fqn).planes == [4, 4]
    inputs = inputs_at_timesteps(FAMILIES["pixart"], [100])[0]
    with torch.no_grad():
        assert torch.equal(loaded(**inputs, return_dict=False)[0], qmodel(**inputs, return_dict=False)[0])


def test_mixed_precision_blocks_compile_regionally(viditq_mp):
    """compile_blocks on blocks of differing bit-widths (and a layer switching bits per timestep group): one graph
    per distinct block at most, each matching eager in both timestep groups."""
    qmodel = copy.deepcopy(viditq_mp[1])
    _with_a_switching_layer(qmodel)
    torch._dynamo.reset()
    compile_counter.clear()
    steps = [inputs_at_timesteps(FAMILIES["pixart"], [t])[0] for t in (900, 100)]
    with torch.no_grad():
        eager = [qmodel(**inputs, return_dict=False)[0] for inputs in steps]
    names = qmodel.compile_blocks()
    for inputs, expected in zip(steps, eager):
        with torch.no_grad():
            assert relative_l2(qmodel(**inputs, return_dict=False)[0], expected) <= 1e-3
    assert 1 <= compile_counter["graphs"] <= len(names)


def test_cuda_lowering_turns_plane_unpacking_into_plain_pytorch():
    """A layer whose bits switch per timestep group recombines nested planes from unpacked codes; for CUDA the
    unpacking becomes plain PyTorch that Inductor fuses into the recombination (as opaque ops, each ran its own
    eager kernels on every call: viditq-w4a8-mp at 0.66x bf16 on the H100, pixart-8-layer-viditq-mp-profile.txt)."""
    def recombine(plane4, plane2):
        return torch.ops.fxquant.unpack_int4(plane4).to(torch.int32) * 4 + torch.ops.fxquant.unpack_int2(plane2)

    plane4 = pack_bits(torch.randint(-8, 8, (6, 16), dtype=torch.int8), 4)
    plane2 = pack_bits(torch.randint(-2, 2, (6, 16), dtype=torch.int8), 2)
    graph = torch.fx.symbolic_trace(recombine)
    assert lower_to_inductor(graph) == 2
    assert not any("fxquant" in str(node.target) for node in graph.graph.nodes)
    assert torch.equal(graph(plane4, plane2), recombine(plane4, plane2))


def test_mixed_precision_exports_to_onnx_on_integer_ops(viditq_mp, tmp_path):
    from fxquant.backends.onnx import integer_op_count, session

    _, qmodel = viditq_mp
    _with_a_switching_layer(qmodel)
    inputs = inputs_at_timesteps(FAMILIES["pixart"], [900])[0]
    path = fxquant.export_onnx(qmodel, tmp_path / "mp.onnx", inputs, dynamic_batch=False)
    assert integer_op_count(path) == len(qmodel.plan.quantized_layers())
    ort = session(path)
    for t in (900, 100):  # both timestep groups, one graph
        inputs = inputs_at_timesteps(FAMILIES["pixart"], [t])[0]
        feed = {i.name: inputs[i.name].numpy() for i in ort.get_inputs()}
        with torch.no_grad():
            expected = qmodel(**inputs, return_dict=False)[0]
        assert relative_l2(torch.from_numpy(ort.run(None, feed)[0]), expected) <= 1e-3


def test_mixdq_mp_meets_the_budget_with_2_4_6_8_bit_layers():
    family = FAMILIES["unet"]
    reference = family.build()
    calibration = [family.inputs(batch=2, seed=seed) for seed in range(2)]
    config = fxquant.MixdqW4A8MPConfig(target_bits=4.0, candidate_bits=[2, 4, 6, 8])
    qmodel = fxquant.quantize(copy.deepcopy(reference), config, calibration)
    plan = qmodel.plan
    assert abs(plan.quantized_average_weight_bits - 4.0) <= 0.02 + 1e-9
    assert {layer.weight_bits for layer in plan.quantized_layers()} <= {2, 4, 6, 8}
    # both allocations (with and without 2-bit layers) were lowered together and replayed; the lower damage won
    assert set(plan.allocation_checks) == {"2,4,6,8", "4,6,8"}
    with_two_bits = any(layer.weight_bits == 2 for layer in plan.quantized_layers())
    assert with_two_bits == (plan.allocation_checks["2,4,6,8"] < plan.allocation_checks["4,6,8"])
    convs = [layer for layer in plan.quantized_layers() if layer.op == "conv2d"]
    assert convs and all(layer.sensitivity_metric == "fidelity" for layer in convs)
    assert all("6" not in layer.sensitivity for layer in convs)  # convs take one plane: 6 = 4 + 2 is not probed
    stored, bf16 = qmodel.quantized_weight_bytes()
    assert stored < 0.3 * bf16 + 4 * 3 * sum(l.out_features for l in plan.quantized_layers())  # + scales, sums


def test_bos_outlier_is_found_kept_full_precision_and_cached():
    """A CLIP-like text input: token 0 is one large embedding in every prompt (MixDQ's BOS)."""
    family = FAMILIES["pixart"]
    reference = family.build()
    bos = torch.randn(24) * 40

    def with_bos(inputs):
        inputs["encoder_hidden_states"][:, 0] = bos
        return inputs

    calibration = [with_bos(family.inputs(batch=2, seed=seed)) for seed in range(3)]
    evaluation = with_bos(family.inputs(batch=2, seed=9))
    errors = {}
    for aware in (True, False):
        qmodel = fxquant.quantize(copy.deepcopy(reference), fxquant.MixdqW8A8Config(bos_aware=aware), calibration)
        text_layers = [l for l in qmodel.plan.quantized_layers()
                       if l.group == "cross-attention" and l.role != "latent"]
        assert text_layers
        if aware:
            assert all(l.fp_tokens == 1 and l.fp_tokens_cached for l in text_layers)
            assert "+bos1" in qmodel.plan.summary()
            assert qmodel.model.get_submodule(text_layers[0].fqn).fp_token_out.shape == (
                1, text_layers[0].out_features)
        else:
            assert all(l.fp_tokens == 0 for l in text_layers)
        inputs = {}
        handles = [reference.get_submodule(l.fqn).register_forward_pre_hook(
            lambda module, args, fqn=l.fqn: inputs.setdefault(fqn, args[0])) for l in text_layers]
        with torch.no_grad():
            reference(**evaluation)
            for handle in handles:
                handle.remove()
            errors[aware] = max(relative_l2(qmodel.model.get_submodule(fqn)(x), reference.get_submodule(fqn)(x))
                                for fqn, x in inputs.items())
    assert errors[True] < errors[False] / 5, errors  # the content tokens get a 40x finer static grid


def test_bos_tokens_with_fp8_static_activations():
    """fp8 linears keep their full-precision leading tokens too (every token in the output, the BOS one exact)."""
    family = FAMILIES["pixart"]
    reference = family.build()
    calibration = [family.inputs(batch=2, seed=seed) for seed in range(2)]
    for inputs in calibration:
        inputs["encoder_hidden_states"][:, 0] = 40.0
    qmodel = fxquant.quantize(copy.deepcopy(reference), fxquant.MixdqW8A8Config(fp8=True), calibration)
    layer = next(l for l in qmodel.plan.quantized_layers() if l.fp_tokens)
    assert layer.number_format == "fp8" and layer.act_mode == "static_per_tensor" and layer.act_zero == [0]
    seen = []
    handle = reference.get_submodule(layer.fqn).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        reference(**calibration[0])
        handle.remove()
        out, expected = qmodel.model.get_submodule(layer.fqn)(seen[0]), reference.get_submodule(layer.fqn)(seen[0])
    assert out.shape == expected.shape
    assert relative_l2(out[:, :1], expected[:, :1]) < 0.03  # fp8 weights, full-precision activations
    assert relative_l2(out, expected) < 0.05


def test_mixdq_mp_with_fp8_activations(tmp_path):
    """MixDQ's allocation over fp8 linears: each runs fp8 activations against its chosen bits, e4m3 weights at 8,
    packed integer codes (run as e4m3) at 4 / 2, within the budget and about as close to full precision as the
    int8-activation allocation; convolutions stay int8; the checkpoint restores it bit for bit."""
    family = FAMILIES["unet"]
    reference = family.build()
    calibration = [family.inputs(batch=2, seed=seed) for seed in range(2)]
    qmodel, int8 = (fxquant.quantize(copy.deepcopy(reference), f"mixdq-w4a8-mp:fp8={fp8},static_conv_activations=true",
                                     calibration) for fp8 in ("true", "false"))
    plan = qmodel.plan
    assert abs(plan.quantized_average_weight_bits - 4.0) <= 0.02 + 1e-9
    linears = [layer for layer in plan.quantized_layers() if layer.op == "linear"]
    assert {layer.number_format for layer in linears} == {"fp8"} and len({l.weight_bits for l in linears}) > 1
    assert all(layer.number_format == "int" for layer in plan.quantized_layers() if layer.op == "conv2d")
    for layer in linears:
        weight_q = qmodel.model.get_submodule(layer.fqn).weight_q
        assert weight_q.dtype == (torch.float8_e4m3fn if layer.weight_bits == 8 else torch.uint8)
    inputs = family.inputs(batch=2, seed=9)
    with torch.no_grad():
        out, int8_out, expected = (model(**inputs, return_dict=False)[0] for model in (qmodel, int8, reference))
        # this tiny UNet's 4-bit budget costs ~13 % either way; fp8 activations add ~2 % of that
        assert relative_l2(out, expected) < 1.2 * relative_l2(int8_out, expected)
        assert torch.equal(fxquant.load(fxquant.save(qmodel, tmp_path / "mp-fp8"))(**inputs, return_dict=False)[0],
                           out)


@pytest.mark.parametrize("recipe,message", [
    ("mixdq-w4a8-mp:target_bits=9.0", "target_bits=9.0 lies outside"),
    ("w8a8:mixed_precision=tensor", "mixed_precision='tensor' is unknown"),
    ("w8a8:mixed_precision=layer,bits_per_timestep_group=true", "bits_per_timestep_group needs timestep_groups"),
    ("viditq-w4a8-mp:executed_bits=7.0", "executed_bits=7.0 needs bits_per_timestep_group and must lie"),
    ("mixdq-w4a8-mp:sensitivity_rows=1", "sensitivity_rows=1 at least 2"),
    ("mixdq-w4a8-mp:sensitivity_calls=0", "sensitivity_calls=0 must be at least 1"),
    ("viditq-w4a8-mp:candidate_bits=[2,4,8]", "2-bit weights cannot vary per timestep group"),
    ("mixdq-w4a8-mp:act_mode=dynamic_per_token,act_candidate_bits=[4,8],act_target_bits=6",
     "4-bit activations are static"),
    ("mixdq-w4a8-mp:act_candidate_bits=[4,8]", "act_target_bits=None must lie within"),
    ("viditq-w4a8-mp:act_candidate_bits=[8,16],act_target_bits=10", "need mixed_precision='layer'"),
    ("mixdq-w4a8-mp:act_candidate_bits=[6,8],act_target_bits=7", "must be a non-empty subset"),
    ("mixdq-w4a8-mp:content_metric=clip", "content_metric='clip' is unknown"),
    ("viditq-w4a8-mp:content_metric=render", "content_metric='render' scores whole generations"),
    ("w8a8:content_metric=render", "content_metric='render' scores whole generations"),
    ("mixdq-w4a8-mp:content_metric=render,render_prompts=0", "render_prompts >= 1"),
    ("viditq-w4a8-mp:fp8=true", "mixed_precision with fp8 chooses per layer among 2 / 4 / 8"),
    ("mixdq-w4a8-mp:fp8=true,candidate_bits=[4,6,8]", "mixed_precision with fp8"),
])
def test_mixed_precision_config_errors(recipe, message):
    with pytest.raises(fxquant.RecipeError, match=re.escape(message)):
        fxquant.get_config(recipe)


def test_recipe_strings_take_overrides():
    config = fxquant.get_config("mixdq-w4a8-mp:target_bits=5.0,bos_aware=false")
    assert isinstance(config, fxquant.MixdqW4A8MPConfig) and config.target_bits == 5.0 and not config.bos_aware
    assert config.name == "mixdq-w4a8-mp:target_bits=5.0,bos_aware=false"
    assert fxquant.get_config("viditq-w4a8-mp:bits_per_timestep_group=false,timestep_groups=[]").timestep_groups == []
    assert fxquant.get_config("mixdq-w4a8-mp:candidate_bits=[2,4,6,8],target_bits=4").candidate_bits == [2, 4, 6, 8]
    with pytest.raises(fxquant.RecipeError, match="'target_bitz' is not a config field"):
        fxquant.get_config("mixdq-w4a8-mp:target_bitz=5")
    with pytest.raises(fxquant.RecipeError, match="target_bits=1.0 lies outside"):
        fxquant.get_config("mixdq-w4a8-mp:target_bits=1.0")


def test_per_group_bits_need_calibration_in_every_timestep_group():
    family = FAMILIES["pixart"]
    with pytest.raises(fxquant.CalibrationError, match=r"reach no call in timestep groups \[0 \(-inf <= t < 500\)\]"):
        fxquant.quantize(family.build(), fxquant.ViditqW4A8MPConfig(target_bits=6.0),
                         inputs_at_timesteps(family, [950, 700]))


@pytest.fixture(scope="module")
def mixdq_with_activation_bits():
    family = FAMILIES["pixart"]
    reference = family.build()
    config = fxquant.MixdqW4A8MPConfig(target_bits=5.0, act_candidate_bits=[4, 8, 16], act_target_bits=7.0)
    qmodel = fxquant.quantize(copy.deepcopy(reference), config, [family.inputs(batch=2, seed=s) for s in range(2)])
    return reference, qmodel


def test_activation_bits_are_allocated_within_their_budget(mixdq_with_activation_bits):
    reference, qmodel = mixdq_with_activation_bits
    linears = [layer for layer in qmodel.plan.quantized_layers() if layer.op == "linear"]
    assert all(layer.sensitivity.keys() >= {"a4", "a16"} for layer in linears)  # activations probed alone
    act_average = sum(l.in_features * l.act_bits for l in linears) / sum(l.in_features for l in linears)
    assert act_average <= 7.0 + 1e-9 and {l.act_bits for l in linears} > {8}
    inputs = FAMILIES["pixart"].inputs(batch=2, seed=7)
    with torch.no_grad():
        assert relative_l2(qmodel(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0]) < 0.1


def test_a4_layers_quantize_on_a_4_bit_grid_and_a16_layers_run_weight_only():
    layer = LayerPlan("proj", "linear", "mlp", "latent", num_params=48 * 32, in_features=32, out_features=48,
                      weight_bits=8, weight_granularity="per_channel", number_format="int", act_bits=4,
                      act_mode="static_per_tensor", act_scale=[0.5], act_zero=[-1])
    linear = torch.nn.Linear(32, 48)
    x = torch.randn(3, 32) * 3
    codes = torch.ops.fxquant.quantize_per_tensor(x, torch.tensor([0.5]), torch.tensor([-1], dtype=torch.int32), 4)
    assert codes.min() >= -8 and codes.max() <= 7 and (codes == 7).any()  # clipped to the 4-bit grid
    a4 = QuantLinear.from_float(linear, layer)
    assert a4.act_bits == 4 and "A4 static" in repr(a4)
    a16 = QuantLinear.from_float(linear, dataclasses.replace(layer, act_bits=16))
    weight = a16.weight_q.float() * a16.weight_scale[:, None]
    torch.testing.assert_close(a16(x), torch.nn.functional.linear(x, weight, linear.bias), rtol=1e-6, atol=1e-6)


def test_activation_bits_survive_save_load_and_onnx_export(mixdq_with_activation_bits, tmp_path):
    from fxquant.backends.onnx import session

    _, qmodel = mixdq_with_activation_bits
    loaded = fxquant.load(fxquant.save(qmodel, tmp_path / "ckpt"))
    inputs = FAMILIES["pixart"].inputs(batch=2, seed=8)
    with torch.no_grad():
        expected = qmodel(**inputs, return_dict=False)[0]
        assert torch.equal(loaded(**inputs, return_dict=False)[0], expected)
    ort = session(fxquant.export_onnx(qmodel, tmp_path / "act.onnx", inputs, dynamic_batch=False))
    feed = {i.name: inputs[i.name].numpy() for i in ort.get_inputs()}
    assert relative_l2(torch.from_numpy(ort.run(None, feed)[0]), expected) <= 1e-3


def test_rendered_content_metric_scores_content_layers_by_generated_samples(tiny_pipeline_dir):
    """content_metric='render': cross-attention / feed-forward units are scored by SSIM of samples the pipeline
    generates with the unit quantized; the renders are not recorded as calibration calls."""
    from diffusers import PixArtAlphaPipeline
    from tiny_pipeline import CALIBRATION_PROMPTS, pipeline_kwargs

    pipe = PixArtAlphaPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    fxquant.quantize_pipeline(pipe, "mixdq-w4a8-mp:content_metric=render,render_prompts=2", CALIBRATION_PROMPTS[:4],
                              num_inference_steps=2, batch_size=2, **pipeline_kwargs())
    plan = pipe.transformer.plan
    assert plan.calibration_calls == 2 * 2  # 2 batches x 2 steps: probes' generations are not calibration
    layers = plan.quantized_layers()
    content = [layer for layer in layers if layer.group in ("cross-attention", "mlp")]
    assert content and all(layer.sensitivity_metric == "rendered-ssim" for layer in content)
    assert all(layer.sensitivity_metric != "rendered-ssim" for layer in layers if layer not in content)
    damages = [layer.sensitivity for layer in content]
    assert all(0 <= value <= 2 for table in damages for value in table.values())
    assert sum(table["2"] for table in damages) > sum(table["8"] for table in damages)


def test_rendered_content_metric_needs_the_pipeline():
    family = FAMILIES["pixart"]
    with pytest.raises(fxquant.CalibrationError, match="generates samples with the pipeline: quantize with "
                                                       "fxquant.quantize_pipeline"):
        fxquant.quantize(family.build(), "mixdq-w4a8-mp:content_metric=render", [family.inputs()])


def test_sensitivity_cache_resumes_a_stopped_run_and_refuses_another_model(tmp_path, monkeypatch):
    family = FAMILIES["pixart"]
    reference = family.build()
    calibration = inputs_at_timesteps(family, [900, 500, 100])
    cache = tmp_path / "probes.json"
    config = fxquant.MixdqW4A8MPConfig(sensitivity_cache=str(cache))
    uncached = fxquant.quantize(copy.deepcopy(reference), dataclasses.replace(config, sensitivity_cache=None),
                                calibration)
    measure, probed = SensitivityPass._damage, []

    def stop_after_three(self, *args):
        if len(probed) == 3:
            raise KeyboardInterrupt
        probed.append(args)
        return measure(self, *args)

    monkeypatch.setattr(SensitivityPass, "_damage", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        fxquant.quantize(copy.deepcopy(reference), config, calibration)
    assert len(json.loads(cache.read_text())["damage"]) == 3

    probed.clear()
    monkeypatch.setattr(SensitivityPass, "_damage", lambda self, *args: probed.append(args) or measure(self, *args))
    resumed = fxquant.quantize(copy.deepcopy(reference), config, calibration)
    assert len(probed) == len(json.loads(cache.read_text())["damage"]) - 3 > 0
    assert {layer.fqn: (layer.weight_bits, layer.sensitivity) for layer in resumed.plan.quantized_layers()} == \
        {layer.fqn: (layer.weight_bits, layer.sensitivity) for layer in uncached.plan.quantized_layers()}

    probed.clear()  # another budget: every damage comes from the file
    fxquant.quantize(copy.deepcopy(reference), dataclasses.replace(config, target_bits=6.0), calibration)
    assert not probed

    probed.clear()  # a weight one bf16 step off (as a GPU's calibration moves between runs): still this model
    nudged = copy.deepcopy(reference)
    with torch.no_grad():
        next(nudged.parameters()).mul_(1 + 2**-8)
    fxquant.quantize(nudged, config, calibration)
    assert not probed

    other = copy.deepcopy(reference)
    with torch.no_grad():
        next(other.parameters()).mul_(1.05)
    with pytest.raises(fxquant.errors.CalibrationError, match="another model.*differ by more than 1%"):
        fxquant.quantize(other, config, calibration)
    with pytest.raises(fxquant.errors.CalibrationError, match="another model.*fingerprint differs in config"):
        fxquant.quantize(copy.deepcopy(reference), dataclasses.replace(config, candidate_bits=[4, 8]), calibration)


@pytest.mark.parametrize("name,falls_back", [("pixart", False), ("flux", False), ("unet", True)])
def test_probes_replay_the_blocks_before_their_unit_with_equal_damages(monkeypatch, name, falls_back):
    """A probe of a unit in block i replays block i-1's full-precision output instead of running blocks 0..i-1,
    where that reproduces the model (DiT blocks in a row; the tiny UNet's mid block, but not past its up blocks'
    skip connections, where replay stops); damages are unchanged."""
    family = FAMILIES[name]
    reference = family.build()
    calibration = inputs_at_timesteps(family, [900, 500, 100])
    prepare, positions, stopped = PrefixReplay.prepare, [], []

    def recording(self, lowered):
        positions.append(prepare(self, lowered))
        stopped.append(not self.order)
        return positions[-1]

    monkeypatch.setattr(PrefixReplay, "prepare", recording)
    replayed = fxquant.quantize(copy.deepcopy(reference), fxquant.MixdqW4A8MPConfig(), calibration)
    assert any(positions) and any(stopped) == falls_back
    whole = fxquant.quantize(copy.deepcopy(reference), fxquant.MixdqW4A8MPConfig(sensitivity_replay=False),
                             calibration)
    for layer in whole.plan.quantized_layers():
        assert replayed.plan.layers[layer.fqn].sensitivity == pytest.approx(layer.sensitivity, rel=1e-4)


def _block_bits(qmodel) -> list[tuple]:
    """Per transformer block: the planned weight bits of its quantized layers, in order."""
    layers = qmodel.plan.quantized_layers()
    return [tuple(layer.weight_bits for layer in layers if layer.fqn.startswith(f"transformer_blocks.{index}."))
            for index in range(len(qmodel.model.transformer_blocks))]


def test_bits_shared_across_blocks_keep_the_blocks_one_compiled_graph():
    """share_bits_across_blocks: each layer position of the repeated transformer blocks is one unit (one probe, one
    choice), so every block gets the same bits and regional compilation compiles one graph; without it, one graph per
    distinct bit pattern of the blocks. The budget holds either way."""
    family = FAMILIES["pixart"]
    calibration = inputs_at_timesteps(family, [900, 500, 100])
    graphs, patterns, averages = {}, {}, {}
    for shared in (False, True):
        qmodel = fxquant.quantize(family.build(), f"mixdq-w4a8-mp:share_bits_across_blocks={str(shared).lower()}",
                                  calibration)
        patterns[shared] = _block_bits(qmodel)
        layers = qmodel.plan.quantized_layers()
        averages[shared] = sum(l.num_params * l.weight_bits for l in layers) / sum(l.num_params for l in layers)
        torch._dynamo.reset()
        compile_counter.clear()
        qmodel.compile_blocks()
        with torch.no_grad():
            qmodel(**family.inputs(batch=2, seed=7), return_dict=False)
        graphs[shared] = compile_counter["graphs"]
    assert len(set(patterns[True])) == 1 and graphs[True] == 1
    assert graphs[False] == len(set(patterns[False]))
    assert all(abs(average - 4.0) <= 0.02 + 1e-9 for average in averages.values())
    with pytest.raises(fxquant.RecipeError, match="share_bits_across_blocks needs a mixed_precision"):
        fxquant.get_config("w4a8:share_bits_across_blocks=true")

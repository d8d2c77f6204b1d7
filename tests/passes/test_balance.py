"""balance: ViDiT-Q's smoothing + block-Hadamard rotation, chosen from calibration statistics; int4 packing."""

import copy

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import fxquant
from families import FAMILIES
from fxquant.balance import hadamard, rotate, rotation_block, rotation_signs, smoothing_scale
from fxquant.metrics import relative_l2
from fxquant.quantizer import pack_int4, unpack_int4


@pytest.mark.parametrize("width,block", [(1152, 128), (192, 64), (3072, 128), (1536, 128), (384, 128), (33, 1)])
def test_rotation_block_for_non_power_of_two_widths(width, block):
    assert rotation_block(width) == block


def _sylvester(size: int) -> torch.Tensor:
    """The orthonormal Walsh-Hadamard matrix by Sylvester's construction, H_2n = [[H, H], [H, -H]] / sqrt(2)."""
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0) / 2**0.5
    return matrix.float()


@pytest.mark.parametrize("width", [1152, 192, 96])
def test_rotation_is_orthogonal_and_exact_in_fp32(width):
    block = rotation_block(width)
    h = hadamard(block, torch.empty(0))
    torch.testing.assert_close(h, _sylvester(block), atol=1e-6, rtol=0)
    torch.testing.assert_close(h @ h.T, torch.eye(block), atol=1e-6, rtol=0)
    x, w = torch.randn(7, width), torch.randn(5, width)
    signs = rotation_signs(width, "blocks.0.attn1.to_q", seed=0)
    torch.testing.assert_close(rotate(x, signs, block) @ rotate(w, signs, block).T, x @ w.T, atol=2e-4, rtol=1e-4)


def test_bf16_rotation_rounds_once():
    """Half-precision inputs rotate in their own dtype with fp32 accumulation: within one rounding of the fp32
    rotation."""
    x, signs = torch.randn(64, 384).bfloat16(), rotation_signs(384, "blocks.0.ff.net.2", seed=0)
    exact = rotate(x.float(), signs, 128)
    error = (rotate(x, signs, 128).float() - exact).abs()
    # one bf16 rounding (8 significant bits: at most 2^-8 relative) plus H's own in bf16 (1.1e-4 relative)
    assert (error <= exact.abs() * (2**-8 + 2**-12) + exact.abs().max() * 1e-6).all()


def test_rotation_builds_nothing_off_the_device():
    """Traced on the meta device, every value of the rotation stays there: no tensor is built on the CPU and copied
    over (a compiled graph would do that on every call, and CUDA-graph capture refuses it)."""
    graph = make_fx(lambda x, signs: rotate(x, signs, 64))(torch.empty(3, 192, device="meta", dtype=torch.bfloat16),
                                                          torch.empty(192, device="meta")).graph
    values = [node.meta.get("val") for node in graph.nodes]
    off_device = [node for node, value in zip(graph.nodes, values)
                  if isinstance(value, torch.Tensor) and value.device.type != "meta"]
    assert not off_device, off_device


def test_rotation_signs_are_deterministic_per_layer_and_seed():
    a = rotation_signs(256, "blocks.0.ff.net.2", seed=0)
    assert torch.equal(a, rotation_signs(256, "blocks.0.ff.net.2", seed=0))
    assert not torch.equal(a, rotation_signs(256, "blocks.1.ff.net.2", seed=0))
    assert not torch.equal(a, rotation_signs(256, "blocks.0.ff.net.2", seed=1))
    assert set(a.unique().tolist()) == {-1.0, 1.0}


def test_smoothing_preserves_the_product():
    x, w = torch.randn(9, 16) * torch.linspace(0.1, 30, 16), torch.randn(4, 16)
    s = smoothing_scale(x.abs().amax(dim=0), w, alpha=0.5)
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, atol=1e-3, rtol=1e-4)
    assert (x / s).abs().amax(dim=0).std() < x.abs().amax(dim=0).std()  # channel ranges evened out


def test_int4_pack_roundtrip():
    q = torch.randint(-8, 8, (6, 10), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 5)
    assert torch.equal(unpack_int4(packed), q)


class OutlierMLP(nn.Module):
    """Two linears whose input has a few channels 40x larger than the rest (the case balancing is for)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 256)
        self.mid = nn.Linear(256, 256)
        self.mid2 = nn.Linear(256, 256)
        self.out = nn.Linear(256, 8)
        gain = torch.ones(256)
        gain[::37] = 40.0
        self.register_buffer("gain", gain)

    def forward(self, hidden_states):
        h = self.embed(hidden_states) * self.gain
        return self.out(self.mid2(torch.relu(self.mid(h)) * self.gain))


@pytest.fixture(scope="module")
def outlier_inputs():
    g = torch.Generator().manual_seed(0)
    return [{"hidden_states": torch.randn(64, 8, generator=g)} for _ in range(2)]


def _error(recipe, inputs):
    torch.manual_seed(0)
    model = OutlierMLP().eval()
    reference = copy.deepcopy(model)
    qmodel = fxquant.quantize(model, recipe, inputs)
    test = {"hidden_states": torch.randn(32, 8, generator=torch.Generator().manual_seed(9))}
    with torch.no_grad():
        return relative_l2(qmodel(**test), reference(**test)), qmodel.plan


def test_balancing_is_chosen_from_outlier_ratio_and_reduces_error(outlier_inputs):
    plain, _ = _error("w8a8", outlier_inputs)
    balanced, plan = _error("viditq-w8a8", outlier_inputs)
    assert plan.layers["mid"].outlier_ratio > 20 and plan.layers["mid"].balance == "smooth+rotate"
    assert plan.layers["mid2"].balance == "smooth+rotate"
    assert balanced < 0.7 * plain, f"viditq-w8a8 {balanced:.4f} vs w8a8 {plain:.4f}"
    smooth_only, _ = _error("smoothquant-w8a8", outlier_inputs)
    assert smooth_only < plain, f"smoothquant-w8a8 {smooth_only:.4f} vs w8a8 {plain:.4f}"


def test_threshold_decides_which_layers_are_balanced():
    family = FAMILIES["pixart"]
    calibration = [family.inputs(seed=1)]
    everything = fxquant.inspect_passes(family.build(), fxquant.ViditqW8A8Config(balance_threshold=0.0),
                                        calibration, until="balance").plan
    nothing = fxquant.inspect_passes(family.build(), fxquant.ViditqW8A8Config(balance_threshold=1e9),
                                     calibration, until="balance").plan
    linears = [l for l in everything.quantized_layers() if l.op == "linear"]
    assert linears and all(l.balance == "smooth+rotate" and l.outlier_ratio > 1 for l in linears)
    assert all(l.balance is None and l.outlier_ratio is not None for l in nothing.quantized_layers()
               if l.op == "linear")
    assert "smooth+rotate" in everything.summary()


@pytest.mark.parametrize("recipe", ["viditq-w8a8", "viditq-w4a8", "w4a8"])
def test_balanced_and_int4_models_save_load_and_stay_close(quantized_family, tmp_path, recipe):
    reference, _, calibration = quantized_family("pixart", "w8a8")
    config = fxquant.get_config(recipe)
    config.balance_threshold = 0.0
    qmodel = fxquant.quantize(copy.deepcopy(reference), config, calibration)
    inputs = FAMILIES["pixart"].inputs(seed=4)
    with torch.no_grad():
        out = qmodel(**inputs, return_dict=False)[0]
        error = relative_l2(out, reference(**inputs, return_dict=False)[0])
    assert error < (0.02 if "w8" in recipe else 0.05), f"{recipe}: {error:.4f}"
    loaded = fxquant.load(fxquant.save(qmodel, tmp_path / recipe))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs, return_dict=False)[0], out)
    if "w4" in recipe:
        layer = next(l for l in loaded.plan.quantized_layers() if l.op == "linear")
        assert loaded.model.get_submodule(layer.fqn).weight_q.dtype == torch.uint8  # packed, two per byte


def test_smoothing_folds_into_an_affine_layer_norm(quantized_family, tmp_path):
    """UNet transformer blocks: norm1 (affine LayerNorm) feeds attn1's q / k / v alone (norm2 attn2's q, norm3 the
    feed-forward); the consumers of a norm share one s and the 1 / s moves into the norm's weight and bias (no
    multiply left at run time)."""
    reference, _, calibration = quantized_family("unet", "w8a8")
    qmodel = fxquant.quantize(copy.deepcopy(reference), fxquant.SmoothQuantW8A8Config(), calibration)
    folded = [l for l in qmodel.plan.quantized_layers() if l.smooth_folded_into]
    assert folded, qmodel.plan.summary()
    assert any(l.fqn.endswith("attn1.to_k") and l.smooth_folded_into.endswith("norm1") for l in folded)
    for layer in folded:
        peers = [p for p in folded if p.smooth_folded_into == layer.smooth_folded_into]
        assert all(p.smooth == layer.smooth for p in peers)
        assert qmodel.model.get_submodule(layer.fqn).smooth_inv is None
        norm, original = (m.get_submodule(layer.smooth_folded_into) for m in (qmodel.model, reference))
        torch.testing.assert_close(norm.weight * torch.tensor(layer.smooth), original.weight, rtol=1e-5, atol=1e-6)
    assert "(1/s in " in qmodel.plan.summary()
    inputs = FAMILIES["unet"].inputs(seed=4)
    with torch.no_grad():
        out = qmodel(**inputs, return_dict=False)[0]
        expected = reference(**inputs, return_dict=False)[0]
    assert relative_l2(out, expected) < 0.05
    loaded = fxquant.load(fxquant.save(qmodel, tmp_path / "folded"))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs, return_dict=False)[0], out)

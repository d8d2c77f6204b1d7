"""fxquant custom ops against plain float references; opcheck over odd and empty shapes."""

import pytest
import torch
import torch.nn.functional as F

import fxquant  # noqa: F401
from fxquant.ops import prologue_reference
from fxquant.quantizer import (dequantize_weight_per_channel, dequantize_weights, groupable, quantize_weight_groups,
                               quantize_weight_per_channel, quantize_weight_planes)

fxq = torch.ops.fxquant


def _dequant_rows(q, scale, zero):
    return (q.float() - zero.float()) * scale


@pytest.mark.parametrize("shape", [(1, 3), (7, 33), (64, 128), (0, 16)])
def test_quantize_per_token_roundtrip_error_within_half_step(shape):
    x = torch.randn(shape) * 3 + 0.5
    q, scale, zero = fxq.quantize_per_token(x)
    assert q.dtype == torch.int8 and scale.shape == (shape[0], 1) and zero.dtype == torch.int32
    if shape[0]:
        assert ((_dequant_rows(q, scale, zero) - x).abs() <= scale / 2 + 1e-6).all()


def test_quantize_per_token_uses_whole_grid_for_one_sided_rows():
    x = torch.rand(4, 64) * 5  # all positive: asymmetric grid spans [0, max]
    q, _, _ = fxq.quantize_per_token(x)
    assert q.min() == -128 and q.max() == 127


@pytest.mark.parametrize("m,k,n", [(1, 8, 4), (5, 33, 17), (64, 96, 48)])
def test_int8_linear_matches_dequantized_float_matmul(m, k, n):
    x = torch.randn(m, k)
    w = torch.randn(n, k)
    bias = torch.randn(n)
    x_q, x_scale, x_zero = fxq.quantize_per_token(x)
    w_q, w_scale = quantize_weight_per_channel(w)
    w_sum = w_q.sum(dim=1, dtype=torch.int32)
    out = fxq.int8_linear(x_q, x_scale, x_zero, w_q, w_scale, w_sum, bias, torch.float32)
    expected = _dequant_rows(x_q, x_scale, x_zero).double() @ dequantize_weight_per_channel(
        w_q, w_scale, torch.float64).t() + bias.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    assert (out - (x @ w.t() + bias)).norm() / (x @ w.t() + bias).norm() < 0.02


def test_group_wise_weights_follow_local_ranges_and_the_linear_ops_apply_them():
    """One scale per output channel and group of inputs: weights whose inputs differ in range (a few wide input
    channels, as real layers have) quantize with less error than with one scale per channel; int8_linear /
    fp8_linear with [N, G] scales compute the dequantized float product."""
    w = torch.randn(48, 256) * torch.where(torch.arange(256) < 32, 8.0, 1.0)
    q, scale = quantize_weight_groups(w, 4, 32)
    per_channel_q, per_channel_scale = quantize_weight_per_channel(w, 4)
    grouped_error = (dequantize_weights(q, scale) - w).norm() / w.norm()
    assert scale.shape == (48, 8) and grouped_error < 0.5 * (dequantize_weights(
        per_channel_q, per_channel_scale) - w).norm() / w.norm()
    x, bias = torch.randn(9, 256), torch.randn(48)
    x_q, x_scale, x_zero = fxq.quantize_per_token(x)
    w_sum = q.reshape(48, 8, 32).sum(dim=2, dtype=torch.int32)
    out = fxq.int8_linear(x_q, x_scale, x_zero, q, scale, w_sum, bias, torch.float32)
    expected = _dequant_rows(x_q, x_scale, x_zero).double() @ dequantize_weights(q, scale).double().t() + bias.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    x8, x8_scale = fxq.quantize_per_token_fp8(x)
    out = fxq.fp8_linear(x8, x8_scale, q.float().to(torch.float8_e4m3fn), scale, bias, torch.float32)
    expected = (x8.double() * x8_scale.double()) @ dequantize_weights(q, scale).double().t() + bias.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    # whole groups, and packed K steps of at least 32 inside one group (PixArt's 1152 inputs; 2 bits: 288 per field)
    assert groupable(1152, 4, 128) and groupable(1152, 2, 128) and not groupable(1152, 4, 256)
    assert not groupable(24, 4, 32) and not groupable(1152, 8, 128)
    with pytest.raises(ValueError, match="do not split into groups of 32"):
        quantize_weight_groups(torch.randn(4, 48), 4, 32)
    with pytest.raises(ValueError, match="group-wise scales take one weight plane"):
        quantize_weight_planes(torch.randn(4, 64), [4, 4], group_size=32)


@pytest.mark.parametrize("stride,padding,dilation", [([1, 1], [1, 1], [1, 1]), ([2, 2], [0, 1], [1, 1]),
                                                     ([1, 1], [2, 2], [2, 2])])
def test_int8_conv2d_matches_float_conv(stride, padding, dilation):
    x = torch.randn(2, 6, 9, 7)
    w = torch.randn(5, 6, 3, 3)
    bias = torch.randn(5)
    w_q, w_scale = quantize_weight_per_channel(w)
    w_sum = w_q.reshape(5, -1).sum(dim=1, dtype=torch.int32)
    out = fxq.int8_conv2d(x, None, None, w_q, w_scale, w_sum, bias, stride, padding, dilation)
    expected = F.conv2d(x, w, bias, stride=stride, padding=padding, dilation=dilation)
    assert out.shape == expected.shape
    assert (out - expected).norm() / expected.norm() < 0.02
    static = fxq.int8_conv2d(x, torch.tensor([x.abs().max().item() / 127]), torch.tensor([0], dtype=torch.int32),
                             w_q, w_scale, w_sum, bias, stride, padding, dilation)
    assert (static - expected).norm() / expected.norm() < 0.05


def test_opcheck_all_ops():
    x = torch.randn(5, 24)
    w_q, w_scale = quantize_weight_per_channel(torch.randn(12, 24))
    w_sum = w_q.sum(dim=1, dtype=torch.int32)
    x_q, x_scale, x_zero = fxq.quantize_per_token(x)
    for rows in (x, torch.randn(0, 24)):
        torch.library.opcheck(fxq.quantize_per_token, (rows,))
    torch.library.opcheck(fxq.quantize_per_tensor, (x, torch.tensor([0.05]), torch.tensor([3], dtype=torch.int32)))
    torch.library.opcheck(fxq.int8_linear, (x_q, x_scale, x_zero, w_q, w_scale, w_sum, None, torch.bfloat16))
    torch.library.opcheck(fxq.int8_linear, (x_q, x_scale, x_zero, w_q, w_scale, w_sum, torch.randn(12), torch.float32))
    residual, table = torch.randn(1, 5, 12, dtype=torch.bfloat16), torch.randn(1, 6, 12, dtype=torch.bfloat16)
    torch.library.opcheck(fxq.linear_residual, (x_q, x_scale, x_zero, w_q, 8, w_scale, w_sum, None, table[:, 2:3],
                                                residual))
    cw_q, cw_scale = quantize_weight_per_channel(torch.randn(4, 3, 3, 3))
    cw_sum = cw_q.reshape(4, -1).sum(dim=1, dtype=torch.int32)
    torch.library.opcheck(fxq.int8_conv2d, (torch.randn(1, 3, 5, 6), None, None, cw_q, cw_scale, cw_sum, None,
                                            [1, 1], [1, 1], [1, 1]))


def test_fused_quantize_op_opcheck_and_bad_prologues():
    x, table = torch.randn(2, 5, 24), torch.randn(2, 6, 24)
    for args in ((x, None, None, 1 + table[:, 1:2], table[:, 0:1], "layer", 1e-6, "none", False),
                 (x, torch.randn(24), None, None, None, "rms", 1e-6, "silu", True),
                 (torch.randn(7, 48), None, None, None, None, "none", 0.0, "geglu_tanh", False)):
        torch.library.opcheck(fxq.fused_quantize_per_token, args)
    with pytest.raises(ValueError, match="activations"):
        fxq.fused_quantize_per_token(x, None, None, None, None, "none", 0.0, "relu", False)
    with pytest.raises(ValueError, match="gated"):
        fxq.fused_quantize_per_token(x, None, None, None, None, "layer", 1e-6, "geglu", False)


def test_fused_quantize_concat_is_the_quantized_concatenation_and_rejects_bad_parts():
    """Rows sample by sample: each sample's head tokens, then its tail tokens, each part with its own modulation."""
    head, tail, table = torch.randn(2, 3, 24), torch.randn(2, 5, 24), torch.randn(2, 6, 24)
    weight, bias = torch.randn(24), torch.randn(24)
    args = (head, tail, weight, bias, 1 + table[:, 1:2], table[:, 0:1], 1 + table[:, 4:5], table[:, 3:4], "layer",
            1e-5, "none", False)
    torch.library.opcheck(fxq.fused_quantize_concat, args)
    parts = [prologue_reference(x, weight, bias, mul, add, "layer", 1e-5, "none").reshape(x.shape)
             for x, mul, add in ((head, *args[4:6]), (tail, *args[6:8]))]
    expected = fxq.quantize_per_token(torch.cat(parts, dim=1).reshape(16, 24))
    for got, want in zip(fxq.fused_quantize_concat(*args), expected):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="equal B and C"):
        fxq.fused_quantize_concat(head, tail[:1], *args[2:])
    with pytest.raises(ValueError, match="gated"):
        fxq.fused_quantize_concat(head, tail, None, None, None, None, None, None, "none", 0.0, "geglu", False)


def test_attention_codes_op_is_the_static_quantization_of_the_attention_and_opchecks():
    q, k, v = (torch.randn(1, 2, n, 16) for n in (5, 7, 7))
    scales, out_scale = torch.full((3,), 4.0 / 448), torch.tensor([0.3 / 448])
    args = (q, k, v, 0.25, True, scales, out_scale)
    torch.library.opcheck(fxq.quantized_attention_codes, args)
    codes = fxq.quantized_attention_codes(*args)
    expected = fxq.quantize_per_tensor_fp8(fxq.quantized_attention(*args[:6]), out_scale)
    assert torch.equal(codes.view(torch.uint8), expected.view(torch.uint8)) and codes.stride()[1] == 16


@pytest.mark.parametrize("head_dim", [16, 24])
def test_attention_operand_ops_lay_out_codes_for_the_kernel_and_opcheck(head_dim):
    """Q / K: [B, H, N, Dp] codes, V keys-major [B, H, Dv, Np] (24 -> 16 + a 32-wide Q / K tail, 16 + a 16-wide V
    tail; Np: N up to 16 keys), the padding zero; the linear form equals the layout of the linear's fp32 output seen
    as heads; attention on the laid-out codes equals quantized_attention on the float operands (the codes requantize
    exactly)."""
    batch, heads, tokens, width = 2, 2, 5, 2 * head_dim
    x = torch.randn(batch * tokens, 32)
    x_q, x_scale = fxq.quantize_per_token_fp8(x)
    w = torch.randn(width, 32)
    w_scale = w.abs().amax(dim=1) / 448
    w_q, bias = (w / w_scale[:, None]).to(torch.float8_e4m3fn), torch.randn(width)
    out = fxq.fp8_linear(x_q, x_scale, w_q, w_scale, bias, torch.float32)
    heads_view = out.view(batch, tokens, heads, head_dim).transpose(1, 2)
    scales = torch.stack([heads_view.abs().amax() * factor for factor in (1.0, 0.8, 1.2)]) / 448  # (K saturates)
    padded, padded_v = (48, 32) if head_dim == 24 else (16, 16)
    q = fxq.attention_operand_fp8(heads_view, scales[0], False)
    linear = ([x_q], [x_scale], [w_q], [w_scale], [bias])
    plain = ("none", [None], [None], 0.0, [])  # no head norm, no rotary embedding
    v = fxq.linear_attention_operand(*linear, scales[2], heads, [tokens], True, *plain)
    assert q.shape == (batch, heads, tokens, padded) and v.shape == (batch, heads, padded_v, 16)
    expected = fxq.quantize_per_tensor_fp8(heads_view, scales[0])
    assert torch.equal(q[..., :head_dim].view(torch.uint8), expected.view(torch.uint8))
    assert not q[..., head_dim:].float().any() and not v[:, :, head_dim:].float().any() and not v[..., 5:].float().any()
    assert torch.equal(v[:, :, :head_dim, :tokens].transpose(-1, -2).float(),
                       fxq.quantize_per_tensor_fp8(heads_view, scales[2]).float())
    k = fxq.linear_attention_operand(*linear, scales[1], heads, [tokens], False, *plain)
    assert torch.equal(k.float(), fxq.attention_operand_fp8(heads_view, scales[1], False).float())
    text_q, text_scale = fxq.quantize_per_token_fp8(torch.randn(batch * 3, 32))  # a second part of 3 tokens
    text = ([text_q], [text_scale], [w_q.flip(0)], [w_scale.flip(0)], [None])
    text_view = fxq.fp8_linear(text_q, text_scale, w_q.flip(0), w_scale.flip(0), None, torch.float32).view(
        batch, 3, heads, head_dim).transpose(1, 2)
    for keys_major in (False, True):  # the parts one after the other along tokens, sample by sample
        joint = fxq.linear_attention_operand(*(a + b for a, b in zip(linear, text)), scales[1], heads, [tokens, 3],
                                             keys_major, "none", [None, None], [None, None], 0.0, [])
        expected = fxq.attention_operand_fp8(torch.cat([heads_view, text_view], dim=2), scales[1], keys_major)
        assert torch.equal(joint.view(torch.uint8), expected.view(torch.uint8))
    attention = fxq.attention_fp8_codes(q, k, v, head_dim, head_dim**-0.5, scales, torch.float32)
    expected = fxq.quantized_attention(heads_view, heads_view, heads_view, head_dim**-0.5, True, scales)
    assert torch.equal(attention, expected) and attention.stride() == expected.stride()
    out_scale = torch.tensor(0.2 / 448)
    codes = fxq.attention_fp8_codes(q, k, v, head_dim, head_dim**-0.5, scales, torch.float32, out_scale)
    assert torch.equal(codes.float(), fxq.quantize_per_tensor_fp8(expected, out_scale).float())
    test_utils = ("test_faketensor", "test_aot_dispatch_dynamic")  # (CPU torch multiplies no float8 inputs)
    torch.library.opcheck(fxq.attention_operand_fp8, (heads_view, scales[0], True))
    torch.library.opcheck(fxq.linear_attention_operand, (*linear, scales[1], heads, [tokens], False, *plain),
                          test_utils=test_utils)
    torch.library.opcheck(fxq.attention_fp8_codes, (q, k, v, head_dim, 0.25, scales, torch.bfloat16, out_scale),
                          test_utils=test_utils)


def test_fp8_ops_match_float_reference_and_opcheck():
    x, w, bias = torch.randn(7, 48) * 3, torch.randn(16, 48), torch.randn(16)
    x_q, x_scale = fxq.quantize_per_token_fp8(x)
    assert x_q.dtype == torch.float8_e4m3fn and x_scale.shape == (7, 1)
    assert ((x_q.float() * x_scale - x).norm() / x.norm()) < 0.04  # e4m3: 3 mantissa bits
    w_scale = (w.abs().amax(dim=1) / 448)
    w_q = (w / w_scale[:, None]).to(torch.float8_e4m3fn)
    out = fxq.fp8_linear(x_q, x_scale, w_q, w_scale, bias, torch.float32)
    expected = (x_q.double() * x_scale.double()) @ (w_q.double() * w_scale.double()[:, None]).t() + bias.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    torch.library.opcheck(fxq.quantize_per_token_fp8, (x,))
    # opcheck's schema test multiplies the inputs, which CPU torch cannot do in float8: check fake + autograd dispatch
    torch.library.opcheck(fxq.fp8_linear, (x_q, x_scale, w_q, w_scale, None, torch.bfloat16),
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))
    static_scale = torch.tensor([0.02])
    static_q = fxq.quantize_per_tensor_fp8(x, static_scale)
    assert static_q.shape == x.shape and torch.equal(static_q.float(), (x / 0.02).clamp(-448, 448).to(
        torch.float8_e4m3fn).float())
    torch.library.opcheck(fxq.quantize_per_tensor_fp8, (x, static_scale))
    torch.library.opcheck(fxq.linear_activation_quantize, (x_q, x_scale, None, w_q, 8, w_scale, None, bias, "gelu_tanh",
                                                           static_scale, None),
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


def test_unpack_int4_op():
    from fxquant.quantizer import pack_int4

    q = torch.randint(-8, 8, (3, 12), dtype=torch.int8)
    assert torch.equal(fxq.unpack_int4(pack_int4(q)), q)
    torch.library.opcheck(fxq.unpack_int4, (pack_int4(q),))


def test_unpack_fp8_codes_op_reads_sign_magnitude_fields():
    """fp8 layers keep 4-bit codes as sign / magnitude fields: byte j holds elements j and K/2 + j, signs in bits 7
    / 6, magnitudes in bits 0-2 / 3-5; unpack_fp8_codes gives their e4m3 values (2 bits: pack_bits' layout)."""
    from fxquant.quantizer import pack_bits, pack_sign_magnitude, unpack_sign_magnitude

    assert pack_sign_magnitude(torch.tensor([[-3, 5]], dtype=torch.int8)).tolist() == [[0x80 | 5 << 3 | 3]]
    q = torch.randint(-7, 8, (3, 12), dtype=torch.int8)
    assert torch.equal(unpack_sign_magnitude(pack_sign_magnitude(q)), q)
    out = fxq.unpack_fp8_codes(pack_sign_magnitude(q), 4)
    assert out.dtype == torch.float8_e4m3fn and torch.equal(out.float(), q.float())
    q2 = torch.randint(-2, 2, (3, 12), dtype=torch.int8)
    assert torch.equal(fxq.unpack_fp8_codes(pack_bits(q2, 2), 2).float(), q2.float())
    torch.library.opcheck(fxq.unpack_fp8_codes, (pack_sign_magnitude(q), 4))
    with pytest.raises(ValueError, match=r"codes in \[-7, 7\]"):
        pack_sign_magnitude(torch.tensor([[-8, 0]], dtype=torch.int8))  # no sign / magnitude form in 4 bits
    with pytest.raises(ValueError, match=r"codes in \[-7, 7\]"):
        pack_sign_magnitude(torch.tensor([[-128, 0]], dtype=torch.int8))  # int8 abs(-128) stays negative
    with pytest.raises(ValueError, match="4- or 2-bit codes"):
        fxq.unpack_fp8_codes(pack_sign_magnitude(q), 8)

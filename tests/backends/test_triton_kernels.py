"""Triton kernels against fxquant's reference ops (TRITON_INTERPRET=1 on the CPU, set in conftest)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fxquant  # noqa: F401
from fxquant.metrics import relative_l2
from fxquant.ops import padded_head_dim
from fxquant.quantizer import (asymmetric_params, fp8_scale, pack_bits, pack_sign_magnitude,
                               quantize_fp8_with_scale, quantize_weight_groups, quantize_weight_per_channel,
                               unpack_fp8_layer_e4m3)

triton = pytest.importorskip("triton")
from fxquant.backends.triton.quantize import (fused_quantize_per_token, modulation_table,  # noqa: E402
                                              quantize_per_token, quantize_per_token_fp8)
from fxquant.backends.triton.gemm import attention_operand_gemm, quantized_gemm, unpack_weights  # noqa: E402
import fxquant.backends.triton.gemm as gemm_module  # noqa: E402
from fxquant.backends.triton.attention import attention_fp8_codes, quantized_attention  # noqa: E402
import fxquant.backends.triton.attention as attention_module  # noqa: E402
from fxquant.backends.triton import attention_hopper  # noqa: E402
from fxquant.backends.triton.conv import quantized_conv2d  # noqa: E402

fxq = torch.ops.fxquant


@pytest.mark.parametrize("shape", [(1, 8), (5, 33), (17, 200), (0, 16)])
def test_int8_quantize_kernel_is_bit_exact(shape):
    x = torch.randn(shape) * 3 + 0.4
    q, scale, zero = quantize_per_token(x)
    ref_q, ref_scale, ref_zero = fxq.quantize_per_token(x)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)


def _adaln_operands(batch: int, width: int):
    """(1 + scale, shift) as PixArt makes them: [B, 1, C] chunks of a [B, 6, C] table (strided, not contiguous)."""
    table = torch.randn(batch, 6, width) * 0.3
    return 1 + table[:, 1:2], table[:, 0:1]


PROLOGUES = {  # name -> (x shape, kwargs builder)
    "layer+adaln": ((2, 9, 40), lambda: dict(norm="layer", eps=1e-6, **dict(zip(("mul", "add"),
                                                                                  _adaln_operands(2, 40))))),
    "layer+affine": ((3, 5, 33), lambda: dict(norm="layer", eps=1e-5, weight=torch.randn(33), bias=torch.randn(33))),
    "rms+weight+shift": ((2, 7, 48), lambda: dict(norm="rms", eps=1e-6, weight=torch.randn(48), add=torch.randn(48))),
    "gelu": ((17, 64), lambda: dict(activation="gelu")),
    "gelu_tanh": ((2, 11, 72), lambda: dict(activation="gelu_tanh")),
    "silu+scale": ((2, 6, 24), lambda: dict(activation="silu", mul=torch.randn(2, 1, 24))),
    "geglu": ((2, 13, 2 * 40), lambda: dict(activation="geglu")),
}


def _assert_fp8_codes(q: torch.Tensor, expected: torch.Tensor) -> None:
    """fp8 codes equal to the expected ones, except where fp32 arithmetic in another order puts a value across a
    rounding boundary: those (under 1 %) sit one e4m3 step away. (Under the interpreter the kernels round onto the
    e4m3 grid themselves, `quantize.e4m3_grid`: its own cast loses the exponent carry, 31.5 -> 16.)"""
    q, expected = q.float(), expected.float()
    step = torch.exp2(torch.floor(torch.log2(expected.abs().clamp_min(2.0**-6))) - 3)  # e4m3 spacing at |expected|
    assert ((q - expected).abs() <= step * 1.0001).all() and (q != expected).float().mean() < 0.01


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    """torch's fp8 codes of x (saturated at +-448)."""
    return x.clamp(-448, 448).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("name", list(PROLOGUES))
def test_fused_quantize_kernel_matches_reference(name, fp8):
    shape, make_kwargs = PROLOGUES[name]
    x = torch.randn(shape) * 2 + 0.3
    kwargs = dict(weight=None, bias=None, mul=None, add=None, norm="none", eps=0.0, activation="none", fp8=fp8)
    kwargs.update(make_kwargs())
    q, scale, zero = fused_quantize_per_token(x, **kwargs)
    ref_q, ref_scale, ref_zero = fxq.fused_quantize_per_token(x, *kwargs.values())
    assert q.shape == ref_q.shape and q.dtype == ref_q.dtype and zero.shape == ref_zero.shape
    torch.testing.assert_close(scale, ref_scale, rtol=1e-5, atol=0)  # fp32 sums in a different order
    if fp8:
        _assert_fp8_codes(q, ref_q)
    else:
        assert torch.equal(zero, ref_zero)
        codes = (q.int() - ref_q.int()).abs()
        assert codes.max() <= 1 and (codes > 0).float().mean() < 0.01  # rounding-boundary ties only


@pytest.mark.parametrize("layout", ["row_slice", "transposed"])
def test_fused_quantize_kernel_reads_strided_rows(layout):
    """Rows with a stride of their own are read in place; a layout whose rows are not evenly strided is copied."""
    x = torch.randn(2, 9, 80)[..., :40] if layout == "row_slice" else torch.randn(9, 2, 40).transpose(0, 1)
    mul, add = _adaln_operands(2, 40)
    q, scale, zero = fused_quantize_per_token(x, mul=mul, add=add, norm="layer", eps=1e-6)
    ref_q, ref_scale, ref_zero = fxq.fused_quantize_per_token(x, None, None, mul, add, "layer", 1e-6, "none", False)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-5, atol=0)
    assert (q.int() - ref_q.int()).abs().max() <= 1 and torch.equal(zero, ref_zero)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("modulated", ["both", "head_only", "none"])
def test_concatenated_prologue_kernel_matches_reference(modulated, fp8):
    """Text and video tokens (CogVideoX): one launch quantizes cat([prologue(head), prologue(tail)], dim=1), each
    part read in place (token slices of one buffer with wider rows: strided per sample and per token) with its own
    modulation; a part without one gets its identity."""
    stream = torch.randn(2, 10, 80)[..., :40] * 2 + 0.5
    head, tail = stream[:, :3], stream[:, 3:]
    head_mul, head_add = _adaln_operands(2, 40) if modulated != "none" else (None, None)
    tail_mul, tail_add = _adaln_operands(2, 40) if modulated == "both" else (None, None)
    weight, bias = torch.randn(40), torch.randn(40)
    q, scale, zero = fused_quantize_per_token(head, weight, bias, head_mul, head_add, "layer", 1e-5, fp8=fp8,
                                              tail=tail, tail_mul=tail_mul, tail_add=tail_add)
    ref_q, ref_scale, ref_zero = fxq.fused_quantize_concat(head, tail, weight, bias, head_mul, head_add, tail_mul,
                                                           tail_add, "layer", 1e-5, "none", fp8)
    assert q.shape == ref_q.shape == (20, 40) and q.dtype == ref_q.dtype and zero.shape == ref_zero.shape
    torch.testing.assert_close(scale, ref_scale, rtol=1e-5, atol=0)
    if fp8:
        _assert_fp8_codes(q, ref_q)
    else:
        assert torch.equal(zero, ref_zero) and (q.int() - ref_q.int()).abs().max() <= 1


def test_traced_launches_pass_the_input_once(monkeypatch):
    """Inductor stores a not-yet-materialised input once per kernel argument it is passed as: absent operands must
    not be the input itself (Flux's GELU + concat rows were copied four times)."""
    from fxquant.backends.triton import gemm, quantize

    launches = []

    def recording_wrap_triton(kernel):
        class Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append(args)
        return Grid()

    monkeypatch.setattr(quantize, "wrap_triton", recording_wrap_triton)
    monkeypatch.setattr(gemm, "wrap_triton", recording_wrap_triton)
    x, residual = torch.randn(2, 8, 32), torch.randn(2, 8, 16)
    quantize.quantize_per_token(x, traced=True)
    quantize.fused_quantize_per_token(x, norm="layer", eps=1e-6, fp8=True, traced=True)
    x_q, x_scale, x_zero = fxq.quantize_per_token(x.reshape(16, 32))
    w_q, w_scale = quantize_weight_per_channel(torch.randn(16, 32))
    gemm.quantized_gemm(x_q, x_scale, x_zero, w_q, w_scale, w_q.sum(1, dtype=torch.int32), None, torch.float32,
                        traced=True, residual=residual)
    for args, tensor in zip(launches, (x, x, residual)):
        assert sum(arg is tensor for arg in args) == 1


@pytest.mark.parametrize("m,k,n", [(1, 16, 8), (5, 33, 17), (70, 128, 40)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_gemm_kernel_is_exact(m, k, n, with_bias):
    x, w = torch.randn(m, k), torch.randn(n, k)
    bias = torch.randn(n) if with_bias else None
    x_q, x_scale, x_zero = fxq.quantize_per_token(x)
    w_q, w_scale = quantize_weight_per_channel(w)
    w_sum = w_q.sum(dim=1, dtype=torch.int32)
    expected = fxq.int8_linear(x_q, x_scale, x_zero, w_q, w_scale, w_sum, bias, torch.float32)
    out = quantized_gemm(x_q, x_scale, x_zero, w_q, w_scale, w_sum, bias, torch.float32)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)  # int32 accumulation: same numbers


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("m,k,n", [(3, 64, 8), (70, 128, 40), (5, 96, 17)])
@pytest.mark.parametrize("unpack_first", [False, True])
def test_packed_weight_gemm_unpacks_exactly(bits, m, k, n, unpack_first):
    """Packed weights unpacked in the GEMM's K loop or by the unpack kernel before it: the same int32 sums."""
    x, w, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    x_q, x_scale, x_zero = fxq.quantize_per_token(x)
    w_q, w_scale = quantize_weight_per_channel(w, bits)
    w_sum = w_q.sum(dim=1, dtype=torch.int32)
    expected = fxq.int8_linear(x_q, x_scale, x_zero, w_q, w_scale, w_sum, bias, torch.float32)
    out = quantized_gemm(x_q, x_scale, x_zero, pack_bits(w_q, bits), w_scale, w_sum, bias, torch.float32, bits,
                         unpack_first=unpack_first)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(fxq.packed_int8_linear(x_q, x_scale, x_zero, pack_bits(w_q, bits), bits, w_scale, w_sum, bias,
                                              torch.float32), expected)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("unpack_first", [False, True])
def test_packed_weight_gemm_against_fp8_activations(bits, unpack_first):
    """fp8 activations against packed integer codes, in the K loop (each code c as the e4m3 value c * 2^-9, rescaled
    in the epilogue) or unpacked first into the codes' e4m3 values: fp8_linear on the codes either way."""
    x, w, bias = torch.randn(70, 128), torch.randn(40, 128), torch.randn(40)
    x_q, x_scale = fxq.quantize_per_token_fp8(x)
    w_q, w_scale = quantize_weight_per_channel(w, bits)
    packed = pack_sign_magnitude(w_q) if bits == 4 else pack_bits(w_q, bits)  # an fp8 layer's layout
    assert torch.equal(fxq.unpack_fp8_codes(packed, bits).float(), w_q.float())
    expected = fxq.fp8_linear(x_q, x_scale, fxq.unpack_fp8_codes(packed, bits), w_scale, bias, torch.float32)
    out = quantized_gemm(x_q, x_scale, None, packed, w_scale, None, bias, torch.float32, bits,
                         unpack_first=unpack_first)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # fp32 sums in another order
    assert torch.equal(fxq.packed_fp8_linear(x_q, x_scale, packed, bits, w_scale, bias, torch.float32), expected)
    assert torch.equal(unpack_weights(packed, bits, dtype=torch.float8_e4m3fn).float(), w_q.float())


@pytest.mark.parametrize("bits,k,group", [(4, 192, 32), (4, 256, 128), (2, 256, 64)])
@pytest.mark.parametrize("m,unpack_first", [(5, False), (70, True), (300, None)])  # (300: the default rule's choice)
@pytest.mark.parametrize("activations", ["int8", "fp8"])
def test_group_wise_packed_gemm_matches_the_reference(bits, k, group, m, unpack_first, activations):
    """Group-wise packed weights (one scale per output channel and run of `group` inputs), unpacked in the K loop or
    first: each K step lies in one group and its product is scaled before it is added; the reference ops sum exact
    per-group products. With a gated residual epilogue too."""
    n = 24
    x, w, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    w_q, w_scale = quantize_weight_groups(w, bits, group)
    assert w_scale.shape == (n, k // group)
    if activations == "int8":
        x_q, x_scale, x_zero = fxq.quantize_per_token(x)
        w_sum = w_q.reshape(n, -1, group).sum(dim=2, dtype=torch.int32)
        packed = pack_bits(w_q, bits)
        expected = fxq.int8_linear(x_q, x_scale, x_zero, w_q, w_scale, w_sum, bias, torch.float32)
        assert torch.equal(fxq.packed_int8_linear(x_q, x_scale, x_zero, packed, bits, w_scale, w_sum, bias,
                                                  torch.float32), expected)
    else:
        (x_q, x_scale), x_zero, w_sum = fxq.quantize_per_token_fp8(x), None, None
        packed = pack_sign_magnitude(w_q) if bits == 4 else pack_bits(w_q, bits)
        expected = fxq.fp8_linear(x_q, x_scale, fxq.unpack_fp8_codes(packed, bits), w_scale, bias, torch.float32)
    dequantized = (w_q.float().reshape(n, -1, group) * w_scale[:, :, None]).reshape(n, k)
    activations_float = x_q.float() if x_zero is None else x_q.float() - x_zero.float()
    assert relative_l2(expected, activations_float * x_scale @ dequantized.t() + bias) < 1e-5  # the grouped sums
    out = quantized_gemm(x_q, x_scale, x_zero, packed, w_scale, w_sum, bias, torch.float32, bits,
                         unpack_first=unpack_first)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)  # fp32 group sums in another order
    residual, gate = torch.randn(1, m, n), torch.randn(1, 1, n)
    gated = quantized_gemm(x_q, x_scale, x_zero, packed, w_scale, w_sum, bias, torch.float32, bits, gate=gate,
                           residual=residual, unpack_first=unpack_first)
    torch.testing.assert_close(gated, residual + gate * expected.reshape(1, m, n), rtol=1e-5, atol=1e-4)


def test_group_steps_stay_inside_one_group():
    """The K loop's step (in values of K) divides the group and a packed field's range: PixArt's 1152 inputs in
    groups of 128 step 128 values (64 packed rows) deep at 4 bits (a field covers 576 values of K: from 512 on, a
    256-deep step would straddle groups 4 and 5)."""
    assert gemm_module.group_step(128, 1152 // 2, 4) == 128
    assert gemm_module.group_step(128, 4608 // 2, 4) == 256
    assert gemm_module.group_step(64, 1152 // 4, 2) == 128


def _run_ptx_bit_ops(asm: str, value: int) -> int:
    """Evaluate the b32 bit-operation PTX of gemm's nibble unpacking ($1 = value) in Python -> $0."""
    registers, mask = {"$1": value}, 0xFFFFFFFF
    ops = {"mov": lambda a: a, "and": lambda a, b: a & b, "or": lambda a, b: a | b, "xor": lambda a, b: a ^ b,
           "add": lambda a, b: a + b, "mul": lambda a, b: a * b, "shr": lambda a, b: a >> b,
           "shl": lambda a, b: a << b}
    for instruction in asm.strip("{} ").split(";"):
        if not instruction.strip() or instruction.strip().startswith(".reg"):
            continue
        opcode, operands = instruction.split(None, 1)
        target, *sources = [operand.strip() for operand in operands.split(",")]
        values = [registers[s] if s in registers else int(s, 0) for s in sources]
        registers[target] = ops[opcode.split(".")[0]](*values) & mask
    return registers["$0"]


def test_ptx_fields_become_e4m3_bytes_of_the_scaled_codes():
    """The GPU-only PTX of the fp8 K loop (never run by the interpreter), evaluated instruction by instruction on
    every byte pack_sign_magnitude makes, in every byte position: field 0 / 1 of the byte, a code c in [-7, 7],
    becomes an e4m3 byte whose value is c * 2^-9 (E4M3_CODE_UNIT), as the interpreter's conversion makes it."""
    from fxquant.backends.triton.gemm import E4M3_CODE_UNIT, FIELD0_E4M3_ASM, FIELD1_E4M3_ASM

    codes = torch.arange(-7, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(codes, codes)  # (field 0, field 1): every byte of the layout
    packed = pack_sign_magnitude(torch.cat([pairs[:, 0], pairs[:, 1]])[None])[0].tolist()  # byte j: pair j
    for field, asm in ((0, FIELD0_E4M3_ASM.value), (1, FIELD1_E4M3_ASM.value)):
        expected = (pairs[:, field].float() * E4M3_CODE_UNIT.value).tolist()
        for shift in (0, 8, 16, 24):
            filler = 0xC5C5C5C5 & ~(0xFF << shift)  # other bytes (signs and magnitudes set) must not disturb this one
            out = [(_run_ptx_bit_ops(asm, filler | byte << shift) >> shift) & 0xFF for byte in packed]
            values = torch.tensor(out, dtype=torch.uint8).view(torch.float8_e4m3fn).float().tolist()
            assert values == expected, (field, shift)


def test_ptx_nibbles_become_int8_codes():
    """The int8 paths' PTX, evaluated on every byte value in every byte position: the unpack kernel's sign-extended
    nibbles (c as int8) and the K loop's top-aligned ones (c * 16 as int8, the epilogue shifts the sums back)."""
    from fxquant.backends.triton.gemm import (HIGH_NIBBLES_ASM, LOW_NIBBLES_ASM, TOP_HIGH_NIBBLES_ASM,
                                              TOP_LOW_NIBBLES_ASM)

    low, high = torch.arange(256) & 15, torch.arange(256) >> 4
    for nibbles, asm, scale in ((low, LOW_NIBBLES_ASM, 1), (high, HIGH_NIBBLES_ASM, 1), (low, TOP_LOW_NIBBLES_ASM, 16),
                                (high, TOP_HIGH_NIBBLES_ASM, 16)):
        expected = ((torch.where(nibbles >= 8, nibbles - 16, nibbles) * scale) & 0xFF).tolist()
        for shift in (0, 8, 16, 24):
            filler = 0xA5A5A5A5 & ~(0xFF << shift)  # other bytes must not disturb this one
            out = [(_run_ptx_bit_ops(asm.value, filler | byte << shift) >> shift) & 0xFF for byte in range(256)]
            assert out == expected, (asm.value, shift)


def test_packed_weights_are_unpacked_first_from_unpack_min_tokens(monkeypatch):
    """The default path: the K loop unpacks below UNPACK_MIN_TOKENS rows (int8 activations; UNPACK_MIN_TOKENS_FP8 for
    fp8), the unpack kernel from there on (group-wise against fp8: up to GROUPED_FP8_UNPACK_MAX_TOKENS)."""
    from fxquant.backends.triton import gemm

    unpacked = []

    def counting_unpack(*args):
        unpacked.append(args)
        return unpack_weights(*args)

    monkeypatch.setattr(gemm, "unpack_weights", counting_unpack)
    w_q, w_scale = quantize_weight_per_channel(torch.randn(16, 64), 4)
    w_sum = w_q.sum(dim=1, dtype=torch.int32)
    for rows, unpacks in ((gemm.UNPACK_MIN_TOKENS - 1, 0), (gemm.UNPACK_MIN_TOKENS, 1)):
        x_q, x_scale, x_zero = fxq.quantize_per_token(torch.randn(rows, 64))
        expected = fxq.int8_linear(x_q, x_scale, x_zero, w_q, w_scale, w_sum, None, torch.float32)
        out = gemm.quantized_gemm(x_q, x_scale, x_zero, pack_bits(w_q, 4), w_scale, w_sum, None, torch.float32, 4)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        assert len(unpacked) == unpacks
    unpacked.clear()  # fp8 activations: the cheaper K loop runs longer (UNPACK_MIN_TOKENS_FP8)
    for rows, unpacks in ((gemm.UNPACK_MIN_TOKENS_FP8 - 1, 0), (gemm.UNPACK_MIN_TOKENS_FP8, 1)):
        x_q, x_scale = fxq.quantize_per_token_fp8(torch.randn(rows, 64))
        expected = fxq.fp8_linear(x_q, x_scale, w_q.to(torch.float16).to(torch.float8_e4m3fn), w_scale, None,
                                  torch.float32)
        out = gemm.quantized_gemm(x_q, x_scale, None, pack_sign_magnitude(w_q), w_scale, None, None, torch.float32, 4)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert len(unpacked) == unpacks
    unpacked.clear()  # group-wise weights against fp8 activations: unpacked first only between the two bounds
    w_q, w_scale = quantize_weight_groups(torch.randn(16, 64), 4, 32)
    for rows, unpacks in ((gemm.UNPACK_MIN_TOKENS - 1, 0), (gemm.UNPACK_MIN_TOKENS, 1),
                          (gemm.GROUPED_FP8_UNPACK_MAX_TOKENS, 1)):
        x_q, x_scale = fxq.quantize_per_token_fp8(torch.randn(rows, 64))
        gemm.quantized_gemm(x_q, x_scale, None, pack_sign_magnitude(w_q), w_scale, None, None, torch.float32, 4)
        assert len(unpacked) == unpacks


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("n,k", [(8, 64), (40, 96), (33, 640)])
def test_unpack_kernel_inverts_pack_bits(bits, n, k):
    w_q, _ = quantize_weight_per_channel(torch.randn(n, k), bits)
    assert torch.equal(unpack_weights(pack_bits(w_q, bits), bits), w_q)
    assert torch.equal(unpack_weights(pack_bits(w_q, bits), bits, traced=True), w_q)
    with pytest.raises(AssertionError, match="packed weights"):
        unpack_weights(w_q, bits)  # int8 codes, not packed bytes


@pytest.mark.parametrize("bits,unpack_first", [(8, None), (4, False), (4, True)])
def test_traced_launch_with_fixed_config_matches(bits, unpack_first):
    """The launch the compile backend traces into Inductor (wrap_triton, fixed tile config) computes the same."""
    x, w = torch.randn(40, 64), torch.randn(24, 64)
    x_q, x_scale, x_zero = fxq.quantize_per_token(x)
    traced_q = quantize_per_token(x, traced=True)
    assert all(torch.equal(a, b) for a, b in zip(traced_q, (x_q, x_scale, x_zero)))
    w_q, w_scale = quantize_weight_per_channel(w, bits)
    w_sum = w_q.sum(dim=1, dtype=torch.int32)
    stored = w_q if bits == 8 else pack_bits(w_q, bits)
    expected = fxq.int8_linear(x_q, x_scale, x_zero, w_q, w_scale, w_sum, None, torch.float32)
    out = quantized_gemm(x_q, x_scale, x_zero, stored, w_scale, w_sum, None, torch.float32, bits, traced=True,
                         unpack_first=unpack_first)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def _linear_operands(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, weights: str):
    """x [M, K], w [N, K] quantized for an epilogue test ("fp8", "int8" or "int4" weights) -> ((x_q, x_scale, x_zero,
    stored weights, weight bits, w_scale, w_sum): the linear ops' arguments, fp32 output of the plain linear op)."""
    if weights == "fp8":
        (x_q, x_scale), x_zero, w_sum, bits = quantize_per_token_fp8(x), None, None, 8
        w_scale = w.abs().amax(dim=1) / 448
        stored = (w / w_scale[:, None]).to(torch.float8_e4m3fn)
        plain = fxq.fp8_linear(x_q, x_scale, stored, w_scale, bias, torch.float32)
    else:
        bits = 8 if weights == "int8" else 4
        x_q, x_scale, x_zero = fxq.quantize_per_token(x)
        w_q, w_scale = quantize_weight_per_channel(w, bits)
        w_sum = w_q.sum(dim=1, dtype=torch.int32)
        stored = w_q if bits == 8 else pack_bits(w_q, bits)
        plain = fxq.int8_linear(x_q, x_scale, x_zero, w_q, w_scale, w_sum, bias, torch.float32)
    return (x_q, x_scale, x_zero, stored, bits, w_scale, w_sum), plain


@pytest.mark.parametrize("weights", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("gated,tokens", [(True, 9), (True, 40), (False, 9)])
def test_gemm_epilogue_applies_gate_and_residual(weights, gated, tokens):
    """residual + gate * linear in the GEMM's epilogue (fxquant::linear_residual): a [B, 1, N] gate sliced from an
    adaLN table, a [B, T, N] residual whose rows are strided (a slice of wider rows). 9 tokens: samples smaller
    than a tile (gate loaded per element); 40: a tile straddles two samples (gate loaded per sample in the tile)."""
    batch, k, n = 2, 64, 24
    x, w, bias = torch.randn(batch * tokens, k), torch.randn(n, k), torch.randn(n)
    residual = torch.randn(batch, tokens, 2 * n)[..., :n]
    gate = _adaln_operands(batch, n)[0] if gated else None
    (x_q, x_scale, x_zero, stored, bits, w_scale, w_sum), plain = _linear_operands(x, w, bias, weights)
    expected = fxq.linear_residual(x_q, x_scale, x_zero, stored, bits, w_scale, w_sum, bias, gate, residual)
    out = quantized_gemm(x_q, x_scale, x_zero, stored, w_scale, w_sum, bias, torch.float32, bits, gate=gate,
                         residual=residual)
    assert out.shape == residual.shape and out.dtype == residual.dtype
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(expected, residual + (1 if gate is None else gate) * plain.reshape(residual.shape))


@pytest.mark.parametrize("weights", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("gated,head,tail", [(True, 5, 11), (True, 7, 32), (False, 7, 32)])
def test_gemm_epilogue_applies_each_token_parts_gate_and_residual(weights, gated, head, tail):
    """residual + gate * linear per token part (fxquant::linear_residual_parts, CogVideoX's text / video rows): each
    sample's first `head` rows go to the head's residual (its rows strided: a slice of wider rows) and gate, the
    rest to the tail's; 16 tokens per sample (fewer than a tile's rows): gates per element; 39: tiles straddle
    samples (gates per sample in the tile); int4: packed weights unpacked in the K loop. The output equals the op's
    reference and the plain linear split by hand."""
    batch, k, n = 2, 64, 24
    x, w, bias = torch.randn(batch * (head + tail), k), torch.randn(n, k), torch.randn(n)
    head_residual, tail_residual = torch.randn(batch, head, 2 * n)[..., :n], torch.randn(batch, tail, n)
    table = _adaln_operands(batch, n) if gated else (None, None)
    (x_q, x_scale, x_zero, stored, bits, w_scale, w_sum), plain = _linear_operands(x, w, bias, weights)
    expected = fxq.linear_residual_parts(x_q, x_scale, x_zero, stored, bits, w_scale, w_sum, bias, table[0],
                                         head_residual, table[1], tail_residual)
    out = quantized_gemm(x_q, x_scale, x_zero, stored, w_scale, w_sum, bias, torch.float32, bits, gate=table[0],
                         residual=head_residual, tail=(table[1], tail_residual))
    plain = plain.reshape(batch, head + tail, n)
    for part, reference, gate, residual, tokens in zip(out, expected, table, (head_residual, tail_residual),
                                                       (slice(0, head), slice(head, None))):
        assert part.shape == residual.shape and part.is_contiguous()
        torch.testing.assert_close(part, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reference, residual + (1 if gate is None else gate) * plain[:, tokens])


@pytest.mark.parametrize("weights,activation", [("fp8", "gelu_tanh"), ("fp8", "silu"), ("int8", "gelu"),
                                                ("int4", "gelu_tanh"), ("fp8", "geglu"), ("int8", "geglu_tanh"),
                                                ("int4", "geglu")])
def test_gemm_epilogue_writes_the_next_linears_codes(weights, activation):
    """quantize(act(linear(x))) in the GEMM's epilogue (fxquant::linear_activation_quantize): fp8 codes with a static
    scale, or asymmetric int8 codes with a static scale and zero point, against the op's reference, which equals
    the unfused ops; GEGLU: the linear's two halves a, g (two products per tile) -> a * gelu(g)."""
    gated = activation.startswith("geglu")
    m, k, n = 40, 64, 48
    x, w, bias = torch.randn(m, k), torch.randn(2 * n if gated else n, k), torch.randn(2 * n if gated else n)
    (x_q, x_scale, x_zero, stored, bits, w_scale, w_sum), plain = _linear_operands(x, w, bias, weights)
    hidden, gate = plain.chunk(2, dim=-1) if gated else (None, plain)
    approximate = "tanh" if activation.endswith("_tanh") else "none"
    hidden = (hidden if gated else 1.0) * (torch.nn.functional.gelu(gate, approximate=approximate)
                                           if activation != "silu" else torch.nn.functional.silu(gate))
    if weights == "fp8":  # a calibrated range a little narrower than this call's: some codes saturate
        out_scale, out_zero = fp8_scale(hidden.abs().max() * 0.9).reshape(1), None
        unfused = fxq.quantize_per_tensor_fp8(hidden, out_scale)
    else:
        out_scale, out_zero = (p.reshape(1) for p in asymmetric_params(hidden.min(), hidden.max() * 0.9))
        unfused = fxq.quantize_per_tensor(hidden, out_scale, out_zero)
    expected = fxq.linear_activation_quantize(x_q, x_scale, x_zero, stored, bits, w_scale, w_sum, bias, activation,
                                              out_scale, out_zero)
    assert torch.equal(expected.float(), unfused.float())
    for traced in (False, True):
        out = quantized_gemm(x_q, x_scale, x_zero, stored, w_scale, w_sum, bias, torch.bfloat16, bits, traced=traced,
                             activation=activation, out_scale=out_scale, out_zero=out_zero)
        assert out.dtype == expected.dtype and out.shape == (m, n)
        if out_zero is None:
            _assert_fp8_codes(out, expected)
        else:  # the kernel's fp32 GELU is an ulp from torch's: a code may sit across a rounding boundary
            codes = (out.int() - expected.int()).abs()
            assert codes.max() <= 1 and (codes > 0).float().mean() < 0.01


@pytest.mark.parametrize("weights,epilogue", [("int8", "bias"), ("fp8", "gate_residual"), ("fp8", "geglu_codes")])
def test_fill_tiles_compute_what_main_tiles_do(monkeypatch, weights, epilogue):
    """Rows past the main tiles' full waves go to smaller fill tiles (FILL_M x FILL_N): on 4 SMs a 70 x 40 output in
    32 x 32 tiles makes 3 x 2 programs, one full wave of 2 row blocks, so rows 64-69 take 16 x 16 fill tiles; the
    output equals one tile size throughout (int8 with zero points; fp8 with a per-sample gate loaded per tile and a
    residual; fp8 GEGLU writing codes)."""
    monkeypatch.setattr(gemm_module, "SM_COUNT", 4)
    m, k, n = 70, 64, 40
    gated = epilogue == "geglu_codes"
    x, w, bias = torch.randn(m, k), torch.randn(2 * n if gated else n, k), torch.randn(2 * n if gated else n)
    operands, _ = _linear_operands(x, w, bias, weights)
    x_q, x_scale, x_zero, stored, bits, w_scale, w_sum = operands
    extra = {}
    if epilogue == "gate_residual":  # 35 tokens per sample: a 32-row tile's rows belong to at most two samples
        extra = dict(gate=_adaln_operands(2, n)[0], residual=torch.randn(2, m // 2, n), gate_per_tile=True)
    elif gated:
        extra = dict(activation="geglu", out_scale=torch.full((1,), 0.05))
    main = gemm_module.get_autotune_config()[0].all_kwargs()
    fill = {**main, "FILL_M": 16, "FILL_N": 16}
    assert gemm_module.fill_main_rows(fill, m, n, 4) == 64 and gemm_module._programs(fill, m, n, 64) == 4 + 3
    outputs = [quantized_gemm(x_q, x_scale, x_zero, stored, w_scale, w_sum, bias, torch.float32, bits, config=config,
                              **extra) for config in (main, fill)]
    assert torch.equal(outputs[0].float(), outputs[1].float())


@pytest.mark.parametrize("keys_major", [False, True])
def test_fill_tiles_store_attention_operand_codes_where_main_tiles_do(monkeypatch, keys_major):
    """An attention operand's codes (split output offsets; V as a transposed product) written with fill tiles: on 4
    SMs the 66-row Q / K product (3 x 2 programs of 32 x 32) and the 64-channel V^T product (2 x 3) cover their last
    rows with 16 x 16 tiles, storing exactly the codes one tile size stores."""
    heads, batch, tokens, head_dim = 2, 2, [33], 32
    parts = [list(operand) for operand in zip(_fp8_linear_operands(batch * tokens[0], 64, heads * head_dim, 8))]
    out_scale = torch.full((1,), 0.02)
    main = attention_operand_gemm(*parts, out_scale, heads, tokens, keys_major)
    tile = gemm_module.get_autotune_config()[0].all_kwargs()
    monkeypatch.setattr(gemm_module, "SM_COUNT", 4)
    monkeypatch.setattr(gemm_module, "_fixed_config", lambda *key: {**tile, "FILL_M": 16, "FILL_N": 16})
    filled = attention_operand_gemm(*parts, out_scale, heads, tokens, keys_major)
    assert torch.equal(filled.float(), main.float()) and main.float().abs().sum() > 0


def test_gpu_tiles_fill_the_sms_where_rows_and_columns_are_both_few(monkeypatch):
    """The traced GEMMs' tile rule (as on the GPU): a problem with few rows and few columns (SD3's 333-token text V
    product, PixArt's 120-key cross-attention V) steps down to smaller tiles until it has a program per SM; large
    problems keep the tiles measured for them."""
    monkeypatch.setattr(gemm_module, "INTERPRET", False)
    for m, n, k in ((1536, 672, 1536), (1152, 256, 1152)):
        wide = gemm_module.fixed_config_for_size(m, n, k, False)
        config = gemm_module.fixed_config(m, n, k, False)
        assert gemm_module._programs(wide, m, n) < gemm_module.SM_COUNT
        assert gemm_module._programs(config, m, n) > gemm_module._programs(wide, m, n)
    pixart_projection = (8192, 1152, 1152, False)
    assert gemm_module.fixed_config(*pixart_projection) == gemm_module.fixed_config_for_size(*pixart_projection)
    assert gemm_module._programs(gemm_module.fixed_config(1536, 672, 1536, False), 1536, 672) >= gemm_module.SM_COUNT


def test_traced_gemm_reads_a_static_scale_in_place(monkeypatch):
    """A traced GEMM (what Inductor gets) whose activations have one static scale reads it with stride 0: no expanded
    [M] copy in the graph, which Inductor would run as a kernel of its own before every such linear."""
    from torch.fx.experimental.proxy_tensor import make_fx

    class Grid:  # the launch itself is not traced here: the glue around it is
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None
    monkeypatch.setattr(gemm_module, "wrap_triton", lambda kernel: Grid())
    m, k, n = 256, 64, 96
    operands = (torch.zeros(m, k, dtype=torch.float8_e4m3fn), torch.ones(1),
                torch.zeros(n, k, dtype=torch.float8_e4m3fn), torch.ones(n), torch.zeros(1, m, n, dtype=torch.bfloat16))
    graph = make_fx(lambda x_q, x_scale, w_q, w_scale, residual: quantized_gemm(
        x_q, x_scale, None, w_q, w_scale, None, None, torch.bfloat16, traced=True, residual=residual),
        tracing_mode="fake")(*operands).graph
    targets = {str(node.target) for node in graph.nodes if node.op == "call_function"}
    assert targets <= {"aten.view.default", "aten.empty.memory_format"}, targets


def test_gpu_tiles_weigh_waves(monkeypatch):
    """Between 128 x 128 and 128 x 256 fp8 tiles, the rule takes the one with less wave time: PixArt's projection (a
    tie: 3 wide waves, 5 narrow) keeps the size rule's wide tile. fp8 GEMMs whose 128 x 128 tiles make one or two
    full waves and a last one at most half full (SDXL's, which took the wide tile before:
    gpu-bench-h100/sdxl-gemm-tiles-s35.json) cover the rows past the full waves in fill tiles, 64 x 64 after one
    wave, 64 x 128 after two, also with a residual epilogue; not int8, GEGLU, packed or few-token GEMMs, nor where
    the last wave is more than half full."""
    monkeypatch.setattr(gemm_module, "INTERPRET", False)
    assert gemm_module.fixed_config(8192, 1152, 1152, False)["BLOCK_N"] == 256
    fill = {shape: tuple(gemm_module.fixed_config(*shape, False, residual=residual).get(key)
                         for key in ("BLOCK_M", "BLOCK_N", "FILL_M", "FILL_N"))
            for shape in ((2048, 1280, 1280), (2048, 1280, 5120), (8192, 640, 640), (8192, 1152, 1152),
                          (2048, 5120, 1280)) for residual in (False, True)}
    assert {shape: tiles for shape, tiles in fill.items() if tiles[2]} == {
        (2048, 1280, 1280): (128, 128, 64, 64), (2048, 1280, 5120): (128, 128, 64, 64),
        (8192, 640, 640): (128, 128, 64, 128)}  # (PixArt: 576 programs; 2048 x 5120: 640, 4.85 waves)
    assert all(fill[shape] == fill[shape[:3]] for shape in fill if len(shape) == 4)
    assert gemm_module.fill_main_rows(gemm_module.fixed_config(2048, 1280, 1280, False), 2048, 1280, 132) == 1664
    for kind in (dict(integer=True), dict(integer=False, gated=True), dict(integer=False, packed=True)):
        assert "FILL_M" not in gemm_module.fixed_config(2048, 1280, 1280, **kind)
    assert "FILL_M" not in gemm_module.fixed_config(512, 1280, 1280, False)


def test_gpu_tiles_at_a_few_hundred_tokens(monkeypatch):
    """Below 1024 tokens (text streams, cross-attention K / V, small images) 8-bit GEMMs take 64-row, 128-deep tiles,
    128 columns wide from N = 3072 on, and 64 x 64 x 256 where K >= 4 N below that, as the H200 sweep measured
    (gpu-bench-h200/few-token-tiles-h200.json); packed weights keep the packed sweeps' tile."""
    monkeypatch.setattr(gemm_module, "INTERPRET", False)
    tile = {shape: tuple(gemm_module.fixed_config(*shape, False)[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            for shape in ((512, 12288, 3072), (512, 3072, 12288), (666, 1536, 6144), (240, 1152, 1152))}
    assert tile == {(512, 12288, 3072): (64, 128, 128), (512, 3072, 12288): (64, 128, 128),
                    (666, 1536, 6144): (64, 64, 256), (240, 1152, 1152): (64, 64, 128)}
    assert gemm_module.fixed_config(256, 1152, 1152, False, packed=True)["BLOCK_K"] == 256


def test_gpu_tiles_fit_the_shared_memory_a_program_may_hold(monkeypatch):
    """On a GPU whose programs may hold less shared memory than an H100's (227 KB; sm_89 cards: 99 KB), the GEMM
    tiles keep their K-loop pipeline within it (fewer stages first, then smaller tiles); with an H100's limits nothing
    changes. The byte count is what Triton allocates for the 8-bit kernels at sm_90 (kernel-ir-sm90.json)."""
    monkeypatch.setattr(gemm_module, "INTERPRET", False)
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results", "kernel-ir-sm90.json")) as f:
        report = json.load(f)["gemm"]
    ir_tile = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_stages=3)
    assert gemm_module.pipeline_bytes(ir_tile) == report["fp8"]["shared_bytes"] == report["int8"]["shared_bytes"]
    assert gemm_module.pipeline_bytes(ir_tile, gated=True) == report["fp8_geglu_codes"]["shared_bytes"]
    h100, sm89 = (132, 232448), (128, 101376)
    stepped_down = 0
    for m, n, k, integer, gated in ((8192, 4608, 1152, False, False), (8192, 1152, 4608, True, False),
                                    (35552, 1920, 1920, False, False), (8192, 5120, 1280, False, True),
                                    (16, 3072, 12288, True, False), (1536, 672, 1536, False, False)):
        default = gemm_module.fixed_config(m, n, k, integer, gated=gated)
        assert gemm_module.fixed_config(m, n, k, integer, gated=gated, limits=h100) == default
        fitted = gemm_module.fixed_config(m, n, k, integer, gated=gated, limits=sm89)
        assert gemm_module.pipeline_bytes(fitted, gated) <= sm89[1] and fitted["num_stages"] >= 2
        stepped_down += fitted != default
    assert stepped_down >= 2  # the wide fp8 tile and the GEGLU one do not fit 99 KB at 3 stages


def test_fp8_quantize_and_gemm_match_float_reference():
    x, w = torch.randn(9, 40), torch.randn(12, 40)
    x_q, x_scale = quantize_per_token_fp8(x)
    assert x_q.dtype == torch.float8_e4m3fn
    assert ((x_q.float() * x_scale - x).norm() / x.norm()) < 0.05  # e4m3: 3 mantissa bits
    w_scale = w.abs().amax(dim=1) / 448
    w_q = (w / w_scale[:, None]).to(torch.float8_e4m3fn)
    out = quantized_gemm(x_q, x_scale, None, w_q, w_scale, None, None, torch.float32)
    expected = (x_q.float() * x_scale) @ (w_q.float() * w_scale[:, None]).t()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_launcher_rejects_bad_input():
    with pytest.raises(AssertionError, match="shapes"):
        quantized_gemm(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2), None, torch.zeros(3, 4, dtype=torch.int8),
                  torch.ones(3), None, None, torch.float32)
    with pytest.raises(AssertionError, match="operand dtypes"):
        quantized_gemm(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2), None, torch.zeros(3, 4, dtype=torch.int8),
                       torch.ones(3), None, None, torch.float32, weight_bits=4)
    with pytest.raises(AssertionError, match="zero point needs"):
        quantized_gemm(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2), torch.zeros(2, dtype=torch.int32),
                  torch.zeros(3, 8, dtype=torch.int8), torch.ones(3), None, None, torch.float32)
    with pytest.raises(AssertionError, match="quantized output takes no residual"):
        quantized_gemm(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2), None, torch.zeros(3, 8, dtype=torch.int8),
                       torch.ones(3), None, None, torch.float32, residual=torch.zeros(2, 3), out_scale=torch.ones(1))
    with pytest.raises(AssertionError, match=r"gated activation needs an even number of weight rows \(3\)"):
        quantized_gemm(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2), None, torch.zeros(3, 8, dtype=torch.int8),
                       torch.ones(3), None, None, torch.float32, activation="geglu")
    with pytest.raises(AssertionError, match=r"residual \(2, 4\) for a \[2, 3\] output"):
        quantized_gemm(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2), None, torch.zeros(3, 8, dtype=torch.int8),
                       torch.ones(3), None, None, torch.float32, residual=torch.zeros(2, 4))
    with pytest.raises(AssertionError, match="config 'autotun'"):  # a tile dict or "autotune"
        quantized_gemm(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2), None, torch.zeros(3, 8, dtype=torch.int8),
                       torch.ones(3), None, None, torch.float32, config="autotun")
    with pytest.raises(AssertionError, match="parts need residuals"):  # token parts: a head residual too
        quantized_gemm(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2), None, torch.zeros(3, 8, dtype=torch.int8),
                       torch.ones(3), None, None, torch.float32, tail=(None, torch.zeros(1, 1, 3)))
    with pytest.raises(AssertionError, match="both parts gated, or neither"):
        quantized_gemm(torch.zeros(2, 8, dtype=torch.int8), torch.ones(2), None, torch.zeros(3, 8, dtype=torch.int8),
                       torch.ones(3), None, None, torch.float32, residual=torch.zeros(1, 1, 3),
                       gate=torch.ones(1, 1, 3), tail=(None, torch.zeros(1, 1, 3)))


@pytest.mark.parametrize("batch,heads,n_q,n_k,head_dim", [(1, 2, 40, 50, 32), (2, 1, 33, 70, 72), (1, 3, 64, 64, 64)])
@pytest.mark.parametrize("attention_format", ["int8", "int8-fp8", "fp8-static"])
def test_attention_kernel_matches_reference(batch, heads, n_q, n_k, head_dim, attention_format):
    """Query / key counts off the tile size, a head dim with a tail (72 = 64 + 8), keys with a shared offset;
    fp8-static: Q, K, V in fp8 with one (here: their own absmax) scale each."""
    q = torch.randn(batch, n_q, heads, head_dim).transpose(1, 2)  # diffusers' layout: heads strided
    k = torch.randn(batch, heads, n_k, head_dim) * 2 + 0.5
    v = torch.randn(batch, n_k, heads, head_dim).transpose(1, 2)
    scale = head_dim**-0.5
    pv_fp8 = attention_format != "int8"
    scales = torch.stack([x.abs().amax() for x in (q, k, v)]) / 448 if attention_format == "fp8-static" else None
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    reference = fxq.quantized_attention(q, k, v, scale, pv_fp8, scales)
    out = quantized_attention(q, k, v, scale, pv_fp8, scales)
    assert out.stride() == torch.empty(batch, n_q, heads, head_dim).transpose(1, 2).stride()
    if pv_fp8:  # P rounds to fp8 against running row maxima (reference: final maxima)
        assert relative_l2(out, reference) < 0.05
        assert relative_l2(out, exact) < relative_l2(reference, exact) + 0.02
    else:  # int8 scores are exact; only the softmax's summation order differs
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
        assert relative_l2(out, exact) < 0.02
    # the formats' own cost on these operands: fp8 Q K^T (3 mantissa bits, one scale per tensor) doubles the error
    assert relative_l2(reference, exact) < {"int8": 0.02, "int8-fp8": 0.04, "fp8-static": 0.07}[attention_format]
    traced = quantized_attention(q, k, v, scale, pv_fp8, scales, traced=True)
    assert torch.equal(traced, out)


def _counting_runs(monkeypatch, autotuner) -> list:
    """Record every launch through a Triton autotuner (its run method) in the list returned."""
    runs, run = [], autotuner.run
    monkeypatch.setattr(autotuner, "run", lambda *args, **kwargs: runs.append(1) or run(*args, **kwargs))
    return runs


def test_launches_autotune_only_an_attention_problem_first_met(monkeypatch):
    """No autotuning at a model's first call beyond one per attention problem: an eager attention launch autotunes
    the first time it meets a problem (sizes, format, dtype) and every later launch of it, eager or traced, codes out
    or not, takes the winner; GEMM launches take the backend's fixed tile, the autotuner only on request
    (benchmarks), with the same exact int8 result."""
    attention_runs = _counting_runs(monkeypatch, attention_module._attention_kernel)
    monkeypatch.setattr(attention_module, "_TUNED", {})
    q, k, v = (torch.randn(1, 2, 40, 32) for _ in range(3))
    scales = torch.stack([x.abs().amax() for x in (q, k, v)]) / 448
    first = quantized_attention(q, k, v, 0.2, True, scales)
    again, traced = quantized_attention(q, k, v, 0.2, True, scales), quantized_attention(q, k, v, 0.2, True, scales,
                                                                                          traced=True)
    quantized_attention(q, k, v, 0.2, True, scales, out_scale=torch.tensor([0.01]))
    assert len(attention_runs) == 1 and len(attention_module._TUNED) == 1
    assert torch.equal(first, again) and torch.equal(first, traced)

    gemm_runs = _counting_runs(monkeypatch, gemm_module._autotuned_gemm_kernel)
    x_q, x_scale, x_zero = fxq.quantize_per_token(torch.randn(40, 64))
    w_q, w_scale = quantize_weight_per_channel(torch.randn(24, 64), 8)
    w_sum = w_q.sum(dim=1, dtype=torch.int32)
    fixed = quantized_gemm(x_q, x_scale, x_zero, w_q, w_scale, w_sum, None, torch.float32)
    assert not gemm_runs
    tuned = quantized_gemm(x_q, x_scale, x_zero, w_q, w_scale, w_sum, None, torch.float32, config="autotune")
    assert len(gemm_runs) == 1 and torch.equal(fixed, tuned)


@pytest.mark.parametrize("head_dim", [32, 72])
def test_attention_kernel_writes_static_fp8_codes(head_dim):
    """fxquant::quantized_attention_codes: the kernel stores the output as fp8 codes of a static scale (the output
    projection's calibrated input scale), heads last like the float output and the reference op; saturated at
    +-448."""
    q, k, v = (torch.randn(2, 2, n, head_dim) for n in (40, 50, 50))
    scales = torch.stack([x.abs().amax() for x in (q, k, v)]) / 448
    out_scale = torch.tensor([0.5 / 448])  # below the output's absmax: the largest values saturate
    out = quantized_attention(q, k, v, head_dim**-0.5, True, scales)
    codes = quantized_attention(q, k, v, head_dim**-0.5, True, scales, out_scale=out_scale)
    reference = fxq.quantized_attention_codes(q, k, v, head_dim**-0.5, True, scales, out_scale)
    assert codes.dtype == reference.dtype == torch.float8_e4m3fn
    assert codes.stride() == reference.stride() == out.stride()
    assert codes.float().abs().max() == 448 and (out.abs() > 0.5).any()
    _assert_fp8_codes(codes, _e4m3(out / out_scale))  # (the float output against the reference: the test above)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modulation_table_kernel_matches_the_op(dtype):
    """fxquant::modulation_table's kernel (PixArt's adaLN-single table: a [1, G, C] parameter + the timestep
    embedding seen as [B, G, C], 1 added to two groups) computes the op's PyTorch body: fp32 bit for bit; bf16 with
    its two roundings in the same places (the sum, then 1 + it), which the interpreter does by truncation where the
    GPU rounds to nearest, as PyTorch does; launched eagerly and traced."""
    batch, groups, width = 3, 6, 40
    table = (torch.randn(groups, width) * 0.1).to(dtype)[None]
    embedding = torch.randn(batch, groups * width).to(dtype).reshape(batch, groups, -1)
    expected = fxq.modulation_table(table, embedding, [1, 4])
    assert torch.equal(expected[:, 1], 1 + (table + embedding)[:, 1]) and torch.equal(expected[:, 0],
                                                                                      (table + embedding)[:, 0])
    if dtype == torch.bfloat16:  # the interpreter's fp32 -> bf16 cast drops the low 16 bits
        def rounded(x):
            return (x.float().view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)

        ones = torch.zeros(groups, 1)
        ones[[1, 4]] = 1
        expected = rounded(rounded(table.float() + embedding.float()).float() + ones)
    for traced in (False, True):
        for operands in ((table, embedding), (embedding, table)):  # the broadcast operand on either side
            out = modulation_table(*operands, [1, 4], traced=traced)
            assert out.dtype == dtype and out.shape == (batch, groups, width) and torch.equal(out, expected)


def _fp8_linear_operands(tokens: int, k: int, n: int, weight_bits: int = 8):
    """(x_q, x_scale, w_q, w_scale, bias) of an fp8 linear with per-token activations; weight_bits 4 / 2: w_q holds
    4-bit codes in [-7, 7] / 2-bit codes in [-2, 1] packed as an fp8 layer keeps them (`w4a8-fp8`, MixDQ's fp8
    mixed precision)."""
    x_q, x_scale = quantize_per_token_fp8(torch.randn(tokens, k))
    w = torch.randn(n, k)
    if weight_bits != 8:
        w_scale = w.abs().amax(dim=1) / (7 if weight_bits == 4 else 2)
        codes = torch.round(w / w_scale[:, None]).clamp(-2 ** (weight_bits - 1), 2 ** (weight_bits - 1) - 1)
        codes = codes.to(torch.int8)
        packed = pack_sign_magnitude(codes) if weight_bits == 4 else pack_bits(codes, weight_bits)
        return x_q, x_scale, packed, w_scale, torch.randn(n)
    w_scale = w.abs().amax(dim=1) / 448
    return x_q, x_scale, (w / w_scale[:, None]).to(torch.float8_e4m3fn), w_scale, torch.randn(n)


@pytest.mark.parametrize("head_dim,tokens,weight_bits", [(40, [24], 8), (32, [33], 8), (40, [32, 7], 8),
                                                         (40, [24], 4), (32, [33, 7], 4), (32, [24], 2)])
@pytest.mark.parametrize("keys_major", [False, True])
def test_gemm_epilogue_stores_attention_operand_codes(head_dim, tokens, weight_bits, keys_major):
    """fxquant::linear_attention_operand: the GEMM's epilogue writes the fp8 codes at each element's place in the
    attention operand's layout (Q / K heads first; V keys-major, as a transposed product with the bias per row), a
    head dim with a tail (40 -> 32 + 32), token counts off the tiles and off the 16-key alignment, and two parts
    (a joint attention's image and text tokens) one after the other; with 4- and 2-bit packed weights (`w4a8-fp8`)
    too, unpacked in the K loop (Q / K) or before the transposed product (V)."""
    heads, batch = 2, 2
    linears = [_fp8_linear_operands(batch * count, 64 - 16 * index, heads * head_dim, weight_bits)
               for index, count in enumerate(tokens)]
    plain = [(x_q, x_scale, unpack_fp8_layer_e4m3(w_q, weight_bits) if weight_bits != 8 else w_q, *rest)
             for x_q, x_scale, w_q, *rest in linears]
    outs = [fxq.fp8_linear(*linear, torch.float32).view(batch, count, heads, head_dim).transpose(1, 2)
            for linear, count in zip(plain, tokens)]
    exact = torch.cat(outs, dim=2)
    out_scale = (exact.abs().max() * 0.9 / 448).reshape(1)  # some codes saturate
    exact = exact / out_scale
    parts = [list(operand) for operand in zip(*linears)]
    expected = fxq.linear_attention_operand(*parts, out_scale, heads, tokens, keys_major, "none", [None] * len(tokens),
                                            [None] * len(tokens), 0.0, [], weight_bits)
    launched = [attention_operand_gemm(*parts, out_scale, heads, tokens, keys_major, weight_bits=weight_bits,
                                       traced=traced) for traced in (False, True)]
    for codes in (expected, *launched):
        assert codes.shape == expected.shape and codes.dtype == torch.float8_e4m3fn
        valid = codes[:, :, :head_dim, :sum(tokens)].transpose(-1, -2) if keys_major else codes[..., :head_dim]
        _assert_fp8_codes(valid, _e4m3(exact))


@pytest.mark.parametrize("head_dim,tokens,norm,norms,rope", [
    (32, [24], "rms", [True], True), (16, [20, 9], "rms", [True, True], True),
    (32, [20, 9], "rms", [False, True], True), (16, [24], "layer", [True], False),
    (32, [20, 9], "layer", [True, True], True)])
def test_gemm_epilogue_normalises_and_rotates_heads(head_dim, tokens, norm, norms, rope):
    """Flux's / CogVideoX's q / k (linear_attention_operand with a head norm and rope): each part's heads normalised
    (RMSNorm, or LayerNorm with a bias) with the part's own affine (or not), the joint tokens rotated by the tables'
    row of their position (or not), then stored as fp8 codes in the attention operand's layout, by the GEMM's
    epilogue (a tile of one head, or of two); against the float computation in PyTorch."""
    heads, batch, eps = 2, 2, 1e-6
    linears = [_fp8_linear_operands(batch * count, 64, heads * head_dim) for count in tokens]
    weights = [torch.rand(head_dim) + 0.5 if wanted else None for wanted in norms]
    biases = [torch.randn(head_dim) if wanted and norm == "layer" else None for wanted in norms]
    angles = torch.rand(sum(tokens), head_dim // 2) * 6
    tables = [angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)] if rope else []
    outs = [fxq.fp8_linear(*linear, torch.float32).view(batch, count, heads, head_dim)
            for linear, count in zip(linears, tokens)]
    for index, (out, weight, bias) in enumerate(zip(outs, weights, biases)):
        centred = out - out.mean(-1, keepdim=True) if norm == "layer" else out
        if weight is not None:
            outs[index] = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * weight + (
                0 if bias is None else bias)
    exact = torch.cat(outs, dim=1)  # [B, N, H, D], as Flux's processor concatenates
    if rope:
        real, imaginary = exact[..., 0::2], exact[..., 1::2]
        exact = exact * tables[0][:, None] + torch.stack([-imaginary, real], dim=-1).flatten(-2) * tables[1][:, None]
    exact = exact.transpose(1, 2)
    out_scale = (exact.abs().max() * 0.9 / 448).reshape(1)
    parts = [list(operand) for operand in zip(*linears)]
    transforms = (norm, weights, biases, eps, tables)
    _assert_fp8_codes(fxq.linear_attention_operand(*parts, out_scale, heads, tokens, False, *transforms),
                      _e4m3(exact / out_scale))
    for traced in (False, True):
        codes = attention_operand_gemm(*parts, out_scale, heads, tokens, False, *transforms, traced=traced)
        _assert_fp8_codes(codes, _e4m3(exact / out_scale))


@pytest.mark.parametrize("head_dim", [32, 72])
def test_attention_kernel_on_laid_out_codes_masks_unwritten_padding(head_dim):
    """fxquant::attention_fp8_codes: Q, K, V laid out by the GEMM epilogues, whose padding channels / keys hold
    anything (here NaN codes): the kernel masks them, computing exactly what it computes on zero-padded operands
    (quantized_attention, checked against the reference above), in float and as output codes."""
    batch, heads, n_q, n_k = 2, 2, 40, 50
    q, k, v = (torch.randn(batch, heads, n, head_dim) for n in (n_q, n_k, n_k))
    scales = torch.stack([x.abs().amax() for x in (q, k, v)]) / 448
    laid_out = []
    for x, scale, keys_major in ((q, scales[0], False), (k, scales[1], False), (v, scales[2], True)):
        codes = fxq.attention_operand_fp8(x, scale, keys_major)
        garbage = torch.full_like(codes.view(torch.uint8), 0x7F).view(torch.float8_e4m3fn)  # e4m3fn NaN
        valid = (..., slice(head_dim), slice(n_k)) if keys_major else (..., slice(head_dim))
        garbage[valid] = codes[valid]
        laid_out.append(garbage)
    expected = fxq.attention_fp8_codes(*laid_out, head_dim, head_dim**-0.5, scales, torch.float32)
    reference = fxq.quantized_attention(q, k, v, head_dim**-0.5, True, scales)
    assert torch.equal(expected, reference)
    out_scale = torch.tensor([0.5 / 448])
    zero_padded = quantized_attention(q, k, v, head_dim**-0.5, True, scales)
    zero_padded_codes = quantized_attention(q, k, v, head_dim**-0.5, True, scales, out_scale=out_scale)
    for traced in (False, True):
        out = attention_fp8_codes(*laid_out, head_dim, head_dim**-0.5, scales, torch.float32, traced=traced)
        assert out.stride() == reference.stride() and torch.equal(out, zero_padded)
        codes = attention_fp8_codes(*laid_out, head_dim, head_dim**-0.5, scales, torch.float32, out_scale,
                                    traced=traced)
        assert torch.equal(codes.view(torch.uint8), zero_padded_codes.view(torch.uint8))
    # off a Hopper GPU (here: the interpreter) the Gluon launcher refuses the operands, and the Gluon op's launcher
    # hands the call to the Triton kernel
    assert not attention_hopper.supported(laid_out[0], head_dim)
    with pytest.raises(ValueError, match="runs on Hopper GPUs at head dims 32 to 256"):
        attention_hopper.attention_fp8_codes(*laid_out, head_dim, head_dim**-0.5, scales, torch.float32)
    codes = attention_hopper.attention_fp8_codes_or_triton(*laid_out, head_dim, head_dim**-0.5, scales, torch.float32,
                                                           out_scale)
    assert torch.equal(codes.view(torch.uint8), zero_padded_codes.view(torch.uint8))


@pytest.mark.parametrize("head_dim", [64, 72, 40])
def test_gluon_attention_descriptors_never_reach_the_padding(head_dim):
    """The Gluon kernel's TMA descriptors over laid-out operands: Q / K end at the head dim (their padding channels,
    which GEMM epilogues leave unwritten, are zero-filled by the TMA unit, not read) with the stored row stride; V ends
    at the last key (its padding keys likewise), each head's V rows starting at its stored channel count; tiles in
    the Triton kernel's split of the head dim (PixArt's 72: 64-wide main tiles, 32-wide Q / K tails, V's 16-row tail;
    a power of two: the main descriptors stand in for the tails)."""
    batch, heads, n_q, n_k = 2, 3, 100, 77
    padded, value_rows = padded_head_dim(head_dim), padded_head_dim(head_dim, value=True)
    codes = [torch.zeros(batch, heads, n, padded, dtype=torch.float8_e4m3fn) for n in (n_q, n_k)]
    v = torch.zeros(batch, heads, value_rows, 80, dtype=torch.float8_e4m3fn)  # 77 keys padded to 80
    out = torch.empty(batch, n_q, heads, head_dim, dtype=torch.bfloat16).transpose(1, 2)
    args = attention_hopper.kernel_arguments(*codes, v, head_dim, torch.ones(3), out, 0.125, None, 0, 128, 64)
    q_desc, q_tail, k_desc, k_tail, v_desc, v_tail = args[:6]
    main, tail, value_tail = {64: (64, 64, 64), 72: (64, 32, 16), 40: (32, 32, 16)}[head_dim]
    for desc, rows, block in ((q_desc, n_q, [128, main]), (q_tail, n_q, [128, tail]), (k_desc, n_k, [64, main]),
                              (k_tail, n_k, [64, tail])):
        assert (desc.shape, desc.strides, desc.block_shape) == ([batch * heads * rows, head_dim], [padded, 1], block)
    for desc, block in ((v_desc, [main, 64]), (v_tail, [value_tail, 64])):
        assert (desc.shape, desc.strides, desc.block_shape) == ([batch * heads * value_rows, n_k], [80, 1], block)
    if head_dim != main:  # main and tail tiles cover the stored widths exactly
        assert (main + tail, main + value_tail) == (padded, value_rows)
    assert args[9:13] == (n_q, n_k, heads, value_rows)


@pytest.mark.parametrize("batch,channels,size,out_channels,kernel,stride,padding,dilation,with_bias", [
    (2, 16, (9, 7), 24, 3, 1, 1, 1, True),  # SDXL's 3 x 3 "same" convolutions, positions off the tile
    (1, 40, (8, 8), 8, 3, 2, 1, 1, False),  # a strided downsampler, channels off the K step
    (2, 32, (6, 5), 40, 1, 1, 0, 1, True),  # a 1 x 1 shortcut
    (1, 16, (10, 10), 16, 3, 1, 2, 2, True)])  # dilated
@pytest.mark.parametrize("static", [True, False])
def test_conv_kernel_is_exact(batch, channels, size, out_channels, kernel, stride, padding, dilation, with_bias,
                              static):
    """The implicit-GEMM conv equals fxquant::int8_conv2d's im2col reference bit for bit (exact int32 sums, the same
    quantization and dequantisation order): static activations (channels-last codes; padding taps load the zero
    point's code) and dynamic ones (a scale per patch from pooled pixel ranges, the float input quantized in the K
    loop). Weights stored channels-last (as QuantConv2d keeps them) or not."""
    x = torch.randn(batch, channels, *size) + 0.3
    w_q, w_scale = quantize_weight_per_channel(torch.randn(out_channels, channels, kernel, kernel))
    w_sum = w_q.reshape(out_channels, -1).sum(dim=1, dtype=torch.int32)
    scale, zero = (p.reshape(1) for p in asymmetric_params(x.min(), x.max() * 0.8)) if static else (None, None)
    bias = torch.randn(out_channels) if with_bias else None
    args = (scale, zero, w_q, w_scale, w_sum, bias, [stride] * 2, [padding] * 2, [dilation] * 2)
    expected = fxq.int8_conv2d(x, *args)
    for weights in (w_q, w_q.contiguous(memory_format=torch.channels_last)):
        for traced in (False, True):
            out = quantized_conv2d(x, scale, zero, weights, *args[3:], traced=traced)
            assert out.is_contiguous() and torch.equal(out, expected)


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0)])
def test_conv_kernel_on_fp8_codes(stride, padding):
    """fxquant::fp8_conv2d on the implicit-GEMM kernel: float8 e4m3 codes of x (one static scale; the padding reads
    code 0) against fp8 weights (per-channel scales, stored channels-last or not), fp32 sums: equal to the op's
    reference (a float convolution of the codes) to float rounding."""
    x, w = torch.randn(2, 40, 9, 7), torch.randn(24, 40, 3, 3) * 0.1
    x_scale = fp8_scale(x.abs().amax()).reshape(1)
    w_scale = fp8_scale(w.abs().amax(dim=(1, 2, 3)))
    w_q = quantize_fp8_with_scale(w, w_scale[:, None, None, None])
    bias = torch.randn(24)
    geometry = ([stride] * 2, [padding] * 2, [1, 1])
    expected = fxq.fp8_conv2d(x, x_scale, w_q, w_scale, bias, *geometry)
    for weights in (w_q, w_q.contiguous(memory_format=torch.channels_last)):
        for traced in (False, True):
            out = quantized_conv2d(x, x_scale, None, weights, w_scale, None, bias, *geometry, traced=traced)
            assert out.is_contiguous() and relative_l2(out, expected) < 1e-6


@pytest.mark.parametrize("traced", [False, True])
def test_attention_kernel_writes_codes_of_two_scales_split_at_a_query(traced):
    """A joint attention's output codes for two projections: queries before out_split take the first static scale,
    the rest the second (fxquant::quantized_attention_codes with out_split), heads last."""
    q, k, v = (torch.randn(2, 2, n, 64) for n in (40, 50, 50))
    scales = torch.stack([x.abs().amax() for x in (q, k, v)]) / 448
    out_scale, split = torch.tensor([0.5 / 448, 0.2 / 448]), 17
    out = quantized_attention(q, k, v, 0.125, True, scales)
    codes = quantized_attention(q, k, v, 0.125, True, scales, traced=traced, out_scale=out_scale, out_split=split)
    reference = fxq.quantized_attention_codes(q, k, v, 0.125, True, scales, out_scale, split)
    assert codes.stride() == reference.stride() == out.stride()
    _assert_fp8_codes(codes[:, :, :split], _e4m3(out[:, :, :split] / out_scale[0]))
    _assert_fp8_codes(codes[:, :, split:], _e4m3(out[:, :, split:] / out_scale[1]))
    float_reference = fxq.quantized_attention(q, k, v, 0.125, True, scales)  # the op: each range its own scale
    for rows, part_scale in ((slice(0, split), out_scale[:1]), (slice(split, None), out_scale[1:])):
        expected = fxq.quantize_per_tensor_fp8(float_reference[:, :, rows], part_scale)
        assert torch.equal(reference[:, :, rows].float(), expected.float())


def test_inductor_sees_only_outputs_written():
    """Inductor copies every kernel argument that torch's TTIR analysis reports written before a traced launch: only
    the outputs may be (a helper returning several values made x look written, costing a copy per quantization)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "inductor_access.py")
    report = json.loads(subprocess.run([sys.executable, script], env=env, check=True, capture_output=True,
                                       text=True).stdout.strip().splitlines()[-1])
    written = report["written"]
    assert written == {"quantize_int8": ["q_ptr", "scale_ptr", "zero_ptr"], "quantize_norm_adaln_fp8": ["q_ptr",
                       "scale_ptr"], "quantize_geglu": ["q_ptr", "scale_ptr", "zero_ptr"],
                       "quantize_concat_fp8": ["q_ptr", "scale_ptr"], "gemm_int8": ["out_ptr"],
                       "gemm_w4a8_fp8": ["out_ptr"],
                       "gemm_fp8_gate_residual": ["out_ptr"], "gemm_fp8_fill_tiles": ["out_ptr"],
                       "gemm_fp8_gate_per_tile": ["out_ptr"],
                       "gemm_fp8_residual_parts": ["out_ptr", "tail_out_ptr"],
                       "gemm_fp8_gelu_quantize": ["out_ptr"], "gemm_fp8_attention_operand": ["out_ptr"],
                       "attention_fp8_laid_out": ["out_ptr"], "attention_fp8": ["out_ptr"], "conv_int8": ["out_ptr"],
                       "conv_int8_per_patch": ["out_ptr"], "conv_fp8": ["out_ptr"]}
    # fxquant's memo of that analysis (backends/triton/access_analysis.py): the same answers, one TTIR compile per
    # specialization however many launches share it
    assert report["memoized"] == written and report["generations"] == len(written)


def test_gpu_only_ptx_assembles_for_hopper(tmp_path):
    """The GPU path's inline PTX (nibble unpacking in the W4A8 K loop, the hardware tanh in GELU / SiLU epilogues)
    never runs under the CPU interpreter: compile the kernels for sm_90 without a GPU (benchmarks/kernel_ir.py, which
    runs ptxas; Python floats typed fp64 as Inductor's traced launches pass them) and check that the PTX holds those
    instructions and assembles."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "kernel_ir.py")
    subprocess.run([sys.executable, script, "--out", str(tmp_path / "ir.json")], env=env, check=True,
                   capture_output=True)
    reports = json.loads((tmp_path / "ir.json").read_text())
    gemm = reports["gemm"]
    assert all(report["cubin_bytes"] > 0 for report in gemm.values())
    # a kernel with fill tiles holds both tiles' code but one tile's shared memory (its K loop's buffers are reused)
    assert gemm["fp8_fill_64x64"]["shared_bytes"] == gemm["fp8"]["shared_bytes"]
    assert reports["attention"]["d72_fp8_pv_fp8_codes"]["cubin_bytes"] > 0  # the attention writing fp8 codes
    assert reports["attention"]["d72_fp8_pv_fp8_codes_static_raw_tail"]["cubin_bytes"] > 0  # laid-out operands
    assert reports["attention"]["d64_fp8_pv_fp8_split_codes_static_raw_tail"]["cubin_bytes"] > 0  # two scales
    # one special-function exponential per score element a thread holds (128 x 128 tile, 256 threads), in the full
    # and the masked copy of the tile step, plus the rows' rescales
    exponentials = reports["attention"]["d64_fp8_pv_fp8_codes_static_raw_tail"]["sass_mufu_ex2"]
    assert 2 * 128 * 128 // 256 < exponentials <= 2 * 128 * 128 // 256 + 8
    assert gemm["fp8_attention_operand"]["cubin_bytes"] > 0  # the GEMM storing them
    # the Gluon attention kernel: every config assembles, with a wait that leaves the P V MMAs in flight (pendings 1,
    # 2 with a head-dim tail: the Triton kernel cannot express it) and without ptxas serializing the MMAs (it does when
    # an output is read after such a wait while an MMA issued before the loop's back edge runs); one exponential per
    # score element a thread holds in each of the softmax's three copies (first tile, loop, last tile), plus rescales
    hopper = reports["hopper_attention"]
    assert all(report["cubin_bytes"] > 0 and not report["serialized"] for report in hopper.values())
    assert all(max(report["wgmma_wait_pendings"]) == (2 if label.startswith("d72") else 1)
               for label, report in hopper.items())
    assert 3 * 128 * 128 // 256 < hopper["d64_128x128_8w_3s"]["sass_mufu_ex2"] <= 3 * (128 * 128 // 256 + 8)
    assert reports["conv"]["conv3x3_int8"]["ptx_wgmma"] > 0  # the implicit-GEMM conv on the tensor cores
    assert reports["conv"]["conv3x3_int8_per_patch"]["ptx_wgmma"] > 0
    assert reports["conv"]["conv3x3_fp8"]["ptx_wgmma"] > 0
    assert gemm["w4a8"]["ptx_top_nibble_masks"] > 0 and gemm["w2a8"]["ptx_top_nibble_masks"] == 0
    assert gemm["w4a8_fp8"]["ptx_e4m3_field_masks"] > 0 and gemm["w4a8_fp8"]["ptx_wgmma"] > 0  # e4m3 codes, fp8 MMA
    assert gemm["w4a8_group128"]["ptx_wgmma"] > 0 and gemm["w4a8_fp8_group128"]["ptx_wgmma"] > 0  # group-wise scales
    assert gemm["fp8_gelu_codes"]["ptx_tanh_approx"] > 0 and gemm["fp8_gelu_codes"]["ptx_exp2"] == 0
    assert all(report["cubin_bytes"] > 0 for report in reports["quantize"].values())  # incl. the concat prologue
    # ptxas's register / spill report is read for every kernel (occupancy: 65536 registers per SM)
    assert all(0 < report["registers"] <= 255 and report["spill_bytes"] >= 0
               for section in ("gemm", "attention", "hopper_attention", "conv", "quantize")
               for report in reports[section].values())


def test_every_inlined_kernel_also_runs_as_a_cuda_op():
    """`fxquant.inline_kernels=False` leaves fxquant's ops opaque: each op the backend can trace into Inductor must
    then find a Triton-backed CUDA kernel, not its float reference body (the GELU-quantize epilogue once ran its
    reference there: PixArt 94 ms instead of ~28 ms)."""
    from fxquant.backends.triton import cuda_ops  # noqa: F401  (registers the CUDA kernels; no GPU needed)
    from fxquant.backends.triton.backend import _KERNELS

    missing = [op.name() for op in _KERNELS if not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")]
    assert not missing
    unpacking = (fxq.unpack_int4, fxq.unpack_int2, fxq.unpack_fp8_codes)  # eager calls: the unpack kernel
    assert all(torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CUDA") for op in unpacking)

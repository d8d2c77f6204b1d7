"""Quantizer math shared by passes, ops and backends: integer grids, scales and zero points.

Weights use symmetric grids without -2^(b-1) (int8 weights lie in [-127, 127]; scale = absmax / 127).
Activations use asymmetric int8 (ViDiT-Q's min-max quantizer): x ~ scale * (q - zero), q in [-128, 127], the
range always covering 0, so post-SiLU / post-GELU inputs use the whole grid. The integer matmul then subtracts
zero * sum(w_q) per output channel, an exact correction.
The fp8 format (e4m3) is symmetric for both: scale = absmax / 448 per output channel (weights), per token, or per
tensor from the calibrated range (static activations).
"""

from __future__ import annotations

import math

import torch

SCALE_EPS = 1e-8  # smallest scale: an all-zero row quantizes to zeros instead of dividing by zero
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def qmax(bits: int) -> int:
    """Largest magnitude of a symmetric `bits`-bit grid (127 for 8 bits)."""
    return 2 ** (bits - 1) - 1


def absmax_scale(absmax: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """absmax (any shape) -> fp32 scale of the same shape, never below SCALE_EPS."""
    return (absmax.float() / qmax(bits)).clamp_min(SCALE_EPS)


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Round x / scale to the symmetric grid; returns int8 (scale broadcasts against x)."""
    limit = qmax(bits)
    return torch.clamp(torch.round(x.float() / scale), -limit, limit).to(torch.int8)


def divide(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """x / divisor, correctly rounded on every device (as fxquant's kernels divide). CUDA torch turns a division
    by a Python number into a multiply by its reciprocal, one ulp off in places: a scale one ulp off moves codes."""
    return x / torch.full_like(x, divisor) if x.is_cuda else x / divisor


def asymmetric_params(lo: torch.Tensor, hi: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Range [lo, hi] (extended to cover 0) -> (fp32 scale, int32 zero point) of an asymmetric signed grid."""
    lo = lo.float().clamp(max=0)
    hi = hi.float().clamp(min=0)
    levels = 2**bits - 1
    scale = divide(hi - lo, levels).clamp_min(SCALE_EPS)
    zero = torch.round(-(2 ** (bits - 1)) - lo / scale).to(torch.int32)
    return scale, zero


def asymmetric_range(scale: float, zero: int, bits: int = 8) -> tuple[float, float]:
    """Inverse of asymmetric_params: the range [lo, hi] a (scale, zero) pair covers (lo exact to half a step)."""
    lo = scale * (-(2 ** (bits - 1)) - zero)
    return lo, lo + scale * (2**bits - 1)


def quantize_asymmetric(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """x -> int8 q = clamp(round(x * (1 / scale)) + zero) (scale and zero broadcast against x).

    The reciprocal is taken once per scale and multiplied in (one correctly rounded fp32 multiply per element),
    which kernels reproduce bit for bit; round is half-to-even."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x.float() * scale.reciprocal()) + zero, low, high).to(torch.int8)


def quantize_weight_per_channel(weight: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, ...] -> (int8 [N, ...], fp32 scale [N]) with one symmetric scale per output channel.

    8 and 4 bits: the grid [-qmax, qmax], scale = absmax / qmax. 2 bits: [-1, 1] wastes a quarter of the grid and
    rounds most weights to 0, so the full grid [-2, 1] is used with the per-channel scale that minimises the
    squared error over clipping ratios (absmax * r / 2, r in [0.3, 1])."""
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    if bits != 2:
        scale = absmax_scale(flat.abs().amax(dim=1), bits)
        return quantize_with_scale(flat, scale[:, None], bits).reshape(weight.shape), scale
    absmax = flat.abs().amax(dim=1, keepdim=True)
    best_scale, best_error = None, None
    for ratio in torch.linspace(0.3, 1.0, 15).tolist():
        scale = (absmax * ratio / 2).clamp_min(SCALE_EPS)
        error = (torch.clamp(torch.round(flat / scale), -2, 1) * scale - flat).pow(2).sum(dim=1, keepdim=True)
        better = error < best_error if best_error is not None else torch.ones_like(error, dtype=torch.bool)
        best_scale = scale if best_scale is None else torch.where(better, scale, best_scale)
        best_error = error if best_error is None else torch.minimum(error, best_error)
    q = torch.clamp(torch.round(flat / best_scale), -2, 1).to(torch.int8)
    return q.reshape(weight.shape), best_scale.reshape(-1)


def dequantize_weight_per_channel(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize_weight_per_channel (for references and tests)."""
    shape = (-1,) + (1,) * (q.dim() - 1)
    return (q.float() * scale.reshape(shape)).to(dtype)


# packed K loops step through each field's contiguous range of K in whole groups: a step is at least this deep
MIN_GROUP_STEP = 32


def groupable(in_features: int, bits: int, group_size: int) -> bool:
    """Whether a linear of `in_features` inputs takes `bits`-bit weights with one scale per `group_size` inputs:
    whole groups, and a packed field's range of K (in_features / (8 / bits) values) made of MIN_GROUP_STEP-deep
    steps that never straddle a group (so a GEMM's K loop scales each step's partial product by one group's
    scales)."""
    step = math.gcd(group_size, in_features * bits // 8)
    return bits in (4, 2) and in_features % group_size == 0 and step % MIN_GROUP_STEP == 0


def quantize_weight_groups(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (int8 codes [N, K], fp32 scales [N, K / group_size]): one symmetric scale per output channel
    and run of group_size inputs (quantize_weight_per_channel applied to each group: absmax / qmax at 4 bits, the
    fitted clipping of the grid [-2, 1] at 2)."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"{in_features} inputs do not split into groups of {group_size}")
    codes, scale = quantize_weight_per_channel(weight.detach().float().reshape(-1, group_size), bits)
    return codes.reshape(out_features, in_features), scale.reshape(out_features, in_features // group_size)


def scale_groups(scale: torch.Tensor) -> int:
    """How many groups of inputs per-output-channel weight scales split K into: G for [N, G] with G > 1, else 0 (per
    channel: [N], or [N, 1], as a transposed product passes per-row scales)."""
    return scale.shape[1] if scale.dim() == 2 and scale.shape[1] > 1 else 0


def weight_sums(codes: torch.Tensor, groups: int = 0) -> torch.Tensor:
    """int32 sums of int8 weight codes [N, ...] per output channel ([N]: the activation zero-point correction), or
    with groups > 0 per group of inputs ([N, groups])."""
    if groups:
        return codes.reshape(codes.shape[0], groups, -1).sum(dim=2, dtype=torch.int32)
    return codes.reshape(codes.shape[0], -1).sum(dim=1, dtype=torch.int32)


def dequantize_weights(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] with scales [N] (per channel) or [N, G] (per group of K / G inputs) -> fp32 [N, K]."""
    if scale_groups(scale):
        return (q.float().reshape(*scale.shape, -1) * scale.unsqueeze(-1)).reshape(q.shape)
    return q.float() * scale.reshape(-1, 1)


def packable(row_width: int, bits: int) -> bool:
    """Whether rows of `row_width` weights pack at `bits`: 2-bit fields go four to a byte, 4-bit two, 6 bits are a
    4-bit and a 2-bit plane, 8 bits are plain int8."""
    return bits == 8 or row_width % (4 if bits in (2, 6) else 2) == 0


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 [N, K] with values on a signed `bits`-bit grid (bits 2 or 4; K a multiple of 8 / bits) -> uint8
    [N, K / f] with f = 8 / bits fields per byte: field i (bits [i * bits, (i + 1) * bits)) of byte j holds element
    i * K / f + j. Each field thus covers one contiguous quarter / half of K, which a GEMM's K loop reads as f
    contiguous activation ranges against one packed tile, with no shuffles."""
    per_byte = 8 // bits
    if bits not in (2, 4) or q.shape[-1] % per_byte:
        raise ValueError(f"pack_bits packs 2- or 4-bit values with the last dimension a multiple of {per_byte}, "
                         f"got bits={bits}, shape {tuple(q.shape)}")
    fields = (q.to(torch.int16) & (2**bits - 1)).to(torch.uint8).chunk(per_byte, dim=-1)
    packed = fields[0].clone()
    for i in range(1, per_byte):
        packed |= fields[i] << (i * bits)
    return packed


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 [N, K * bits / 8] -> int8 [N, K] (sign-extended fields)."""
    per_byte, mask, half = 8 // bits, 2**bits - 1, 2 ** (bits - 1)
    both = torch.cat([((packed >> (i * bits)) & mask).to(torch.int8) for i in range(per_byte)], dim=-1)
    return torch.where(both >= half, both - 2**bits, both)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] with values in [-8, 7] (K even) -> uint8 [N, K/2]: element j in the low nibble of byte j,
    element K/2 + j in its high nibble."""
    return pack_bits(q, 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [N, K/2] -> int8 [N, K] (sign-extended nibbles)."""
    return unpack_bits(packed, 4)


def pack_sign_magnitude(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] with values in [-7, 7] (K even; a symmetric 4-bit grid) -> uint8 [N, K/2], the layout fp8
    layers keep their 4-bit codes in: byte j holds c0 = element j and c1 = element K/2 + j (pack_bits' halves) as
    bit 7 sign of c0, bit 6 sign of c1, bits 3-5 |c1|, bits 0-2 |c0|. A kernel makes c0's float8 e4m3 byte of
    c0 * 2^-9 (sign bit 7, magnitude a subnormal's mantissa) with one AND (byte & 0x87), c1's with two shifts and two
    ANDs (four bytes per instruction); from two's complement nibbles it took nine."""
    wide = q.to(torch.int16)  # abs of int8 -128 would stay negative
    largest = int(wide.abs().max()) if q.numel() else 0
    if q.shape[-1] % 2 or largest > 7:
        raise ValueError(f"pack_sign_magnitude packs codes in [-7, 7] with an even last dimension, got shape "
                         f"{tuple(q.shape)} and |code| up to {largest}")
    first, second = wide.chunk(2, dim=-1)
    return ((first < 0).to(torch.int16) << 7 | (second < 0).to(torch.int16) << 6 | second.abs() << 3
            | first.abs()).to(torch.uint8)


def unpack_sign_magnitude(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_sign_magnitude: uint8 [N, K/2] -> int8 [N, K]."""
    byte = packed.to(torch.int16)
    first = torch.where(byte & 0x80 != 0, -(byte & 7), byte & 7)
    second = torch.where(byte & 0x40 != 0, -((byte >> 3) & 7), (byte >> 3) & 7)
    return torch.cat([first, second], dim=-1).to(torch.int8)


def unpack_fp8_layer_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """An fp8 layer's packed weight codes -> int8 [N, K]: 4 bits in pack_sign_magnitude's layout, 2 bits in
    pack_bits' (two's complement: [-2, 1] has no sign / magnitude form)."""
    if bits not in (2, 4):
        raise ValueError(f"fp8 layers pack 4- or 2-bit codes, got {bits} bits")
    return unpack_sign_magnitude(packed) if bits == 4 else unpack_bits(packed, bits)


def unpack_fp8_layer_e4m3(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """unpack_fp8_layer_codes as float8_e4m3fn, which holds the codes exactly (through float16: no integer type
    converts to fp8 directly everywhere)."""
    return unpack_fp8_layer_codes(packed, bits).to(torch.float16).to(torch.float8_e4m3fn)


def plane_widths(levels: list[int]) -> list[int]:
    """Bit-widths a layer runs at (e.g. [4, 8]: W4 in some timestep groups, W8 in others) -> the widths of the
    weight planes that store them (e.g. [4, 4]). Running at levels[i] bits uses the first planes whose widths add
    up to it. One level is one plane (2, 4 or 8 bits; 6 bits are 4 + 2); several levels nest from a 4-bit first
    plane."""
    levels = sorted(set(levels))
    if len(levels) == 1 and levels[0] in (2, 4, 8):
        return levels
    if levels == [6]:
        return [4, 2]
    if levels[0] < 4 or any(b not in (4, 6, 8) for b in levels):
        raise ValueError(f"a layer runs at 2, 4 or 8 bits, or at several of 4, 6 and 8 bits; got {levels}")
    planes, stored = [], 0
    for level in levels:
        planes += [4, 2] if level - stored == 6 else [level - stored]
        stored = level
    return planes


def quantize_weight_planes(weight: torch.Tensor, planes: list[int],
                           group_size: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """weight [N, ...] -> (int8 codes of each plane, shaped [N, prod(...)]; fp32 scale [N] of the first plane).

    One plane: quantize_weight_per_channel, or with group_size quantize_weight_groups (scales [N, K / group_size]).
    Several (nested grids): the finest code q = round(w / (s / 2^R)), s = absmax / qmax(planes[0]) and R the
    refinement bits, is split from the finest plane up: a plane of r bits keeps p = q - 2^r q' in
    [-2^(r-1), 2^(r-1) - 1] with q' = floor((q + 2^(r-1)) / 2^r) the next coarser code.
    Running at the first i planes means weight ~ q_(i-1) * s / 2^(r_1 + ... + r_(i-1)): one stored copy serves
    every level.
    """
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    if group_size:
        if len(planes) != 1:
            raise ValueError(f"group-wise scales take one weight plane, got planes {planes}")
        codes, scale = quantize_weight_groups(flat, planes[0], group_size)
        return [codes], scale
    if len(planes) == 1:
        codes, scale = quantize_weight_per_channel(flat, planes[0])
        return [codes], scale
    scale = absmax_scale(flat.abs().amax(dim=1), planes[0])
    refine = sum(planes[1:])
    code = torch.round(flat / (scale[:, None] / 2**refine)).to(torch.int32)
    fine_codes = []
    for width in reversed(planes[1:]):
        coarse = torch.div(code + 2 ** (width - 1), 2**width, rounding_mode="floor")
        fine_codes.append((code - coarse * 2**width).to(torch.int8))
        code = coarse
    return [code.to(torch.int8)] + fine_codes[::-1], scale


def fp8_scale(absmax: torch.Tensor) -> torch.Tensor:
    """absmax (any shape) -> fp32 scale absmax / 448 of the same shape, never below SCALE_EPS."""
    return divide(absmax.float(), FP8_MAX).clamp_min(SCALE_EPS)


def quantize_fp8_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x -> float8_e4m3fn of x's shape: x * (1 / scale), saturated to +-448 (scale broadcasts against x)."""
    return (x.float() * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_fp8(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (float8_e4m3fn of x's shape, fp32 scale with `dim` kept as size 1): symmetric absmax / 448 along dim."""
    scale = fp8_scale(x.detach().abs().amax(dim=dim, keepdim=True))
    return quantize_fp8_with_scale(x, scale), scale


def attention_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv_fp8: bool,
                       operand_scales: torch.Tensor | None = None):
    """One attention call's quantized operands (SageAttention): q [B, H, Nq, D], k / v [B, H, Nk, D] float ->
    (int8 q_q, fp32 q_scale [B, H, Nq], int8 k_q, fp32 k_scale [B, H, Nk], v_op, fp32 v_scale [B, H, 1, D] or None).

    Q and K are symmetric int8 per token (absmax / 127); K first loses its mean over tokens, which shifts every score
    of a query row by the same q . mean (softmax unchanged) and frees K's range of the offset all keys share. With
    pv_fp8, v_op is V in float8 e4m3 with one scale per channel (absmax over tokens / 448); else V itself.

    operand_scales (fp32 [3], calibrated; needs pv_fp8): Q, K and V are float8 e4m3 with these static per-tensor
    scales instead (no reduction, so a compiler fuses the quantization into whatever produced them); the scales come
    back as broadcasting views (q_scale / k_scale expanded over tokens, v_scale [1])."""
    if operand_scales is not None:
        q_scale, k_scale, v_scale = operand_scales.float().reshape(3, 1).unbind()
        return (quantize_fp8_with_scale(q, q_scale), q_scale.expand(q.shape[:-1]),
                quantize_fp8_with_scale(k, k_scale), k_scale.expand(k.shape[:-1]),
                quantize_fp8_with_scale(v, v_scale), v_scale)
    q_scale = absmax_scale(q.detach().abs().amax(dim=-1))
    k = k.float()
    k = k - k.mean(dim=-2, keepdim=True)
    k_scale = absmax_scale(k.abs().amax(dim=-1))
    q_q = quantize_with_scale(q, q_scale[..., None])
    k_q = quantize_with_scale(k, k_scale[..., None])
    if not pv_fp8:
        return q_q, q_scale, k_q, k_scale, v, None
    v_q, v_scale = quantize_fp8(v, dim=-2)
    return q_q, q_scale, k_q, k_scale, v_q, v_scale

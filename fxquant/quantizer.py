"""Quantizer math shared by passes, ops and backends: integer grids, scales and zero points.

Weights use symmetric grids without -2^(b-1) (int8 weights lie in [-127, 127]; scale = absmax / 127).
Activations use asymmetric int8 (ViDiT-Q's min-max quantizer): x ~ scale * (q - zero), q in [-128, 127], the
range always covering 0, so post-SiLU / post-GELU inputs use the whole grid. The integer matmul then subtracts
zero * sum(w_q) per output channel, an exact correction.
The fp8 format (e4m3) is symmetric for both: scale = absmax / 448 per output channel (weights) or per token.
"""

from __future__ import annotations

import torch

SCALE_EPS = 1e-8
FP8_MAX = 448.0  # largest finite float8_e4m3fn  # smallest scale: an all-zero row quantizes to zeros instead of dividing by zero


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


def asymmetric_params(lo: torch.Tensor, hi: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Range [lo, hi] (extended to cover 0) -> (fp32 scale, int32 zero point) of an asymmetric signed grid."""
    lo = lo.float().clamp(max=0)
    hi = hi.float().clamp(min=0)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(SCALE_EPS)
    zero = torch.round(-(2 ** (bits - 1)) - lo / scale).to(torch.int32)
    return scale, zero


def quantize_asymmetric(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """x -> int8 q = clamp(round(x * (1 / scale)) + zero) (scale and zero broadcast against x).

    The reciprocal is taken once per scale and multiplied in (one correctly rounded fp32 multiply per element),
    which kernels reproduce bit for bit; round is half-to-even."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x.float() * scale.reciprocal()) + zero, low, high).to(torch.int8)


def quantize_weight_per_channel(weight: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, ...] -> (int8 [N, ...], fp32 scale [N]) with one symmetric scale per output channel."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    scale = absmax_scale(flat.abs().amax(dim=1), bits)
    q = quantize_with_scale(flat, scale[:, None], bits).reshape(weight.shape)
    return q, scale


def dequantize_weight_per_channel(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize_weight_per_channel (for references and tests)."""
    shape = (-1,) + (1,) * (q.dim() - 1)
    return (q.float() * scale.reshape(shape)).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] with values in [-8, 7] (K even) -> uint8 [N, K/2]: element 2i in the low nibble, 2i+1 high."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {tuple(q.shape)}")
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [N, K/2] -> int8 [N, K] (sign-extended nibbles)."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    both = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return torch.where(both > 7, both - 16, both)


def quantize_fp8(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (float8_e4m3fn of x's shape, fp32 scale with `dim` kept as size 1): symmetric absmax / 448 along dim."""
    scale = (x.detach().float().abs().amax(dim=dim, keepdim=True) / FP8_MAX).clamp_min(SCALE_EPS)
    return (x.float() * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale

"""Per-token activation quantization: one program per row, the row held in registers.

    int8: asymmetric min-max, scale = (max(hi, 0) - min(lo, 0)) / 255, zero = rint(-128 - lo / scale),
          q = clamp(rint(x * (1 / scale)) + zero, -128, 127)  (bit-exact with fxquant::quantize_per_token)
    fp8:  symmetric, scale = absmax / 448, q = fp8_e4m3(clamp(x * (1 / scale)))   (as fxquant::quantize_per_token_fp8)

`quantize_per_token` / `quantize_per_token_fp8` are the launchers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.language.extra import libdevice

from . import INTERPRET

SCALE_EPS = tl.constexpr(1e-8)
FP8_MAX = tl.constexpr(448.0)

if INTERPRET:  # the CPU interpreter has no libdevice: emulate round-half-to-even

    @triton.jit
    def _rint(x):
        r = tl.floor(x + 0.5)
        tie = (r - x) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(tie & odd, r - 1.0, r)

else:

    @triton.jit
    def _rint(x):
        return libdevice.rint(x)


@triton.jit
def _load_row(x_ptr, stride_xm, K, BLOCK_K: tl.constexpr):
    """This program's row as fp32 (zeros past K), its offsets and mask."""
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + tl.program_id(0) * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    return x, offs, mask


@triton.jit
def _quantize_int8_kernel(
    x_ptr, q_ptr, scale_ptr, zero_ptr,
    K, stride_xm, stride_qm,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    x, offs, mask = _load_row(x_ptr, stride_xm, K, BLOCK_K)
    lo = tl.minimum(tl.min(tl.where(mask, x, float("inf")), axis=0), 0.0)
    hi = tl.maximum(tl.max(tl.where(mask, x, float("-inf")), axis=0), 0.0)
    scale = tl.maximum(tl.div_rn(hi - lo, 255.0), SCALE_EPS)
    zero = _rint(-128.0 - tl.div_rn(lo, scale))
    inverse = tl.div_rn(1.0, scale)
    q = tl.minimum(tl.maximum(_rint(x * inverse) + zero, -128.0), 127.0)
    tl.store(q_ptr + row * stride_qm + offs, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + row, scale)
    tl.store(zero_ptr + row, zero.to(tl.int32))


@triton.jit
def _quantize_fp8_kernel(
    x_ptr, q_ptr, scale_ptr,
    K, stride_xm, stride_qm,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    x, offs, mask = _load_row(x_ptr, stride_xm, K, BLOCK_K)
    scale = tl.maximum(tl.div_rn(tl.max(tl.abs(x), axis=0), FP8_MAX), SCALE_EPS)
    q = tl.minimum(tl.maximum(x * tl.div_rn(1.0, scale), -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def _launch_config(k: int) -> tuple[int, int]:
    block = triton.next_power_of_2(k)
    return block, max(1, min(16, block // 512))


def _launcher(kernel, traced: bool):
    """The kernel itself, or wrapped for tracing into an Inductor graph (torch.library.wrap_triton)."""
    return wrap_triton(kernel) if traced else kernel


def quantize_per_token(x: torch.Tensor, traced: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (int8 [M, K], fp32 scale [M, 1], int32 zero [M, 1]). traced: see _launcher."""
    assert x.dim() == 2 and x.stride(1) == 1, "quantize_per_token expects a row-major 2-D tensor"
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    zero = torch.empty((m, 1), dtype=torch.int32, device=x.device)
    if m:
        block, warps = _launch_config(k)
        _launcher(_quantize_int8_kernel, traced)[(m,)](x, q, scale, zero, k, x.stride(0), q.stride(0), BLOCK_K=block,
                                                       num_warps=warps)
    return q, scale, zero


def quantize_per_token_fp8(x: torch.Tensor, traced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (fp8 e4m3 [M, K], fp32 scale [M, 1]) with symmetric per-row absmax scales."""
    assert x.dim() == 2 and x.stride(1) == 1, "quantize_per_token_fp8 expects a row-major 2-D tensor"
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block, warps = _launch_config(k)
        _launcher(_quantize_fp8_kernel, traced)[(m,)](x, q, scale, k, x.stride(0), q.stride(0), BLOCK_K=block,
                                                      num_warps=warps)
    return q, scale

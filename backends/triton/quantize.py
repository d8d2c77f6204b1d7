"""Per-token activation quantization: each program holds a few whole rows in registers (one pass over memory).

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
def _load_rows(x_ptr, M, K, stride_xm, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's ROWS rows as fp32 [ROWS, BLOCK_K] (zeros outside), their row indices and the mask."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (offs[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    return x, rows, offs, mask


@triton.jit
def _quantize_int8_kernel(
    x_ptr, q_ptr, scale_ptr, zero_ptr,
    M, K, stride_xm, stride_qm,
    ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    x, rows, offs, mask = _load_rows(x_ptr, M, K, stride_xm, ROWS, BLOCK_K)
    lo = tl.minimum(tl.min(tl.where(mask, x, float("inf")), axis=1), 0.0)
    hi = tl.maximum(tl.max(tl.where(mask, x, float("-inf")), axis=1), 0.0)
    scale = tl.maximum(tl.div_rn(hi - lo, 255.0), SCALE_EPS)
    zero = _rint(-128.0 - tl.div_rn(lo, scale))
    inverse = tl.div_rn(1.0, scale)
    q = tl.minimum(tl.maximum(_rint(x * inverse[:, None]) + zero[:, None], -128.0), 127.0)
    tl.store(q_ptr + rows[:, None] * stride_qm + offs[None, :], q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=rows < M)
    tl.store(zero_ptr + rows, zero.to(tl.int32), mask=rows < M)


@triton.jit
def _quantize_fp8_kernel(
    x_ptr, q_ptr, scale_ptr,
    M, K, stride_xm, stride_qm,
    ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):
    x, rows, offs, mask = _load_rows(x_ptr, M, K, stride_xm, ROWS, BLOCK_K)
    scale = tl.maximum(tl.div_rn(tl.max(tl.abs(x), axis=1), FP8_MAX), SCALE_EPS)
    q = tl.minimum(tl.maximum(x * tl.div_rn(1.0, scale)[:, None], -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + rows[:, None] * stride_qm + offs[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=rows < M)


def _launch_config(k: int) -> tuple[int, int, int]:
    """(rows per program, BLOCK_K, warps): about 8 K values per program in flight, 16-byte loads per thread."""
    block = triton.next_power_of_2(k)
    rows = max(1, min(16, 8192 // block))
    return rows, block, max(1, min(8, rows * block // 1024))


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
        rows, block, warps = _launch_config(k)
        _launcher(_quantize_int8_kernel, traced)[(triton.cdiv(m, rows),)](
            x, q, scale, zero, m, k, x.stride(0), q.stride(0), ROWS=rows, BLOCK_K=block, num_warps=warps)
    return q, scale, zero


def quantize_per_token_fp8(x: torch.Tensor, traced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (fp8 e4m3 [M, K], fp32 scale [M, 1]) with symmetric per-row absmax scales."""
    assert x.dim() == 2 and x.stride(1) == 1, "quantize_per_token_fp8 expects a row-major 2-D tensor"
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        rows, block, warps = _launch_config(k)
        _launcher(_quantize_fp8_kernel, traced)[(triton.cdiv(m, rows),)](
            x, q, scale, m, k, x.stride(0), q.stride(0), ROWS=rows, BLOCK_K=block, num_warps=warps)
    return q, scale

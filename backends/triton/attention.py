"""Quantized flash attention (SageAttention-style): int8 Q K^T with per-token scales, P V in fp8 or the model's dtype.

One program owns BLOCK_M queries of one (batch, head) and streams the keys / values in BLOCK_N tiles with an online
softmax (exp2, running row maxima). Scores are int8 dots (int32, exact) scaled by q_scale[m] * k_scale[n] * scale *
log2(e); with PV_FP8 the tile's P (in [0, 1]) is multiplied by 448 and cast to float8 e4m3, V arrives as float8
with one scale per channel, and the output is divided by 448 and multiplied by V's scales at the end.
Head dims that are not a power of two (PixArt: 72) run as a power-of-two part and a tail (64 + 32) of two dots.

`quantized_attention` is the launcher; its operands come from `fxquant.quantizer.attention_operands`, the same
function fxquant::quantized_attention's reference uses, so kernel and reference differ only in where the softmax
rounds (running vs final row maxima).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ...ops import heads_last
from ...quantizer import attention_operands

from . import INTERPRET

FP8_MAX = tl.constexpr(448.0)
LOG2E = math.log2(math.e)
MIN_TAIL = 32  # int8 MMA reduces over at least 32 values


def get_autotune_config() -> list[triton.Config]:
    """Hopper-sized query / key tiles; one small tile under the CPU interpreter (tests)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 4, 2),
                                 (64, 64, 4, 3), (128, 32, 4, 4)]]


@triton.autotune(configs=get_autotune_config(), key=["N_Q", "N_K", "HEAD_DIM", "PV_FP8"])
@triton.jit
def _attention_kernel(
    q_ptr, q_scale_ptr, k_ptr, k_scale_ptr, v_ptr, v_scale_ptr, out_ptr,
    N_Q, N_K, HEADS, score_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_on,
    HEAD_DIM: tl.constexpr, DIM_A: tl.constexpr, DIM_B: tl.constexpr, PV_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    batch_head = tl.program_id(1)
    b = batch_head // HEADS
    h = batch_head % HEADS
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N_Q
    dims_a = tl.arange(0, DIM_A)
    dims_b = DIM_A + tl.arange(0, DIM_B)
    tail_ok = dims_b < HEAD_DIM
    q_rows = q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn
    q_a = tl.load(q_rows + dims_a[None, :], mask=row_ok[:, None], other=0)
    if HEAD_DIM > DIM_A:
        q_b = tl.load(q_rows + dims_b[None, :], mask=row_ok[:, None] & tail_ok[None, :], other=0)
    q_scale = tl.load(q_scale_ptr + batch_head * N_Q + rows, mask=row_ok, other=0.0) * score_scale

    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc_a = tl.zeros([BLOCK_M, DIM_A], tl.float32)
    acc_b = tl.zeros([BLOCK_M, DIM_B], tl.float32)
    for start in range(0, N_K, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < N_K
        k_a = tl.load(k_base + keys[:, None] * stride_kn + dims_a[None, :], mask=key_ok[:, None], other=0)
        scores = tl.dot(q_a, tl.trans(k_a))
        if HEAD_DIM > DIM_A:
            k_b = tl.load(k_base + keys[:, None] * stride_kn + dims_b[None, :],
                          mask=key_ok[:, None] & tail_ok[None, :], other=0)
            scores += tl.dot(q_b, tl.trans(k_b))
        k_scale = tl.load(k_scale_ptr + batch_head * N_K + keys, mask=key_ok, other=0.0)
        scores = scores.to(tl.float32) * q_scale[:, None] * k_scale[None, :]
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        rescale = tl.exp2(row_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        row_max = new_max
        v_rows = v_base + keys[:, None] * stride_vn
        v_a = tl.load(v_rows + dims_a[None, :] * stride_vd, mask=key_ok[:, None], other=0.0)
        p_op = (p * FP8_MAX).to(v_ptr.dtype.element_ty) if PV_FP8 else p.to(v_ptr.dtype.element_ty)
        acc_a = acc_a * rescale[:, None] + tl.dot(p_op, v_a, out_dtype=tl.float32)
        if HEAD_DIM > DIM_A:
            v_b = tl.load(v_rows + dims_b[None, :] * stride_vd, mask=key_ok[:, None] & tail_ok[None, :], other=0.0)
            acc_b = acc_b * rescale[:, None] + tl.dot(p_op, v_b, out_dtype=tl.float32)

    norm = 1.0 / row_sum
    out_rows = out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_on
    out_a = acc_a * norm[:, None]
    if PV_FP8:
        out_a *= tl.load(v_scale_ptr + batch_head * HEAD_DIM + dims_a)[None, :] / FP8_MAX
    tl.store(out_rows + dims_a[None, :], out_a.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    if HEAD_DIM > DIM_A:
        out_b = acc_b * norm[:, None]
        if PV_FP8:
            out_b *= tl.load(v_scale_ptr + batch_head * HEAD_DIM + dims_b, mask=tail_ok, other=0.0)[None, :] / FP8_MAX
        tl.store(out_rows + dims_b[None, :], out_b.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & tail_ok[None, :])


def head_dim_split(head_dim: int) -> tuple[int, int]:
    """head_dim -> (power-of-two part, tail tile width: a power of two >= MIN_TAIL covering the rest; the kernel
    skips the tail when there is no rest)."""
    dim_a = 1 << (head_dim.bit_length() - 1)
    return dim_a, max(MIN_TAIL, triton.next_power_of_2(max(head_dim - dim_a, 1)))


FIXED_CONFIG = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)


def quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, pv_fp8: bool,
                        traced: bool = False) -> torch.Tensor:
    """q [B, H, Nq, D], k / v [B, H, Nk, D] (head dim >= 16) -> [B, H, Nq, D] in q's dtype, stored [B, Nq, H, D].

    traced: launch through torch.library.wrap_triton with FIXED_CONFIG (graphs the compile backend hands to
    Inductor); otherwise the autotuned kernel is launched directly (eager calls)."""
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    assert head_dim >= 16 and k.shape[-1] == v.shape[-1] == head_dim, f"head dims {q.shape}, {k.shape}, {v.shape}"
    q_q, q_scale, k_q, k_scale, v_op, v_scale = attention_operands(q, k, v, pv_fp8)
    if pv_fp8:  # keys contiguous: the fp8 MMA wants its reduced dimension innermost
        v_op = v_op.transpose(-1, -2).contiguous().transpose(-1, -2)
        v_scale = v_scale.contiguous()
    q_q = q_q if q_q.stride(-1) == 1 else q_q.contiguous()
    k_q = k_q if k_q.stride(-1) == 1 else k_q.contiguous()
    out = heads_last(torch.empty_like(q))
    if out.numel() == 0:
        return out
    dim_a, dim_b = head_dim_split(head_dim)
    args = (q_q, q_scale.contiguous(), k_q, k_scale.contiguous(), v_op, v_scale if pv_fp8 else q_scale, out,
            n_q, n_k, heads, scale * LOG2E, *q_q.stride()[:3], *k_q.stride()[:3], *v_op.stride(), *out.stride()[:3])
    flags = dict(HEAD_DIM=head_dim, DIM_A=dim_a, DIM_B=dim_b, PV_FP8=pv_fp8)
    if traced:
        config = get_autotune_config()[0].all_kwargs() if INTERPRET else FIXED_CONFIG
        wrap_triton(_attention_kernel.fn)[(triton.cdiv(n_q, config["BLOCK_M"]), batch * heads)](*args, **flags,
                                                                                              **config)
    else:
        _attention_kernel[lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads)](*args, **flags)
    return out

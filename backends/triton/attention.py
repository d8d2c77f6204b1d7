"""Quantized flash attention (SageAttention-style): int8 Q K^T with per-token scales, P V in fp8 or the model's dtype;
or (STATIC_SCALES) Q, K and V all float8 e4m3 with one calibrated scale each.

One program owns BLOCK_M queries of one (batch, head) and streams the keys / values in BLOCK_N tiles with an online
softmax (exp2, running row maxima). Scores are int8 dots (int32, exact) scaled by q_scale[m] * k_scale[n] * scale *
log2(e); with PV_FP8 the tile's P (in [0, 448]: the factor enters through the exponent and cancels against the row
sum) is cast to float8 e4m3, V arrives as float8 with one scale per channel, and the output is multiplied by V's
scales at the end. With STATIC_SCALES the three scales are scalars: Q's and K's fold into the score scale once.
Head dims that are not a power of two (PixArt: 72) run as a power-of-two part and a tail (64 + 32) of two dots, on
operands the launcher zero-pads to that width. Full key tiles load unmasked; only the last, partial one is masked.

`quantized_attention` is the launcher; its operands come from `fxquant.quantizer.attention_operands`, the same
function fxquant::quantized_attention's reference uses, so kernel and reference differ only in where the softmax
rounds (running vs final row maxima).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import wrap_triton

from ...ops import (KEY_ALIGNMENT, attention_operand_reference, empty_heads_last, head_dim_split,
                    padded_head_dim)
from ...quantizer import attention_operands

from . import INTERPRET, ceil_div
from .quantize import FP8_MAX, e4m3_grid

LOG2_FP8_MAX = tl.constexpr(math.log2(448.0))
LOG2E = math.log2(math.e)


def get_autotune_config() -> list[triton.Config]:
    """Hopper-sized query / key tiles; one small tile under the CPU interpreter (tests). The list holds the fastest
    tiles of a 39-config sweep on an H100 (`gpu_bench.py --sections attention_configs`, fp8-static: 128 x 128 with 4
    warps and 3-4 stages at CogVideoX's and SD3's shapes, 64 x 128 at PixArt's) and the earlier int8 winners."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 128, 4, 3), (128, 128, 4, 4), (64, 128, 4, 3), (128, 64, 4, 3),
                                 (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)]]


@triton.jit
def _attend_tile(acc_a, acc_b, row_max, row_sum, q_a, q_b, q_scale, k_base, k_scale_base, v_base, keys, N_K,
                 stride_kn, stride_vn, stride_vd, dims_a, dims_b, dims_bv, HEAD_DIM: tl.constexpr,
                 HAS_TAIL: tl.constexpr, PV_FP8: tl.constexpr, STATIC_SCALES: tl.constexpr, RAW_TAIL: tl.constexpr,
                 MASKED: tl.constexpr):
    """One key / value tile into the running softmax state. MASKED: the last, partial tile (keys past N_K);
    STATIC_SCALES: q_scale already carries K's scale (no per-key scales); RAW_TAIL: the tail's channels past
    HEAD_DIM are not zero (masked on load). dims_b: Q / K's tail channels, dims_bv: V's (narrower)."""
    key_ok = keys < N_K
    k_rows = k_base + keys[:, None] * stride_kn
    k_a = tl.load(k_rows + dims_a[None, :], mask=key_ok[:, None], other=0.0) if MASKED else \
        tl.load(k_rows + dims_a[None, :])
    acc = tl.dot(q_a, tl.trans(k_a))
    if HAS_TAIL:
        if RAW_TAIL:
            k_b = tl.load(k_rows + dims_b[None, :], mask=key_ok[:, None] & (dims_b < HEAD_DIM)[None, :], other=0.0)
        else:
            k_b = tl.load(k_rows + dims_b[None, :], mask=key_ok[:, None], other=0.0) if MASKED else \
                tl.load(k_rows + dims_b[None, :])
        acc += tl.dot(q_b, tl.trans(k_b))
    # score = acc * k_scale * q_scale; q_scale > 0 commutes with the row max, and folds into exp2's argument (FMA)
    if STATIC_SCALES:
        scaled = acc.to(tl.float32)
    else:
        k_scale = tl.load(k_scale_base + keys, mask=key_ok, other=0.0) if MASKED else tl.load(k_scale_base + keys)
        scaled = acc.to(tl.float32) * k_scale[None, :]
    if MASKED:
        scaled = tl.where(key_ok[None, :], scaled, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scaled, axis=1) * q_scale)
    rescale = tl.exp2(row_max - new_max)
    # fp8: P arrives multiplied by 448 (e4m3's range) through the exponent; row_sum carries the factor, so it cancels
    bias = new_max - LOG2_FP8_MAX if PV_FP8 else new_max
    p = tl.exp2(scaled * q_scale[:, None] - bias[:, None])
    row_sum = row_sum * rescale + tl.sum(p, axis=1)
    v_rows = v_base + keys[:, None] * stride_vn
    v_a = tl.load(v_rows + dims_a[None, :] * stride_vd, mask=key_ok[:, None], other=0.0) if MASKED else \
        tl.load(v_rows + dims_a[None, :] * stride_vd)
    p_op = (e4m3_grid(p) if PV_FP8 else p).to(v_a.dtype)
    acc_a = tl.dot(p_op, v_a, acc_a * rescale[:, None], out_dtype=tl.float32)
    if HAS_TAIL:
        if RAW_TAIL:
            v_b = tl.load(v_rows + dims_bv[None, :] * stride_vd, mask=key_ok[:, None] & (dims_bv < HEAD_DIM)[None, :],
                          other=0.0)
        else:
            v_b = tl.load(v_rows + dims_bv[None, :] * stride_vd, mask=key_ok[:, None], other=0.0) if MASKED else \
                tl.load(v_rows + dims_bv[None, :] * stride_vd)
        acc_b = tl.dot(p_op, v_b, acc_b * rescale[:, None], out_dtype=tl.float32)
    return acc_a, acc_b, new_max, row_sum


@triton.autotune(configs=get_autotune_config(), key=["N_Q", "N_K", "HEAD_DIM", "PV_FP8", "STATIC_SCALES",
                                                     "RAW_TAIL"])
@triton.jit
def _attention_kernel(
    q_ptr, q_scale_ptr, k_ptr, k_scale_ptr, v_ptr, v_scale_ptr, out_ptr, out_scale_ptr,
    N_Q, N_K, HEADS, score_scale, out_split,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_on,
    HEAD_DIM: tl.constexpr, DIM_A: tl.constexpr, DIM_B: tl.constexpr, DIM_BV: tl.constexpr, HAS_TAIL: tl.constexpr,
    PV_FP8: tl.constexpr, STATIC_SCALES: tl.constexpr, OUT_CODES: tl.constexpr, RAW_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """HAS_TAIL (HEAD_DIM > DIM_A): Q / K are padded to DIM_A + DIM_B along the head dim, V to DIM_A + DIM_BV (the P V
    product's N side takes a narrower tail), with zeros (tiles load unmasked) or, RAW_TAIL, with anything (tail loads
    masked); v_scale is [B * H, DIM_A + DIM_BV]
    (STATIC_SCALES: q / k / v scales are one value each); the output holds HEAD_DIM channels. OUT_CODES 1: the output
    is stored as fp8 codes of the static scale at out_scale_ptr; 2: of the first of two scales there for queries
    before out_split, of the second for the rest (a joint attention's two streams, each with its projection)."""
    query_blocks = tl.cdiv(N_Q, BLOCK_M)  # a 1-D grid (no 65535 limit on B * H); neighbours share K / V
    batch_head = tl.program_id(0) // query_blocks
    b = batch_head // HEADS
    h = batch_head % HEADS
    rows = (tl.program_id(0) % query_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N_Q
    dims_a = tl.arange(0, DIM_A)
    dims_b = DIM_A + tl.arange(0, DIM_B)
    dims_bv = DIM_A + tl.arange(0, DIM_BV)
    q_rows = q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn
    q_a = tl.load(q_rows + dims_a[None, :], mask=row_ok[:, None], other=0.0)
    if HAS_TAIL and RAW_TAIL:
        q_b = tl.load(q_rows + dims_b[None, :], mask=row_ok[:, None] & (dims_b < HEAD_DIM)[None, :], other=0.0)
    elif HAS_TAIL:
        q_b = tl.load(q_rows + dims_b[None, :], mask=row_ok[:, None], other=0.0)
    else:
        q_b = q_a
    if STATIC_SCALES:
        q_scale = tl.zeros([BLOCK_M], tl.float32) + (tl.load(q_scale_ptr) * tl.load(k_scale_ptr) * score_scale).to(
            tl.float32)  # (Inductor passes score_scale as fp64)
    else:
        q_scale = (tl.load(q_scale_ptr + batch_head * N_Q + rows, mask=row_ok, other=1.0) * score_scale).to(
            tl.float32)

    k_base = k_ptr + b * stride_kb + h * stride_kh
    k_scale_base = k_scale_ptr + batch_head * N_K
    v_base = v_ptr + b * stride_vb + h * stride_vh
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc_a = tl.zeros([BLOCK_M, DIM_A], tl.float32)
    acc_b = tl.zeros([BLOCK_M, DIM_BV], tl.float32)
    full_tiles_end = (N_K // BLOCK_N) * BLOCK_N
    for start in range(0, full_tiles_end, BLOCK_N):
        acc_a, acc_b, row_max, row_sum = _attend_tile(
            acc_a, acc_b, row_max, row_sum, q_a, q_b, q_scale, k_base, k_scale_base, v_base,
            start + tl.arange(0, BLOCK_N), N_K, stride_kn, stride_vn, stride_vd, dims_a, dims_b, dims_bv, HEAD_DIM,
            HAS_TAIL, PV_FP8, STATIC_SCALES, RAW_TAIL, False)
    if full_tiles_end < N_K:
        acc_a, acc_b, row_max, row_sum = _attend_tile(
            acc_a, acc_b, row_max, row_sum, q_a, q_b, q_scale, k_base, k_scale_base, v_base,
            full_tiles_end + tl.arange(0, BLOCK_N), N_K, stride_kn, stride_vn, stride_vd, dims_a, dims_b, dims_bv,
            HEAD_DIM, HAS_TAIL, PV_FP8, STATIC_SCALES, RAW_TAIL, True)

    norm = 1.0 / row_sum
    out_rows = out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_on
    v_scales = v_scale_ptr + batch_head * (DIM_A + DIM_BV if HAS_TAIL else DIM_A)
    if STATIC_SCALES:
        norm *= tl.load(v_scale_ptr)
    if OUT_CODES == 1:
        norm *= tl.div_rn(1.0, tl.load(out_scale_ptr))
    elif OUT_CODES == 2:
        norm *= tl.where(rows < out_split, tl.div_rn(1.0, tl.load(out_scale_ptr)),
                         tl.div_rn(1.0, tl.load(out_scale_ptr + 1)))
    out_a = acc_a * norm[:, None]
    if PV_FP8 and not STATIC_SCALES:
        out_a *= tl.load(v_scales + dims_a)[None, :]
    if OUT_CODES:
        out_a = e4m3_grid(tl.minimum(tl.maximum(out_a, -FP8_MAX), FP8_MAX))
    tl.store(out_rows + dims_a[None, :], out_a.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    if HAS_TAIL:
        out_b = acc_b * norm[:, None]
        if PV_FP8 and not STATIC_SCALES:
            out_b *= tl.load(v_scales + dims_bv)[None, :]
        if OUT_CODES:
            out_b = e4m3_grid(tl.minimum(tl.maximum(out_b, -FP8_MAX), FP8_MAX))
        tl.store(out_rows + dims_bv[None, :], out_b.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (dims_bv < HEAD_DIM)[None, :])


def _pad_last(x: torch.Tensor, pad: int) -> torch.Tensor:
    """x with `pad` zeros appended to its last dimension (fp8 padded as bytes: 0x00 is +0.0)."""
    if pad == 0:
        return x
    if x.dtype == torch.float8_e4m3fn:
        return F.pad(x.view(torch.uint8), (0, pad)).view(torch.float8_e4m3fn)
    return F.pad(x, (0, pad))


FIXED_CONFIG = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)  # the autotuner's H100 choice at PixArt's shape
_TUNED: dict[tuple, dict] = {}  # _tuning_key(...) -> the autotuner's tile for that problem, for every launch


def _tuning_key(n_q: int, n_k: int, head_dim: int, pv_fp8: bool, static: bool, dtype: torch.dtype) -> tuple:
    """What a tuned tile depends on: the autotuner's key (N_Q, N_K, HEAD_DIM, PV_FP8, STATIC_SCALES) and the
    model's dtype."""
    return n_q, n_k, head_dim, pv_fp8, static, dtype


def tune(batch: int, heads: int, n_q: int, n_k: int, head_dim: int, pv_fp8: bool, static: bool,
         dtype: torch.dtype) -> dict:
    """Autotune the kernel once for this problem on random CUDA operands (the timing does not depend on the values)
    and keep the winner for traced launches: the compile backend calls this before handing the graph to Inductor,
    outside any tracing, so compiled graphs run the tile the autotuner picks for each attention shape. static: with
    static fp8 operand scales."""
    key = _tuning_key(n_q, n_k, head_dim, pv_fp8, static, dtype)
    if key not in _TUNED:  # the eager launch autotunes and keeps the winner
        q, k, v = (torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype) for n in (n_q, n_k, n_k))
        operand_scales = torch.full((3,), 4.0 / 448, device="cuda") if static else None
        quantized_attention(q, k, v, head_dim**-0.5, pv_fp8, operand_scales)
    return _TUNED[key]


def traced_config(key: tuple) -> dict:
    """The tile config of a traced launch for a `_tuning_key`: what `tune` found, else FIXED_CONFIG (also under
    dynamic shapes, whose symbolic sizes are no dictionary key); the first autotune config in the interpreter."""
    if INTERPRET:
        return get_autotune_config()[0].all_kwargs()
    if not all(isinstance(size, int) for size in key[:3]):
        return FIXED_CONFIG
    return _TUNED.get(key, FIXED_CONFIG)


def kernel_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv_fp8: bool,
                    operand_scales: torch.Tensor | None = None) -> dict:
    """q [B, H, Nq, D], k / v [B, H, Nk, D] (operand_scales: fp32 [3] static fp8 scales, or None) -> the kernel's
    operands (`attention_operands`, zero-padded to the kernel's head-dim split, in the layouts its tiles load) and
    flags, for `attend`. Static scales: the layouts of fxquant::attention_operand_fp8."""
    head_dim = q.shape[-1]
    assert head_dim >= 16 and k.shape[-1] == v.shape[-1] == head_dim, f"head dims {q.shape}, {k.shape}, {v.shape}"
    if operand_scales is not None:
        scales = operand_scales.float().unbind()
        return codes_operands(attention_operand_reference(q, scales[0], False),
                              attention_operand_reference(k, scales[1], False),
                              attention_operand_reference(v, scales[2], True), head_dim, operand_scales, False)
    # zero channels up to the tail tiles' widths (the tails load unmasked)
    pad, pad_v = padded_head_dim(head_dim) - head_dim, padded_head_dim(head_dim, value=True) - head_dim
    q_q, q_scale, k_q, k_scale, v_op, v_scale = attention_operands(q, k, v, pv_fp8)
    q_q, k_q, v_op = _pad_last(q_q, pad), _pad_last(k_q, pad), _pad_last(v_op, pad_v)
    q_q = q_q if q_q.stride(-1) == 1 else q_q.contiguous()
    k_q = k_q if k_q.stride(-1) == 1 else k_q.contiguous()
    if pv_fp8:  # keys contiguous (the fp8 MMA wants its reduced dimension innermost), as attention_operand_fp8's V
        v_op = _pad_last(v_op.transpose(-1, -2), -v_op.shape[-2] % KEY_ALIGNMENT).contiguous().transpose(-1, -2)
        v_scale = F.pad(v_scale, (0, pad_v)).contiguous()
    elif v_op.stride(-1) != 1:
        v_op = v_op.contiguous()
    return dict(q_q=q_q, q_scale=q_scale.contiguous(), k_q=k_q, k_scale=k_scale.contiguous(), v_op=v_op,
                v_scale=v_scale if pv_fp8 else q_scale,  # (v_scale: never read without fp8 V)
                flags=dict(_split_flags(head_dim), PV_FP8=pv_fp8, STATIC_SCALES=False, RAW_TAIL=False))


def _split_flags(head_dim: int) -> dict:
    """The kernel's head-dim constexprs (`head_dim_split`)."""
    dim_a, dim_b, dim_bv = head_dim_split(head_dim)
    return dict(HEAD_DIM=head_dim, DIM_A=dim_a, DIM_B=dim_b, DIM_BV=dim_bv, HAS_TAIL=head_dim > dim_a)


def codes_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, operand_scales: torch.Tensor,
                   raw_tail: bool = True) -> dict:
    """Static fp8 operands laid out as fxquant::attention_operand_fp8 makes them (q [B, H, Nq, Dp], k [B, H, Nk, Dp],
    v keys-major [B, H, Dv, Nkp]), with their scales (fp32 [3]) -> the kernel's operands and flags, for `attend`.
    raw_tail: the padding holds anything (operands written by GEMM epilogues), so tail channels past head_dim are
    masked on load; else it is zero and the tail loads unmasked."""
    q_scale, k_scale, v_scale = operand_scales.float().contiguous().split(1)
    return dict(q_q=q, q_scale=q_scale, k_q=k, k_scale=k_scale, v_op=v.transpose(-1, -2), v_scale=v_scale,
                flags=dict(_split_flags(head_dim), PV_FP8=True, STATIC_SCALES=True, RAW_TAIL=raw_tail))


def kernel_args(operands: dict, out: torch.Tensor, scale: float, out_scale: torch.Tensor | None = None,
                out_split: int = 0) -> tuple:
    """`_attention_kernel`'s positional arguments for `kernel_operands(...)` writing `out` ([B, H, Nq, D]; fp8 codes
    of out_scale when given: one value, or two split at query out_split)."""
    q_q, k_q, v_op = operands["q_q"], operands["k_q"], operands["v_op"]
    out_scale = operands["q_scale"] if out_scale is None else out_scale.float().reshape(-1)  # (else never read)
    return (q_q, operands["q_scale"], k_q, operands["k_scale"], v_op, operands["v_scale"], out, out_scale, q_q.shape[2],
            k_q.shape[2], q_q.shape[1], scale * LOG2E, out_split, *q_q.stride()[:3], *k_q.stride()[:3],
            *v_op.stride(), *out.stride()[:3])


def attend(q: torch.Tensor, operands: dict, scale: float, traced: bool = False,
           out_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
           out_split: int = 0) -> torch.Tensor:
    """The kernel on `kernel_operands(q, k, v, ...)` (or `codes_operands`) -> [B, H, Nq, D] (q's shape) in q's dtype
    or out_dtype, or with out_scale fp8 codes of that static scale (fp32 [1]; or [2] with out_split > 0: the first
    for queries before out_split), stored [B, Nq, H, D]; traced as in `quantized_attention`."""
    batch, heads, n_q, head_dim = q.shape
    n_k = operands["k_q"].shape[2]
    dtype = out_dtype or q.dtype
    out = empty_heads_last(q, torch.float8_e4m3fn if out_scale is not None else dtype)
    if out.numel() == 0:
        return out
    args = kernel_args(operands, out, scale, out_scale, out_split)
    flags = dict(operands["flags"], OUT_CODES=0 if out_scale is None else 2 if out_split else 1)
    key = _tuning_key(n_q, n_k, head_dim, flags["PV_FP8"], flags["STATIC_SCALES"], dtype)
    if traced or key in _TUNED:
        config = traced_config(key) if traced else _TUNED[key]
        launch = wrap_triton(_attention_kernel.fn) if traced else _attention_kernel.fn
        launch[(ceil_div(n_q, config["BLOCK_M"]) * batch * heads,)](*args, **flags, **config)
    else:  # the first eager launch of this problem autotunes; every later launch (eager or traced) takes the winner
        _attention_kernel[lambda meta: (ceil_div(n_q, meta["BLOCK_M"]) * batch * heads,)](*args, **flags)
        best = _attention_kernel.best_config
        _TUNED[key] = dict(**best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)
    return out


def quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, pv_fp8: bool,
                        operand_scales: torch.Tensor | None = None, traced: bool = False,
                        out_scale: torch.Tensor | None = None, out_split: int = 0) -> torch.Tensor:
    """q [B, H, Nq, D], k / v [B, H, Nk, D] (head dim >= 16) -> [B, H, Nq, D] in q's dtype, stored [B, Nq, H, D];
    operand_scales: static fp8 Q / K / V scales (fp32 [3]) or None (per-token int8 Q / K); out_scale (fp32 [1], or
    [2] split at query out_split): the output as fp8 codes of these static scales (fxquant::quantized_attention_codes).

    traced: launch through torch.library.wrap_triton with the config `tune` found for this problem, else
    FIXED_CONFIG (graphs the compile backend hands to Inductor); otherwise launched directly, autotuned at the first
    launch of each problem (`_tuning_key`) and with that tile after (eager calls, opaque ops under CUDA graphs)."""
    return attend(q, kernel_operands(q, k, v, pv_fp8, operand_scales), scale, traced, out_scale, out_split=out_split)


def attention_fp8_codes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, scale: float,
                        operand_scales: torch.Tensor, out_dtype: torch.dtype, out_scale: torch.Tensor | None = None,
                        out_split: int = 0, traced: bool = False) -> torch.Tensor:
    """fxquant::attention_fp8_codes: the kernel on laid-out fp8 operands (`codes_operands`) -> [B, H, Nq, head_dim]
    in out_dtype (or fp8 codes of out_scale, as `attend`), stored [B, Nq, H, head_dim]; traced as in
    `quantized_attention`."""
    shape = q.new_empty(()).expand(*q.shape[:3], head_dim)  # attend reads only the output shape from q
    return attend(shape, codes_operands(q, k, v, head_dim, operand_scales), scale, traced, out_scale, out_dtype,
                  out_split)

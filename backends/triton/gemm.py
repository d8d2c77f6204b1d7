"""Quantized GEMM: int8 x int8 -> int32 (or fp8 e4m3 x fp8 e4m3 -> fp32) with the dequantisation fused in the
epilogue; int8 or fp8 activations against 8-, 4- or 2-bit weights (W8A8, W4A8, W2A8), the packed integer codes
unpacked in the K loop (few tokens: memory-bound) or into an int8 / e4m3 copy by a kernel of their own before the GEMM
(many tokens: compute-bound). Against fp8 activations the K loop holds a code c as the e4m3 value c * 2^-9 (a
subnormal whose bits are c's sign and magnitude, which fp8 layers store as such: no conversion instruction), the
epilogue multiplies by 2^9.

    out[m, n] = a_scale[m] * b_scale[n] * (sum_k a[m, k] b[n, k] - a_zero[m] * b_sum[n]) + bias[n]
    (optionally)  out[m, n] = residual[m, n] + gate[m // rows_per_gate, n] * out[m, n]   (fxquant::linear_residual)
    (or)          out[m, n] = quantize(act(out[m, n]), out_scale, out_zero)    (fxquant::linear_activation_quantize)
                  or, gated (GEGLU: b holds 2N rows), quantize(out[m, n] * gelu(out[m, N + n]), out_scale, out_zero)
    (and)         stored at split offsets, an attention operand's layout          (fxquant::linear_attention_operand)
                  after an RMSNorm / LayerNorm over each head's channels (Flux's / CogVideoX's q / k) and a
                  rotary position embedding (Flux's)

a: activations [M, K] (row-major), b: weights [N, K] (row-major, i.e. B^T) as int8 / fp8 codes, or packed uint8
[N, K * bits / 8] (fxquant.quantizer.pack_bits: field i of byte j holds element i * K * bits / 8 + j);
per-token a_scale / a_zero (int8 path: asymmetric activations; the zero-point term uses the precomputed weight row
sums b_sum), per-channel b_scale, optional bias, optional per-sample gate and residual (a transformer block's
`h + gate * proj(...)`: the projection's output never reaches memory), or a GELU / SiLU and a static per-tensor
quantization (a feed-forward's hidden activations stored as the next GEMM's int8 / fp8 codes), one cast at the store.
Accumulation is exact int32 for int8 and fp32 for fp8. The launcher `quantized_gemm` checks, allocates and
launches; tests compare it with fxquant::int8_linear's reference. Every launch takes its tile from the problem size
(`fixed_config`: no autotuning at a model's first call, the same arithmetic eager and compiled); with `traced=True`
it goes through `torch.library.wrap_triton`, so that the compile backend's graphs trace into the kernel and Inductor
launches it from its own generated code. Benchmarks can ask for the autotuner's tile (`config="autotune"`).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ...ops import KEY_ALIGNMENT, attention_operand_shape
from ...quantizer import scale_groups

from . import INTERPRET, ceil_div
from .quantize import (ACTIVATION_CODES, FP8_MAX, apply_activation, e4m3_grid, launcher, load_per_group,
                       per_group_operand, rint, row_strided)


def get_autotune_config() -> list[triton.Config]:
    """The tiles `config="autotune"` tries (benchmarks; fixed_config's rules come from its choices): Hopper-sized
    (BLOCK_K >= 128, so that a 2-bit tile still feeds the dot 32 values of K); one small tile under the CPU
    interpreter (tests)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 128, 4, 4),
            (64, 128, 128, 4, 4), (64, 64, 128, 4, 4), (128, 64, 128, 4, 4),
            # few tokens (M <= 256): narrow tiles so that enough programs fill the SMs
            (32, 64, 128, 4, 4), (32, 128, 128, 4, 4), (16, 64, 256, 4, 3), (64, 64, 256, 4, 3),
        ]
    ]


MAX_BLOCK_M = max(config.kwargs["BLOCK_M"] for config in get_autotune_config())
# from this many tokens on, packed weights are unpacked into int8 codes by a kernel of their own and the W8A8 GEMM
# runs on them (the unpacking in the K loop halves the int8 GEMM's speed); below, the K loop unpacks. On an H100
# (gpu-bench-h100/kernels-and-packed-sweep.json) unpacking first wins from 256 tokens on, the K loop at 16 - 64; with
# session 27's cheaper unpacking (packed-tiles-sign-magnitude.json, 256 tokens) it still does for int8 activations at
# PixArt's widths (13.4 / 7.4 us against 14.9 / 7.8), not at Flux's (52.5 against 45.7); against fp8 activations the
# K loop wins at all three (45.6 / 14.8 / 7.6 against 55.7 / 15.4 / 8.2 us): it runs up to 512 (untimed between).
UNPACK_MIN_TOKENS = 256
UNPACK_MIN_TOKENS_FP8 = 512
# group-wise packed weights against fp8 activations unpack first only from UNPACK_MIN_TOKENS up to this many tokens: on
# an H100 (gpu-bench-h100/group-wise-gemm-s30.json, group 128) unpacking first won at 256 tokens (34.9 against 91.2 us
# at 1152 -> 4608) and the K loop from 4096 (44.4 / 219.7 / 161.9 against 47.5 / 230.1 / 420.1 us at PixArt's
# shapes); against int8 activations unpacking first wins from 256 tokens on, as per channel (untimed in between)
GROUPED_FP8_UNPACK_MAX_TOKENS = 1024


# PTX on four packed bytes per instruction: each byte's low / high nibble sign-extended to a byte (t = nibble ^ 8 is
# s + 8 in [0, 15]; (t + 0x78) ^ 0x80 is s mod 256, and no carry crosses a byte), for the unpack kernel. The shifts
# `unpack_field` falls back to (2-bit fields, the CPU interpreter, which runs no PTX) spend a few instructions per
# value: in session 14's K loop the PTX made W4A8 1.5-2x faster on an H100 (gpu-bench-h100/packed-nibble-asm.json).
PTX = tl.constexpr(not INTERPRET)
LOW_NIBBLES_ASM = tl.constexpr("{ .reg .b32 t; and.b32 t, $1, 0x0F0F0F0F; xor.b32 t, t, 0x08080808; "
                               "add.u32 t, t, 0x78787878; xor.b32 $0, t, 0x80808080; }")
HIGH_NIBBLES_ASM = tl.constexpr("{ .reg .b32 t; shr.u32 t, $1, 4; and.b32 t, t, 0x0F0F0F0F; "
                                "xor.b32 t, t, 0x08080808; add.u32 t, t, 0x78787878; xor.b32 $0, t, 0x80808080; }")
# the K loop against int8 activations takes a code c as the int8 c * 2^(8 - bits): its field moved to the byte's top
# bits, the low bits cleared (4 bits: the high nibble in one AND, the low one after a 4-bit shift: 3 operations per 8
# codes, where sign-extending them took 9); the epilogue shifts the int32 sums back, exactly
TOP_HIGH_NIBBLES_ASM = tl.constexpr("and.b32 $0, $1, 0xF0F0F0F0;")
TOP_LOW_NIBBLES_ASM = tl.constexpr("{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }")
# fp8 layers keep 4-bit codes as sign / magnitude fields (fxquant.quantizer.pack_sign_magnitude: bits 7 / 6 the
# signs of fields 0 / 1, bits 0-2 / 3-5 their magnitudes); the e4m3 byte of c * 2^-9 is c's sign in bit 7 and |c| <= 7
# as a subnormal's mantissa, four bytes per instruction: field 0 in one AND, field 1 in two shifts and two ANDs (ptxas
# fuses the OR): 5 SASS instructions per 8 codes, where two's complement nibbles took 16 (sm_90, 16-row tile: the
# K-loop body 375 -> 183 instructions with one accumulator; benchmarks/kernel_ir.py counts it).
FIELD0_E4M3_ASM = tl.constexpr("and.b32 $0, $1, 0x87878787;")
FIELD1_E4M3_ASM = tl.constexpr("{ .reg .b32 t, s; shr.u32 t, $1, 3; and.b32 t, t, 0x07070707; shl.b32 s, $1, 1; "
                               "and.b32 s, s, 0x80808080; or.b32 $0, t, s; }")
E4M3_CODE_UNIT = tl.constexpr(2.0 ** -9)  # the e4m3 value of code 1 in the K loop against fp8 activations
E4M3_CODES_PER_UNIT = tl.constexpr(2.0 ** 9)  # the epilogue's rescale


@triton.jit
def unpack_field(packed, field: tl.constexpr, WEIGHT_BITS: tl.constexpr):
    """Field `field` (bits [field * WEIGHT_BITS, (field + 1) * WEIGHT_BITS)) of int8-bitcast packed bytes, as signed
    int8 codes: nibbles four bytes at a time in PTX on the GPU, otherwise shifted to the top bit, then arithmetically
    (sign-extending) down."""
    if PTX and WEIGHT_BITS == 4 and field == 0:
        return tl.inline_asm_elementwise(LOW_NIBBLES_ASM, "=r,r", [packed], dtype=tl.int8, is_pure=True, pack=4)
    elif PTX and WEIGHT_BITS == 4:
        return tl.inline_asm_elementwise(HIGH_NIBBLES_ASM, "=r,r", [packed], dtype=tl.int8, is_pure=True, pack=4)
    else:
        return (packed << (8 - WEIGHT_BITS * (field + 1))) >> (8 - WEIGHT_BITS)


@triton.jit
def top_aligned_field(packed, field: tl.constexpr, WEIGHT_BITS: tl.constexpr):
    """Field `field` of int8-bitcast packed bytes (fxquant.quantizer.pack_bits) as the int8 codes c * 2^(8 -
    WEIGHT_BITS): nibbles four bytes at a time in PTX on the GPU, otherwise shifted up and masked."""
    if PTX and WEIGHT_BITS == 4 and field == 1:
        return tl.inline_asm_elementwise(TOP_HIGH_NIBBLES_ASM, "=r,r", [packed], dtype=tl.int8, is_pure=True, pack=4)
    elif PTX and WEIGHT_BITS == 4:
        return tl.inline_asm_elementwise(TOP_LOW_NIBBLES_ASM, "=r,r", [packed], dtype=tl.int8, is_pure=True, pack=4)
    else:
        return ((packed << (8 - WEIGHT_BITS * (field + 1))) & (-1 << (8 - WEIGHT_BITS))).to(tl.int8)


@triton.jit
def fp8_layer_codes(packed, field: tl.constexpr, WEIGHT_BITS: tl.constexpr):
    """Field `field` of an fp8 layer's int8-bitcast packed bytes (fxquant.quantizer.unpack_fp8_layer_codes: 4 bits
    sign / magnitude, 2 bits two's complement) as signed int8 codes."""
    if WEIGHT_BITS == 4 and field == 0:
        return tl.where(packed < 0, -(packed & 7), packed & 7).to(tl.int8)
    elif WEIGHT_BITS == 4:
        return tl.where((packed & 0x40) != 0, -((packed >> 3) & 7), (packed >> 3) & 7).to(tl.int8)
    else:
        return unpack_field(packed, field, WEIGHT_BITS)


@triton.jit
def unpack_field_e4m3(packed, field: tl.constexpr, WEIGHT_BITS: tl.constexpr):
    """fp8_layer_codes' codes c as float8 e4m3 values c * E4M3_CODE_UNIT (exact): 4-bit fields by bit operations in
    PTX on the GPU, otherwise converted through fp32."""
    if PTX and WEIGHT_BITS == 4 and field == 0:
        return tl.inline_asm_elementwise(FIELD0_E4M3_ASM, "=r,r", [packed], dtype=tl.int8, is_pure=True,
                                         pack=4).to(tl.float8e4nv, bitcast=True)
    elif PTX and WEIGHT_BITS == 4:
        return tl.inline_asm_elementwise(FIELD1_E4M3_ASM, "=r,r", [packed], dtype=tl.int8, is_pure=True,
                                         pack=4).to(tl.float8e4nv, bitcast=True)
    else:
        return (fp8_layer_codes(packed, field, WEIGHT_BITS).to(tl.float32) * E4M3_CODE_UNIT).to(tl.float8e4nv)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program pid's output tile (row block, column block) of a 1-D grid over an M x N output, GROUP_M row blocks
    at a time sweeping the columns (neighbouring programs share operand tiles in L2)."""
    num_pid_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * num_pid_n)) * GROUP_M
    group_size = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * num_pid_n)) % group_size, (pid % (GROUP_M * num_pid_n)) // group_size


@triton.jit
def _gate_row(gate_ptr, group, cols, col_ok, stride_gate_g, stride_gate_n):
    """One group's gate vector (a sample's adaLN gate) over the tile's columns, as fp32 [1, BLOCK_N]."""
    gate = tl.load(gate_ptr + group * stride_gate_g + cols * stride_gate_n, mask=col_ok, other=0.0)
    return gate.to(tl.float32)[None, :]


@triton.jit
def _gemm_tile(
    row_start, col_start,  # the output tile's first row and column
    a_ptr, b_ptr, out_ptr, a_scale_ptr, a_zero_ptr, b_scale_ptr, b_sum_ptr, bias_ptr, gate_ptr, residual_ptr,
    out_scale_ptr, out_zero_ptr, norm_weight_ptr, norm_bias_ptr, cos_ptr, sin_ptr, tail_gate_ptr, tail_residual_ptr,
    tail_out_ptr, M, N, K, rows_per_gate, head_tokens, tail_tokens, stride_am, stride_ak, stride_bn, stride_bk,
    stride_om, stride_on, stride_gate_g, stride_gate_n, stride_rm, stride_as, stride_bs, split_m, split_n,
    stride_om_outer, stride_on_outer, out_offset, norm_eps, rope_offset, HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr, BIAS_PER_ROW: tl.constexpr, HAS_GATE: tl.constexpr, GATE_PER_TILE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr, OUT_CODES: tl.constexpr, INT_ACC: tl.constexpr,
    WEIGHT_BITS: tl.constexpr, SPLIT_OUT: tl.constexpr, OUT_RUN: tl.constexpr, GATED: tl.constexpr,
    HEAD_NORM: tl.constexpr, ROPE: tl.constexpr, HEAD_DIM: tl.constexpr, ROW_PARTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FIELD_ACCUMULATORS: tl.constexpr,
    GROUP_K: tl.constexpr,
):
    """The output tile of BLOCK_M x BLOCK_N at (row_start, col_start) of `_gemm_kernel` (its parameters, described
    there)."""
    PER_BYTE: tl.constexpr = 8 // WEIGHT_BITS
    BLOCK_KP: tl.constexpr = BLOCK_K // PER_BYTE  # packed rows per step; each field covers BLOCK_KP values of K
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = col_start + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    tile_ok = row_ok[:, None] & col_ok[None, :]
    offs_m = rows % M
    offs_n = cols % N
    offs_k = tl.arange(0, BLOCK_KP)
    packed_k = K // PER_BYTE  # stored rows of b; field i of packed row j is K index i * packed_k + j
    groups = K // GROUP_K if GROUP_K else 1
    if PER_BYTE == 1:
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if GROUP_K else tl.int32 if INT_ACC else tl.float32)
        if GATED:
            acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if INT_ACC else tl.float32)
        for k_start in range(0, K, BLOCK_K):
            k_left = K - k_start
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if GROUP_K:  # (unpacked group-wise weights: this step lies in one group)
                group_scale = tl.load(b_scale_ptr + offs_n * groups + k_start // GROUP_K)
                part = tl.dot(a, b, out_dtype=tl.int32 if INT_ACC else tl.float32)
                acc += part.to(tl.float32) * group_scale[None, :]
            else:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32 if INT_ACC else tl.float32)
            if GATED:
                b_gate = tl.load(b_ptrs + N * stride_bn, mask=offs_k[:, None] < k_left, other=0.0)
                acc_gate = tl.dot(a, b_gate, acc_gate, out_dtype=tl.int32 if INT_ACC else tl.float32)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
    else:
        # packed weights: the product runs transposed (acc^T = W a^T), so that the unpacked codes are the left
        # operand, which the tensor cores read from registers: no trip through shared memory after the shifts
        a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_m[None, :] * stride_am  # [BLOCK_KP, BLOCK_M]
        b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_k[None, :] * stride_bk  # [BLOCK_N, BLOCK_KP]
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32 if GROUP_K else tl.int32 if INT_ACC else tl.float32)
        acc_odd = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32 if GROUP_K else tl.int32 if INT_ACC else tl.float32)
        for k_start in range(0, packed_k, BLOCK_KP):
            k_left = packed_k - k_start
            b = tl.load(b_ptrs, mask=offs_k[None, :] < k_left, other=0).to(tl.int8, bitcast=True)
            for field in tl.static_range(PER_BYTE):
                if INT_ACC:
                    codes = top_aligned_field(b, field, WEIGHT_BITS)
                else:
                    codes = unpack_field_e4m3(b, field, WEIGHT_BITS)
                a = tl.load(a_ptrs + field * packed_k * stride_ak, mask=offs_k[:, None] < k_left, other=0.0)
                if GROUP_K:  # this step's K range lies in one group
                    group = offs_n * groups + (field * packed_k + k_start) // GROUP_K
                    group_scale = tl.load(b_scale_ptr + group)
                    part = tl.dot(codes, a, out_dtype=tl.int32 if INT_ACC else tl.float32)
                    acc_t += part.to(tl.float32) * group_scale[:, None]
                elif FIELD_ACCUMULATORS == 2 and field % 2 == 1:
                    acc_odd = tl.dot(codes, a, acc_odd, out_dtype=tl.int32 if INT_ACC else tl.float32)
                else:
                    acc_t = tl.dot(codes, a, acc_t, out_dtype=tl.int32 if INT_ACC else tl.float32)
            a_ptrs += BLOCK_KP * stride_ak
            b_ptrs += BLOCK_KP * stride_bk
        acc = tl.trans(acc_t + acc_odd)
        if INT_ACC and GROUP_K:
            acc = acc * (1.0 / (1 << (8 - WEIGHT_BITS)))  # (exact: a power of two)
        elif INT_ACC:
            acc = acc >> (8 - WEIGHT_BITS)  # top-aligned codes: sums of c * 2^(8 - bits) products
        else:
            acc = acc * E4M3_CODES_PER_UNIT

    if HAS_ZERO and GROUP_K:  # a_zero times the sum over groups of b_scale * b_sum (the group scales are in acc)
        zero_term = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for group in range(0, groups):
            group_offsets = offs_n * groups + group
            zero_term += tl.load(b_scale_ptr + group_offsets) * tl.load(b_sum_ptr + group_offsets).to(tl.float32)
        a_zero = tl.load(a_zero_ptr + rows * stride_as, mask=row_ok, other=0)
        acc = acc - a_zero.to(tl.float32)[:, None] * zero_term[None, :]
    elif HAS_ZERO:
        a_zero = tl.load(a_zero_ptr + rows * stride_as, mask=row_ok, other=0)
        b_sum = tl.load(b_sum_ptr + cols, mask=col_ok, other=0)
        acc = acc - a_zero[:, None] * b_sum[None, :]
    a_scale = tl.load(a_scale_ptr + rows * stride_as, mask=row_ok, other=0.0)
    if GROUP_K:
        out = acc * a_scale[:, None]
    else:
        b_scale = tl.load(b_scale_ptr + cols * stride_bs, mask=col_ok, other=0.0)
        out = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if GATED:  # the gate half: weight rows N + cols
        if HAS_ZERO:
            acc_gate = acc_gate - a_zero[:, None] * tl.load(b_sum_ptr + N + cols, mask=col_ok, other=0)[None, :]
        gate_half = acc_gate.to(tl.float32) * a_scale[:, None] * tl.load(b_scale_ptr + (N + cols) * stride_bs,
                                                                         mask=col_ok, other=0.0)[None, :]
        if HAS_BIAS:
            gate_half += tl.load(bias_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS and BIAS_PER_ROW:  # the transposed product of `attention_operand_gemm` (rows: output channels)
        out += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    elif HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ROW_PARTS:  # each row's part and its row there
        token = rows % (head_tokens + tail_tokens)
        sample = rows // (head_tokens + tail_tokens)
        in_head = (token < head_tokens)[:, None]
        head_rows = sample * head_tokens + token
        tail_rows = sample * tail_tokens + token - head_tokens
    if HAS_GATE and GATE_PER_TILE:  # rows_per_gate >= BLOCK_M: the tile's rows belong to at most two groups
        first = row_start // rows_per_gate
        last = tl.minimum(row_start + BLOCK_M - 1, M - 1) // rows_per_gate
        in_first = ((rows // rows_per_gate) == first)[:, None]
        gates = tl.where(in_first, _gate_row(gate_ptr, first, cols, col_ok, stride_gate_g, stride_gate_n),
                         _gate_row(gate_ptr, last, cols, col_ok, stride_gate_g, stride_gate_n))
        if ROW_PARTS:
            gates = tl.where(in_head, gates, tl.where(
                in_first, _gate_row(tail_gate_ptr, first, cols, col_ok, stride_gate_g, stride_gate_n),
                _gate_row(tail_gate_ptr, last, cols, col_ok, stride_gate_g, stride_gate_n)))
        out = out * gates
    elif HAS_GATE and ROW_PARTS:  # each row loads its own part's gate (as the concat prologue its modulation)
        out = out * (load_per_group(gate_ptr, rows, cols, tile_ok & in_head, rows_per_gate, stride_gate_g,
                                    stride_gate_n)
                     + load_per_group(tail_gate_ptr, rows, cols, tile_ok & ~in_head, rows_per_gate, stride_gate_g,
                                      stride_gate_n))
    elif HAS_GATE:
        out = out * load_per_group(gate_ptr, rows, cols, tile_ok, rows_per_gate, stride_gate_g, stride_gate_n)
    if HAS_RESIDUAL and ROW_PARTS:  # each row from its part's residual (rows of both strided alike)
        residual_ptrs = tl.where(in_head, residual_ptr + head_rows[:, None] * stride_rm,
                                 tail_residual_ptr + tail_rows[:, None] * stride_rm) + cols[None, :]
        out += tl.load(residual_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    elif HAS_RESIDUAL:  # residual rows: strided like the output's, contiguous along N (loading it before the K
        # loop was no faster on an H100: gpu-bench-h100/epilogue-sweep-prefetch.json)
        out += tl.load(residual_ptr + rows[:, None] * stride_rm + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    if GATED:
        out = out * apply_activation(gate_half, ACT)
    else:
        out = apply_activation(out, ACT)
    if HEAD_NORM:  # RMSNorm / LayerNorm over each head's channels, affine per channel
        heads = tl.reshape(out, (BLOCK_M, BLOCK_N // HEAD_DIM, HEAD_DIM))
        if HEAD_NORM == 2:
            heads = heads - (tl.sum(heads, axis=2) / HEAD_DIM)[:, :, None]
        inverse_rms = tl.rsqrt((tl.sum(heads * heads, axis=2) / HEAD_DIM + norm_eps).to(tl.float32))  # (fp64 traced)
        out = tl.reshape(heads * inverse_rms[:, :, None], (BLOCK_M, BLOCK_N))
        out = out * tl.load(norm_weight_ptr + cols % HEAD_DIM, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HEAD_NORM == 2:
            out += tl.load(norm_bias_ptr + cols % HEAD_DIM, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ROPE:  # rotary embedding: channel pairs (2i, 2i + 1) -> x * cos + (-x[2i + 1], x[2i]) * sin
        table = (rope_offset + rows % split_m)[:, None] * HEAD_DIM + (cols % HEAD_DIM)[None, :]
        cos = tl.load(cos_ptr + table, mask=tile_ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + table, mask=tile_ok, other=0.0).to(tl.float32)
        real, imaginary = tl.split(tl.reshape(out, (BLOCK_M, BLOCK_N // 2, 2)))
        out = out * cos + tl.reshape(tl.join(-imaginary, real), (BLOCK_M, BLOCK_N)) * sin
    if OUT_CODES == 1:  # asymmetric int8, as fxquant::quantize_per_tensor
        zero = tl.load(out_zero_ptr).to(tl.float32)
        out = tl.minimum(tl.maximum(rint(out * tl.div_rn(1.0, tl.load(out_scale_ptr))) + zero, -128.0), 127.0)
    elif OUT_CODES == 2:  # fp8 e4m3, as fxquant::quantize_per_tensor_fp8
        out = e4m3_grid(tl.minimum(tl.maximum(out * tl.div_rn(1.0, tl.load(out_scale_ptr)), -FP8_MAX), FP8_MAX))
    if ROW_PARTS:
        out_ptrs = tl.where(in_head, out_ptr + head_rows[:, None] * stride_om,
                            tail_out_ptr + tail_rows[:, None] * stride_om) + cols[None, :] * stride_on
    elif SPLIT_OUT:  # OUT_RUN: columns come in aligned runs of this many contiguous elements (vectorised stores)
        row_offsets = (rows // split_m) * stride_om_outer + (rows % split_m) * stride_om
        col_offsets = (cols // split_n) * stride_on_outer + (cols % split_n) * stride_on
        col_offsets = tl.max_contiguous(tl.multiple_of(col_offsets, OUT_RUN), OUT_RUN)
        out_ptrs = out_ptr + out_offset + row_offsets[:, None] + col_offsets[None, :]
    else:
        out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _gemm_kernel(
    # pointers
    a_ptr, b_ptr, out_ptr, a_scale_ptr, a_zero_ptr, b_scale_ptr, b_sum_ptr, bias_ptr, gate_ptr, residual_ptr,
    out_scale_ptr, out_zero_ptr, norm_weight_ptr, norm_bias_ptr, cos_ptr, sin_ptr,
    tail_gate_ptr, tail_residual_ptr, tail_out_ptr,
    # sizes (K: logical, before packing; ROW_PARTS: a sample's rows are head_tokens, then tail_tokens)
    M, N, K, rows_per_gate, head_tokens, tail_tokens,
    # rows [0, main_rows) in BLOCK_M x BLOCK_N tiles, the rest (FILL_M > 0) in FILL_M x FILL_N ones, whose programs
    # follow the main tiles' and spread the last wave's work over more SMs
    main_rows,
    # strides (b's in its stored, possibly packed, units; stride_as / stride_bs: a_scale and a_zero / b_scale, 0
    # where one value serves every row / column: a static scale, read without an expanded copy)
    stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on, stride_gate_g, stride_gate_n, stride_rm,
    stride_as, stride_bs,
    # SPLIT_OUT: out[m, n] is stored at out_offset + (m // split_m) * stride_om_outer + (m % split_m) * stride_om
    #                                              + (n // split_n) * stride_on_outer + (n % split_n) * stride_on
    split_m, split_n, stride_om_outer, stride_on_outer, out_offset,
    # HEAD_NORM / ROPE: row m is token rope_offset + m % split_m of the rotary tables cos / sin [tokens, HEAD_DIM]
    norm_eps, rope_offset,
    # meta-parameters
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_PER_ROW: tl.constexpr, HAS_GATE: tl.constexpr,
    GATE_PER_TILE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr, OUT_CODES: tl.constexpr,
    INT_ACC: tl.constexpr, WEIGHT_BITS: tl.constexpr, SPLIT_OUT: tl.constexpr, OUT_RUN: tl.constexpr,
    GATED: tl.constexpr,  # b has 2N rows: out = act(second half's product) times the first half's (8-bit b only)
    # per head of HEAD_DIM channels (a tile holds whole heads): HEAD_NORM 1 RMSNorm (weight), 2 LayerNorm (weight,
    # bias); ROPE: rotary embedding
    HEAD_NORM: tl.constexpr, ROPE: tl.constexpr, HEAD_DIM: tl.constexpr,
    # rows (sample, token) split into two token parts, each with its own gate, residual and output (CogVideoX's
    # text / video rows): the head's are gate_ptr / residual_ptr / out_ptr, the tail's tail_*; rows_per_gate is the
    # sample's token count
    ROW_PARTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    # packed K loop: the fields' products alternate between two accumulators, so that one field's MMAs run while the
    # next field is unpacked (with one, each waits for the previous MMA; 1: benchmarks compare). No default value:
    # torch's mutation analysis of traced launches fills none in (it would then copy every argument per call)
    FIELD_ACCUMULATORS: tl.constexpr,
    # group-wise weight scales: b_scale and b_sum are [N, K / GROUP_K]; each K step (a packed field's, or an 8-bit
    # step of unpacked codes; within one group: the launcher's BLOCK_K) is its own product, scaled per output channel
    # into an fp32 accumulator; 0: per-channel scales
    GROUP_K: tl.constexpr,
    FILL_M: tl.constexpr, FILL_N: tl.constexpr,
):
    pid = tl.program_id(0)
    if not FILL_M:  # (main_rows is M)
        main_rows = M
    main_programs = tl.cdiv(main_rows, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    if FILL_M and pid >= main_programs:  # (FILL_M 0: the branch is not compiled)
        pid_m, pid_n = grouped_tile(pid - main_programs, M - main_rows, N, FILL_M, FILL_N, GROUP_M)
        _gemm_tile(main_rows + pid_m * FILL_M, pid_n * FILL_N, a_ptr, b_ptr, out_ptr, a_scale_ptr, a_zero_ptr,
                   b_scale_ptr, b_sum_ptr, bias_ptr, gate_ptr, residual_ptr, out_scale_ptr, out_zero_ptr,
                   norm_weight_ptr, norm_bias_ptr, cos_ptr, sin_ptr, tail_gate_ptr, tail_residual_ptr, tail_out_ptr,
                   M, N, K, rows_per_gate, head_tokens, tail_tokens, stride_am, stride_ak, stride_bn, stride_bk,
                   stride_om, stride_on, stride_gate_g, stride_gate_n, stride_rm, stride_as, stride_bs, split_m,
                   split_n, stride_om_outer, stride_on_outer, out_offset, norm_eps, rope_offset, HAS_ZERO, HAS_BIAS,
                   BIAS_PER_ROW, HAS_GATE, GATE_PER_TILE, HAS_RESIDUAL, ACT, OUT_CODES, INT_ACC, WEIGHT_BITS,
                   SPLIT_OUT, OUT_RUN, GATED, HEAD_NORM, ROPE, HEAD_DIM, ROW_PARTS, FILL_M, FILL_N, BLOCK_K,
                   FIELD_ACCUMULATORS, GROUP_K)
    else:
        pid_m, pid_n = grouped_tile(pid, main_rows, N, BLOCK_M, BLOCK_N, GROUP_M)
        _gemm_tile(pid_m * BLOCK_M, pid_n * BLOCK_N, a_ptr, b_ptr, out_ptr, a_scale_ptr, a_zero_ptr, b_scale_ptr,
                   b_sum_ptr, bias_ptr, gate_ptr, residual_ptr, out_scale_ptr, out_zero_ptr, norm_weight_ptr,
                   norm_bias_ptr, cos_ptr, sin_ptr, tail_gate_ptr, tail_residual_ptr, tail_out_ptr, M, N, K,
                   rows_per_gate, head_tokens, tail_tokens, stride_am, stride_ak, stride_bn, stride_bk, stride_om,
                   stride_on, stride_gate_g, stride_gate_n, stride_rm, stride_as, stride_bs, split_m, split_n,
                   stride_om_outer, stride_on_outer, out_offset, norm_eps, rope_offset, HAS_ZERO, HAS_BIAS,
                   BIAS_PER_ROW, HAS_GATE, GATE_PER_TILE, HAS_RESIDUAL, ACT, OUT_CODES, INT_ACC, WEIGHT_BITS, SPLIT_OUT,
                   OUT_RUN, GATED, HEAD_NORM, ROPE, HEAD_DIM, ROW_PARTS, BLOCK_M, BLOCK_N, BLOCK_K, FIELD_ACCUMULATORS,
                   GROUP_K)


_autotuned_gemm_kernel = triton.autotune(configs=get_autotune_config(),
                                        key=["M", "N", "K", "HAS_ZERO", "WEIGHT_BITS", "GATED"])(_gemm_kernel)


@triton.jit
def _unpack_kernel(packed_ptr, out_ptr, N, PACKED_K, stride_pn, WEIGHT_BITS: tl.constexpr, E4M3: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr):
    """packed uint8 [N, PACKED_K] (fxquant.quantizer.pack_bits) -> int8 codes [N, PACKED_K * 8 / WEIGHT_BITS], or
    (E4M3: an fp8 layer's codes, fxquant.quantizer.unpack_fp8_layer_codes) their float8 e4m3 values."""
    PER_BYTE: tl.constexpr = 8 // WEIGHT_BITS
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_KP + tl.arange(0, BLOCK_KP)
    mask = (rows < N)[:, None] & (cols < PACKED_K)[None, :]
    b = tl.load(packed_ptr + rows[:, None] * stride_pn + cols[None, :], mask=mask, other=0).to(tl.int8, bitcast=True)
    for field in tl.static_range(PER_BYTE):
        if E4M3:
            codes = fp8_layer_codes(b, field, WEIGHT_BITS).to(tl.float32).to(tl.float8e4nv)
        else:
            codes = unpack_field(b, field, WEIGHT_BITS)
        tl.store(out_ptr + rows[:, None] * (PACKED_K * PER_BYTE) + field * PACKED_K + cols[None, :], codes, mask=mask)


def unpack_weights(packed: torch.Tensor, weight_bits: int, traced: bool = False,
                   dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """uint8 [N, K * weight_bits / 8] packed codes (last dim contiguous) -> int8 [N, K], as
    fxquant.quantizer.unpack_bits, or (dtype float8_e4m3fn: an fp8 layer's layout, as
    fxquant.quantizer.unpack_fp8_layer_codes) the codes' e4m3 values; traced: launched through
    torch.library.wrap_triton."""
    assert packed.dtype == torch.uint8 and packed.dim() == 2 and packed.stride(1) == 1 and weight_bits in (4, 2), \
        f"packed weights {packed.dtype} {tuple(packed.shape)} at {weight_bits} bits"
    n, packed_k = packed.shape
    out = torch.empty((n, packed_k * 8 // weight_bits), dtype=dtype, device=packed.device)
    block_n, block_kp = (32, 32) if INTERPRET else (32, 256)
    grid = (ceil_div(n, block_n), ceil_div(packed_k, block_kp))
    launcher(_unpack_kernel, traced)[grid](packed, out, n, packed_k, packed.stride(0), WEIGHT_BITS=weight_bits,
                                           E4M3=dtype == torch.float8_e4m3fn, BLOCK_N=block_n, BLOCK_KP=block_kp)
    return out


# tiles stepped down to when a problem gives the chosen tile fewer programs than the GPU has SMs (an H100: 132), or
# when its K-loop buffers exceed the shared memory a program may hold (an H100: 227 KB; sm_89 cards: 99 KB)
SM_COUNT = 132
_SMALLER_TILES = [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
                  dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
                  dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=3)]


def _programs(config: dict, m: int, n: int, main_rows: int | None = None) -> int:
    """Programs of an m x n output in config's tiles; with main_rows < m, only rows [0, main_rows) in them and the
    rest in its FILL_M x FILL_N fill tiles."""
    main_rows = m if main_rows is None else main_rows
    fill = ceil_div(m - main_rows, config["FILL_M"]) * ceil_div(n, config["FILL_N"]) if main_rows < m else 0
    return ceil_div(main_rows, config["BLOCK_M"]) * ceil_div(n, config["BLOCK_N"]) + fill


def fill_main_rows(config: dict, m: int, n: int, sm_count: int) -> int:
    """The rows config's main tiles cover: all m without fill tiles (FILL_M), else the row blocks of its full waves
    over sm_count SMs (the fill tiles take the rest, spreading the last wave's work over more, smaller programs)."""
    if not config.get("FILL_M"):
        return m
    column_blocks = ceil_div(n, config["BLOCK_N"])
    full_waves = _programs(config, m, n) // sm_count
    return min(m, (full_waves * sm_count // column_blocks) * config["BLOCK_M"])


@functools.cache
def device_limits(index: int) -> tuple[int, int]:
    """(SM count, bytes of shared memory a program may hold) of CUDA device `index`, as Triton's driver reads them."""
    properties = triton.runtime.driver.active.utils.get_device_properties(index)
    return properties["multiprocessor_count"], properties["max_shared_mem"]


def pipeline_bytes(config: dict, gated: bool = False) -> int:
    """Shared memory of the K loop's software pipeline: num_stages copies of the activation tile and the weight tile
    (gated: two), one byte per 8-bit code (packed weights need less: an upper bound). Equals what Triton 3.6
    allocates for the 8-bit kernels at sm_90 (kernel-ir-sm90.json: 96 KB at 128 x 128 x 128 / 3 stages, 144 KB
    gated)."""
    weight_tiles = 2 if gated else 1
    return config["num_stages"] * config["BLOCK_K"] * (config["BLOCK_M"] + weight_tiles * config["BLOCK_N"])


def _area(config: dict) -> int:
    return config["BLOCK_M"] * config["BLOCK_N"]


_WIDE_TILE = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
# work per unit time of a 128 x 256 (or 256 x 128) tile against a 128 x 128 one: PixArt's 8192 x 1152 x 1152 runs
# as fast in 3 waves of the wide tile as in 5 of the narrow one (epilogue-sweep-and-prologue.json: 29.3 / 29.5 us)
LARGE_TILE_EFFICIENCY = 1.2


def fill_tiles(m: int, n: int, sm_count: int) -> dict | None:
    """{FILL_M, FILL_N} where 128 x 128 tiles over an m x n output make one or two full waves over sm_count SMs and a
    last wave at most half full, else None. Those rows then take 64 x 64 tiles after one full wave, 64 x 128 after
    two, measured fastest at SDXL's fp8 GEMMs on an H100 (gpu-bench-h100/sdxl-gemm-tiles-s35.json; M x K -> N, us
    with these fill tiles against the plain 128 x 128 tile / the rule's tile before): 2048 x 1280 -> 1280 (160
    programs, 1.21 waves) 9.0 against 11.2 / 11.4, 2048 x 5120 -> 1280 24.3 against 29.7 / 28.2, 8192 x 640 -> 640
    (320 programs, 2.42 waves) 12.0 against 12.7 / 12.7, 8192 x 2560 -> 640 29.2 against 29.7 / 31.7; not where the
    last wave is nearly full (SDXL's GEGLU products: 640 programs, 4.85 waves, 67.4 against 64.9)."""
    programs = _programs(_SMALLER_TILES[0], m, n)
    full_waves, left = divmod(programs, sm_count)
    if full_waves not in (1, 2) or not 0 < left <= sm_count // 2:
        return None
    return dict(FILL_M=64, FILL_N=64 if full_waves == 1 else 128)


def _wave_time(config: dict, m: int, n: int, sm_count: int) -> float:
    """Relative time of a GEMM on `config`'s tiles: full waves of programs over the SMs, each as long as a tile's area
    over its efficiency (LARGE_TILE_EFFICIENCY for tiles larger than 128 x 128)."""
    efficiency = LARGE_TILE_EFFICIENCY if _area(config) > _area(_SMALLER_TILES[0]) else 1.0
    return ceil_div(_programs(config, m, n), sm_count) * _area(config) / efficiency


def fixed_config(m: int, n: int, k: int, integer: bool, residual: bool = False, packed: bool = False,
                 gated: bool = False, limits: tuple[int, int] | None = None) -> dict:
    """`_fixed_config`, a new dict per call, the rules evaluated once per problem (every eager launch asks; the
    interpreter flag is part of the key: tests switch it)."""
    return dict(_fixed_config(m, n, k, integer, residual, packed, gated, limits, INTERPRET))


@functools.cache
def _fixed_config(m: int, n: int, k: int, integer: bool, residual: bool, packed: bool, gated: bool,
                  limits: tuple[int, int] | None, interpret: bool) -> dict:
    """fixed_config_for_size (below; packed K-loop tiles as it picks them), traded between 128 x 128 and a larger
    tile (128 x 256 / 256 x 128) where the other takes less time by `_wave_time` (fp8 only for 128 x 128 ->
    128 x 256, and not with a residual epilogue, whose fastest tile was measured; on an H200,
    gpu-bench-h200/sdxl-gemm-tiles.json: SDXL's 8192 x 640 x 640 narrow,
    320 programs in 3 waves against 192 in 2, 445 -> 538 TFLOP/s; its 2048 x 1280 x 1280 and 2048 x 5120 x 1280 wide,
    80 programs in one wave against 160 in two, 589 -> 605 and 877 -> 944; all three take fill tiles now, below); a
    128 x 128 tile is stepped down through _SMALLER_TILES while it leaves SMs idle: few rows AND few columns, e.g. the
    transposed V products of short text parts (SD3's 333 text tokens: M 1536 channels, N 672 keys, 36 wide tiles;
    PixArt's 120-token cross-attention: M 1152, N 256, 9 tiles: gpu-bench-h100/operand-parts-tile-step-down.json,
    SD3's text V part 19.4 -> 15.3 us).
    Gated (GEGLU) products hold two accumulators and read two weight tiles per step: at most 128 columns (untimed).
    fp8 GEMMs whose 128 x 128 tiles make one or two full waves and a last one at most half full take those tiles
    over the full waves and fill tiles over the rest (`fill_tiles`).
    limits: `device_limits` of the GPU (default: an H100's SM count, no shared-memory check); where the pipeline does
    not fit, fewer stages (down to 2), then smaller tiles (untimed: no such GPU here)."""
    sm_count, shared = limits or (SM_COUNT, None)
    config = fixed_config_for_size(m, n, k, integer, residual, packed)
    narrow = _SMALLER_TILES[0]
    if gated and config["BLOCK_N"] > 128:
        config = narrow
    fill = fill_tiles(m, n, sm_count) if not (integer or packed or gated) and _area(config) >= _area(narrow) else None
    if fill:  # (the kernel's shared memory is then the 128 x 128 tile's: kernel-ir-sm90.json)
        config = {**narrow, **fill}
    elif not packed:  # the packed K loop's tiles are taken as measured
        candidates = [config]  # the first of equal wave times wins
        if _area(config) > _area(narrow):
            candidates.append(narrow)
        elif _area(config) == _area(narrow) and not (integer or residual or gated):
            candidates.append(_WIDE_TILE)
        config = min(candidates, key=lambda tile: _wave_time(tile, m, n, sm_count))
        for smaller in _SMALLER_TILES[1:]:
            if _programs(config, m, n) >= sm_count or _area(config) > _area(narrow):
                break
            if _area(smaller) < _area(config):
                config = smaller
    if shared is None or pipeline_bytes(config, gated) <= shared:
        return config
    fitting = [{**tile, "num_stages": stages}
               for tile in [config] + [tile for tile in _SMALLER_TILES if _area(tile) < _area(config)]
               for stages in range(tile["num_stages"], 1, -1)]
    return next((tile for tile in fitting if pipeline_bytes(tile, gated) <= shared), fitting[-1])


def fixed_config_for_size(m: int, n: int, k: int, integer: bool, residual: bool = False, packed: bool = False) -> dict:
    """The tile config of graphs traced by the compile backend, from the problem size (Inductor would otherwise
    autotune every call site: minutes of compile for a 28-block DiT). From H100 measurements in
    benchmarks/results/gpu-bench-h100/:
    - plain GEMMs: the autotuner's choices at DiT shapes (gemm-autotuned-configs-and-pixart-1024-fp8.json); fp8 at
      >= 16384 tokens (CogVideoX-2B's 35552) takes the wide tile also for K > 2048 (model-gemm-tiles.json: 1195
      against 1106 TFLOP/s at K 7680, N 1920; at 8192-8858 tokens the narrow one stays 1-5 % ahead), and a tall
      256 x 128 tile for its 1920 x 1920 projections (1020 against 1002 TFLOP/s);
    - a residual in the epilogue: the fastest tile of the epilogue sweep (epilogue-sweep-and-prologue.json);
    - an activation + quantization in the epilogue: as plain GEMMs (kernels-epilogue-tanh-approx.json: PixArt's
      first feed-forward GEMM 104.2 us wide against 110.4 narrow; model-gemm-tiles.json: SD3's 3 % faster);
    - packed weights unpacked in the K loop at <= 16 tokens (a batch's adaLN linears): one 16-row tile, so that the
      weights are read once (packed-tiles-cold-l2.json: 8.5 / 8.6 / 25.0 us against 9.7 / 9.8 / 27.8 with 64 rows),
      4 stages against fp8 activations (packed-tiles-sign-magnitude.json: 11.6 / 5.2 / 4.8 us against 12.1 / 5.5 /
      5.1 with 3); up to 64 tokens 16 rows as well for weights smaller than 1152 x 4608, else 32 (1152 x 4608 at 64
      tokens: 7.4 / 7.3 us fp8 / int8 against 7.7 / 7.9 with 16 rows; Flux's 3072 x 12288: 15.9 / 15.6 against
      25.1 / 26.6);
      more tokens (fp8 activations, up to UNPACK_MIN_TOKENS_FP8): a 128 x 128 tile, the weights unpacked at most
      every 128 tokens, where it makes >= 66 programs (256 tokens: Flux's 42.4 us, 1152 x 4608 13.4 against 45.6 /
      14.8 with 64 x 64), else 64 x 64 (1152 x 1152: 7.6 us against 12.8);
    - 8-bit weights at fewer than 1024 tokens (a text stream, cross-attention K / V, a small image): 64-row tiles,
      128-deep steps (K = 1152 / 1536 / 3072 are whole steps), 128 columns from N = 3072 on, below that 64 x 64 x 256
      where K >= 4 N (gpu-bench-h200/few-token-tiles-h200.json, weights read from memory, fp8 / int8 alike: Flux's text
      stream at 512 tokens 18.4 / 59.7 / 58.1 -> 13.0 / 41.5 / 40.5 us, SD3's context feed-forward at 666 tokens
      25.0 -> 17.5, PixArt's 1152 -> 4608 at 256 tokens 10.6 -> 8.2; the K >= 4 N ones, 4608 -> 1152 and 6144 ->
      1536, already fastest at 64 x 64 x 256).
    """
    if INTERPRET:
        return {**get_autotune_config()[0].all_kwargs()}
    if packed and m <= 64:
        rows = 16 if m <= 16 or n * k < 1152 * 4608 else 32
        stages = 4 if rows == 16 and not integer else 3
        return dict(BLOCK_M=rows, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=stages)
    if packed and not integer:  # (int8 activations: 48.1 us at Flux's against 45.6 with 64 x 64)
        wide = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=256, GROUP_M=8, num_warps=8, num_stages=3)
        if _programs(wide, m, n) >= SM_COUNT // 2:
            return wide
    if m < 1024:  # few tokens: small tiles so that enough programs fill the SMs (see the docstring)
        if packed or (n < 3072 and k >= 4 * n):
            return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=3)
        return dict(BLOCK_M=64, BLOCK_N=128 if n >= 3072 else 64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    if residual:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    if not integer and m >= 16384 and n < 2048 and k <= 2048:  # tall and narrow: the tall tile
        return dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    if n >= 2048 or (not integer and (k <= 2048 or m >= 16384)):
        return _WIDE_TILE
    if k <= 2048:  # int8, narrow N: more, smaller tiles
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)


def quantized_gemm(a: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor | None, b: torch.Tensor,
                   b_scale: torch.Tensor, b_sum: torch.Tensor | None, bias: torch.Tensor | None,
                   out_dtype: torch.dtype, weight_bits: int = 8, traced: bool = False,
                   gate: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                   activation: str = "none", out_scale: torch.Tensor | None = None,
                   out_zero: torch.Tensor | None = None, config: dict | str | None = None,
                   gate_per_tile: bool | None = None, unpack_first: bool | None = None,
                   out: torch.Tensor | None = None, split_out: tuple | None = None,
                   bias_per_row: bool = False, head_norm: tuple | None = None,
                   rope: tuple | None = None, tail: tuple | None = None):
    """a [M, K] int8 or fp8, a_scale fp32 [M] or [1] (broadcast), a_zero int32 like a_scale or None; b [N, K] same
    dtype as a, or (weight_bits 4 / 2) uint8 [N, K * weight_bits / 8] packed codes; b_scale fp32 [N], b_sum
    int32 [N] (needed with a_zero); bias [N] or None -> out [M, N]. Group-wise weights: b_scale and b_sum [N, G],
    one per run of K / G inputs (each K step then lies in one group: BLOCK_K at most the largest power of two
    dividing the group and, packed, a field's range of K; no GEGLU).
    With residual [..., N] (M rows): out = residual + gate * out, shaped and typed like residual; gate (optional)
    broadcasts against residual varying at most per sample (fxquant::linear_residual). With tail = (tail_gate,
    tail_residual): a's rows are samples of two token parts, residual [B, T_head, N] and tail_residual [B, T_tail,
    N], each with its own gate (or both None); returns (head out, tail out) shaped like the residuals
    (fxquant::linear_residual_parts).
    activation ("gelu" | "gelu_tanh" | "silu") is applied last; "geglu" | "geglu_tanh": b holds 2N rows (and
    b_scale, b_sum, bias 2N values) and out [M, N] = first half's product * gelu(second half's), as diffusers' GEGLU
    after its projection. With out_scale fp32 [1] the output is quantized: int8 codes with out_zero int32 [1], else
    fp8 e4m3 codes (fxquant::linear_activation_quantize).

    The tile is `config` when given (benchmarks; "autotune": the autotuner's pick for this problem), else
    `fixed_config`'s. traced: launch through torch.library.wrap_triton (graphs the compile backend hands to
    Inductor). gate_per_tile (benchmarks): load the gate as one vector per sample in a tile (default: when every
    tile size fits in a sample) or per element. unpack_first (benchmarks): packed weights are unpacked into an int8
    copy before the GEMM (`unpack_weights`; default: from UNPACK_MIN_TOKENS rows of int8 a on, UNPACK_MIN_TOKENS_FP8
    of fp8 a; group-wise weights against fp8 a from UNPACK_MIN_TOKENS below GROUPED_FP8_UNPACK_MAX_TOKENS) or in its
    K loop.

    out / split_out / bias_per_row (`attention_operand_gemm`): the output buffer, written at the kernel's SPLIT_OUT
    offsets (split_out = (split_m, stride_om_outer, stride_om, split_n, stride_on_outer, stride_on, out_run,
    out_offset)), and the product transposed (a: weights, b: activations): the bias indexed by row, b_scale [1]
    (broadcast) or one per row of b. head_norm = ("rms" | "layer", weight [D], bias [D] or None, eps) and rope =
    (cos [T, D], sin [T, D], token offset), with split_out's split_n = D (heads of D channels along N): each head's
    output is normalised (a LayerNorm takes a bias), then rotated as the token at offset + row % split_m of the
    tables (Flux's / CogVideoX's q / k)."""
    packed = weight_bits != 8
    assert weight_bits in (8, 4, 2), f"weight_bits {weight_bits}"
    assert a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1] * 8 // weight_bits, \
        f"shapes {tuple(a.shape)} x {tuple(b.shape)} at {weight_bits} weight bits"
    operands_ok = a.dtype in (torch.int8, torch.float8_e4m3fn) and b.dtype == (torch.uint8 if packed else a.dtype)
    assert operands_ok, f"operand dtypes {a.dtype}, {b.dtype} at {weight_bits} weight bits"
    assert (a_zero is None) or (b_sum is not None), "a zero point needs the weight row sums b_sum"
    assert out_scale is None or residual is None, "a quantized output takes no residual"
    assert tail is None or (residual is not None and split_out is None and out is None), "parts need residuals"
    assert activation in ACTIVATION_CODES, f"activation {activation!r}"
    gated = activation.startswith("geglu")
    assert not gated or (b.shape[0] % 2 == 0 and residual is None and split_out is None), \
        f"a gated activation needs an even number of weight rows ({b.shape[0]}), no residual and no split output"
    m, k = a.shape
    n = b.shape[0] // 2 if gated else b.shape[0]
    groups = scale_groups(b_scale)
    group_k = k // groups if groups else 0
    assert not group_k or (not gated and not bias_per_row and b_scale.shape == (n, k // group_k) and (
        b_sum is None or b_sum.shape == b_scale.shape)), \
        f"group-wise scales {tuple(b_scale.shape)} for {n} x {k} weights, no GEGLU, no transposed product"
    if group_k and a.dtype != torch.int8:
        unpack_by_size = UNPACK_MIN_TOKENS <= m < GROUPED_FP8_UNPACK_MAX_TOKENS
    else:
        unpack_by_size = m >= (UNPACK_MIN_TOKENS if a.dtype == torch.int8 else UNPACK_MIN_TOKENS_FP8)
    if packed and (gated or (unpack_first if unpack_first is not None else unpack_by_size)):
        b, weight_bits = unpack_weights(b, weight_bits, traced, a.dtype), 8
    tail_gate, tail_residual = tail or (None, None)
    if residual is not None:
        rows_shape = residual.shape if tail is None else (residual.shape[0], residual.shape[1] + tail_residual.shape[1],
                                                          n)
        assert residual.shape[-1] == n and math.prod(rows_shape) == m * n, \
            f"residual {tuple(residual.shape)} for a [{m}, {n}] output"
        out_dtype, out_shape, residual = residual.dtype, residual.shape, row_strided(residual)
    if tail is not None:
        assert (gate is None) == (tail_gate is None), "both parts gated, or neither"
        residual, tail_residual = _strided_alike(residual, row_strided(tail_residual), (-2,))
        gate, tail_gate = _strided_alike(gate, tail_gate, (0, -1))
    if out_scale is not None:
        out_dtype = torch.int8 if out_zero is not None else torch.float8_e4m3fn
    if out is None:
        out = torch.empty((m if tail is None else out_shape[:-1].numel(), n), dtype=out_dtype, device=a.device)
    tail_out = torch.empty_like(tail_residual, memory_format=torch.contiguous_format) if tail is not None else None
    if m == 0:
        return out if residual is None else out.view(out_shape) if tail is None else (out.view(out_shape), tail_out)
    a_scale, stride_as = _scales(a_scale, m)  # (the transposed product's activations: b_scale may be one value)
    if group_k:
        b_scale, stride_bs = b_scale.float().contiguous(), 0
        b_sum = b_sum.contiguous() if b_sum is not None else None
    else:
        b_scale, stride_bs = _scales(b_scale, n * (2 if gated else 1))
    split_m, stride_om_outer, stride_om, split_n, stride_on_outer, stride_on, out_run, out_offset = split_out or (
        m, 0, out.stride(0), n, 0, out.stride(1), 1, 0)
    if a_zero is not None:
        a_zero, zero_stride = _scales(a_zero, m)
        assert zero_stride == stride_as, "a_scale and a_zero: both per row, or both one value"
    dummy = b_scale  # never read when the matching constexpr flag is off
    gate_arg, rows_per_gate, stride_gate_g, stride_gate_n = per_group_operand(
        gate, rows_shape if residual is not None else (m, n), m, dummy)
    head_dim = split_n if head_norm is not None or rope is not None else 1
    assert head_dim == 1 or not bias_per_row, "per-head transforms need heads along N"
    norm, norm_weight, norm_bias, norm_eps = head_norm or ("none", dummy, None, 0.0)
    assert (norm == "layer") == (norm_bias is not None), "a LayerNorm of heads takes a bias, an RMSNorm none"
    cos, sin, rope_offset = rope or (dummy, dummy, 0)
    parts_pointers, parts_tokens = ((dummy,) * 3, (0, 0)) if tail is None else (
        (tail_gate if tail_gate is not None else dummy, tail_residual, tail_out), (out_shape[1], tail_residual.shape[1]))

    assert config is None or config == "autotune" or isinstance(config, dict), f"config {config!r}"
    main_rows = m
    if config != "autotune":
        limits = device_limits(a.device.index if a.device.index is not None else torch.cuda.current_device()) \
            if a.is_cuda else None
        if config is None:
            config = fixed_config(m, n, k, a.dtype == torch.int8, residual is not None, weight_bits != 8, gated,
                                  limits)
        if config["BLOCK_N"] % head_dim:  # per-head transforms need a tile of whole heads
            config = {**config, "BLOCK_N": head_dim}
        if config.get("FILL_N", 0) % head_dim:  # (fill tiles too, else none)
            config = {key: value for key, value in config.items() if key not in ("FILL_M", "FILL_N")}
        if group_k:  # K steps within one group
            config = {**config, "BLOCK_K": min(config["BLOCK_K"], group_step(group_k, b.shape[1], weight_bits))}
        main_rows = fill_main_rows(config, m, n, limits[0] if limits else SM_COUNT)
    args = (a, b, out, a_scale, a_zero if a_zero is not None else dummy, b_scale,
            b_sum if b_sum is not None else dummy, bias if bias is not None else dummy, gate_arg,
            residual if residual is not None else dummy, out_scale if out_scale is not None else dummy,
            out_zero if out_zero is not None else dummy, norm_weight, norm_bias if norm_bias is not None else dummy,
            cos, sin, *parts_pointers, m, n, k, rows_per_gate, *parts_tokens, main_rows,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), stride_om, stride_on,
            stride_gate_g, stride_gate_n, residual.stride(-2) if residual is not None and residual.dim() > 1 else n,
            stride_as, stride_bs,
            split_m, split_n, stride_om_outer, stride_on_outer, out_offset, norm_eps, rope_offset)
    if gate_per_tile is None:
        gate_per_tile = rows_per_gate >= MAX_BLOCK_M
    flags = dict(HAS_ZERO=a_zero is not None, HAS_BIAS=bias is not None, BIAS_PER_ROW=bias_per_row,
                 HAS_GATE=gate is not None, GATE_PER_TILE=gate_per_tile, HAS_RESIDUAL=residual is not None,
                 ACT=ACTIVATION_CODES[activation], OUT_CODES=0 if out_scale is None else 1 if out_zero is not None
                 else 2, INT_ACC=a.dtype == torch.int8, WEIGHT_BITS=weight_bits, SPLIT_OUT=split_out is not None,
                 OUT_RUN=out_run, GATED=gated, HEAD_NORM=("none", "rms", "layer").index(norm), ROPE=rope is not None,
                 HEAD_DIM=head_dim, ROW_PARTS=tail is not None, FIELD_ACCUMULATORS=1 if group_k else 2,
                 GROUP_K=group_k, FILL_M=0, FILL_N=0)
    if config == "autotune":
        assert not traced and head_dim == 1 and not group_k, \
            "autotuning launches eagerly, with no per-head transform, per-channel scales"
        _autotuned_gemm_kernel[lambda meta: (_programs(meta, m, n),)](*args, **flags)
    else:
        launch = wrap_triton(_gemm_kernel) if traced else _gemm_kernel
        launch[(_programs(config, m, n, main_rows),)](*args, **{**flags, **config})  # (config may set a flag)
    if tail is not None:
        return out.view(out_shape), tail_out
    return out if residual is None else out.view(out_shape)


def group_step(group_k: int, packed_k: int, weight_bits: int) -> int:
    """The deepest K step (in values of K, a power of two) of a K loop over group-wise weights that stays in one
    group: each of a packed row's fields covers packed_k contiguous values of K (unpacked codes: weight_bits 8, one
    field of K), so the step's packed rows must divide both the group and packed_k (fxquant.quantizer.groupable keeps
    it at least MIN_GROUP_STEP)."""
    common = math.gcd(group_k, packed_k)
    return (common & -common) * (8 // weight_bits)


def _scales(values: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """Per-row (or per-column) scales or zero points, `count` of them or one for all -> (a 1-D tensor, its stride in
    the kernel: 0 for the one value)."""
    flat = values.reshape(-1)
    assert flat.numel() in (1, count), f"{flat.numel()} scales for {count} rows / columns"
    flat = flat.float() if flat.is_floating_point() else flat
    return flat, 0 if flat.numel() == 1 and count > 1 else flat.stride(0)


def _strided_alike(head: torch.Tensor | None, tail: torch.Tensor | None, dims: tuple) -> tuple:
    """Two parts' operands that the kernel indexes with one set of strides (residuals: the row stride, dims (-2,);
    gates: (0, -1)): as they are where those strides match (gates sliced from one adaLN output), else contiguous."""
    if head is None or all(head.stride(dim) == tail.stride(dim) for dim in dims):
        return head, tail
    return head.contiguous(), tail.contiguous()


def attention_operand_gemm(x_q: list[torch.Tensor], x_scale: list[torch.Tensor], w_q: list[torch.Tensor],
                           w_scale: list[torch.Tensor], bias: list[torch.Tensor | None], scale: torch.Tensor,
                           heads: int, tokens: list[int], keys_major: bool,
                           norm: str = "none", norm_weight: list[torch.Tensor | None] | None = None,
                           norm_bias: list[torch.Tensor | None] | None = None, norm_eps: float = 0.0,
                           rope: list[torch.Tensor] = (), weight_bits: int = 8, traced: bool = False) -> torch.Tensor:
    """fxquant::linear_attention_operand: per part, the fp8 GEMM x_q[p] [B * tokens[p], K] @ w_q[p] [H * D, K]^T whose
    epilogue stores the fp8 codes of out / scale straight into the attention operand's layout
    (`attention_operand_shape`, the parts one after the other along tokens; padding left unwritten): Q / K rows of
    tokens at (sample, token), columns at (head, channel); for V (keys_major) the product runs transposed (rows:
    channels, so that each channel's run of keys is stored contiguously). V's last part, when it starts at an
    aligned key, also covers the key padding (its activations padded with zero rows per sample): a part of a token
    count off the 16-key alignment would store its keys one byte at a time (SD3's 333 text tokens: 73 us against
    12 for 336, gpu-bench-h100/joint-v-operand-parts.json); the padding keys' codes are never read.
    Q / K only: norm ("rms" | "layer") with norm_weight[p] (None: no norm) and norm_bias[p] normalises part p's heads
    (eps norm_eps), and rope = [cos, sin] (tables [sum(tokens), D]) rotates every token, in the GEMM's epilogue (as
    linear_attention_operand). weight_bits 4 / 2: w_q holds fp8 layers' packed integer codes, unpacked in the Q / K
    GEMMs' K loop (as any packed fp8 linear: up to UNPACK_MIN_TOKENS_FP8 tokens) and before V's transposed product,
    whose weights are its left operand."""
    norm_weight, rope = norm_weight or [None] * len(tokens), [table.contiguous() for table in rope]
    norm_bias = norm_bias or [None] * len(tokens)
    assert not keys_major or not (rope or any(weight is not None for weight in norm_weight)), "V takes no head norm"
    batch, head_dim = x_q[0].shape[0] // tokens[0], w_q[0].shape[0] // heads
    out = torch.empty(attention_operand_shape(batch, heads, sum(tokens), head_dim, keys_major),
                      dtype=torch.float8_e4m3fn, device=x_q[0].device)
    sample, head, token, channel = out.stride() if not keys_major else (*out.stride()[:2], 1, out.stride(2))
    offset, first_token = 0, 0  # the part's first token, in elements and in tokens
    for index, (part_q, part_scale, part_w, part_w_scale, part_bias, count, part_norm, part_norm_bias) in enumerate(
            zip(x_q, x_scale, w_q, w_scale, bias, tokens, norm_weight, norm_bias)):
        if keys_major:  # rows: channels (head, channel); columns: tokens (sample, token)
            stored = out.shape[-1] - offset if index == len(tokens) - 1 and offset % KEY_ALIGNMENT == 0 \
                else count
            if stored != count:
                part_q, part_scale = _pad_samples(part_q, batch, stored), _pad_samples(part_scale, batch, stored)
            split = (head_dim, head, channel, stored, sample, token, _run(stored), offset)
            if weight_bits != 8:
                part_w = unpack_weights(part_w, weight_bits, traced, out.dtype)
            quantized_gemm(part_w, part_w_scale, None, part_q, part_scale, None, part_bias, out.dtype, traced=traced,
                           out_scale=scale, out=out, split_out=split, bias_per_row=True)
        else:
            split = (count, sample, token, head_dim, head, channel, _run(head_dim), offset)
            quantized_gemm(part_q, part_scale, None, part_w, part_w_scale, None, part_bias, out.dtype, weight_bits,
                           traced=traced, out_scale=scale, out=out, split_out=split,
                           head_norm=(norm, part_norm, part_norm_bias, norm_eps) if part_norm is not None else None,
                           rope=(*rope, first_token) if rope else None)
        offset += count * token
        first_token += count
    return out


def _pad_samples(rows: torch.Tensor, batch: int, count: int) -> torch.Tensor:
    """rows [batch * n, ...] (or [1]: one value for all) -> [batch * count, ...]: each sample's n rows followed by
    count - n zero rows (fp8 codes padded as bytes)."""
    if rows.numel() == 1:
        return rows
    as_bytes = rows.dtype == torch.float8_e4m3fn
    grouped = (rows.view(torch.uint8) if as_bytes else rows).reshape(batch, -1, *rows.shape[1:])
    padded = torch.nn.functional.pad(grouped, (0, 0) * (rows.dim() - 1) + (0, count - grouped.shape[1]))
    padded = padded.reshape(batch * count, *rows.shape[1:])
    return padded.view(torch.float8_e4m3fn) if as_bytes else padded


def _run(size: int) -> int:
    """The longest power-of-two run (<= 16) that divides size: aligned runs of that many stay contiguous."""
    return min(16, size & -size)

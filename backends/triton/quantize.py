"""Per-token activation quantization, optionally with the norm / modulation / activation that produces its input
fused in front: each program holds a few whole rows in registers (one pass over memory, the float rows never
written).

    prologue (fxquant::fused_quantize_per_token): y = act((norm(x) * w + b) * mul + add), in fp32
    int8: asymmetric min-max, scale = (max(hi, 0) - min(lo, 0)) / 255, zero = rint(-128 - lo / scale),
          q = clamp(rint(y * (1 / scale)) + zero, -128, 127)  (bit-exact with fxquant::quantize_per_token)
    fp8:  symmetric, scale = absmax / 448, q = fp8_e4m3(clamp(y * (1 / scale)))   (as fxquant::quantize_per_token_fp8)

`quantize_per_token` / `quantize_per_token_fp8` / `fused_quantize_per_token` are the launchers.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.language.extra import libdevice

from . import INTERPRET, ceil_div, next_power_of_two
from ...ops import check_concat, check_prologue, varies_per_sample

SCALE_EPS = tl.constexpr(1e-8)
FP8_MAX = tl.constexpr(448.0)
NORM_CODES = {"none": 0, "layer": 1, "rms": 2}
ACTIVATION_CODES = {"none": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "geglu": 1, "geglu_tanh": 2}
TANH_GELU_SCALE = tl.constexpr(1.5957691216057308)  # 2 sqrt(2 / pi): 0.5 (1 + tanh(u)) = sigmoid(2 u)

if INTERPRET:  # the CPU interpreter has no libdevice (emulate round-half-to-even) and runs no PTX

    @triton.jit
    def rint(x):
        r = tl.floor(x + 0.5)
        tie = (r - x) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(tie & odd, r - 1.0, r)

    @triton.jit
    def sigmoid(x):
        return tl.sigmoid(x)

    @triton.jit
    def e4m3_grid(x):
        """x (|x| <= 448) rounded half-to-even onto float8 e4m3's grid, still fp32, so that the cast to fp8 is exact:
        the interpreter's own fp32 -> e4m3 cast (Triton 3.6) carries no rounded-up mantissa into the exponent
        (31.5 -> 16.0) and breaks ties upward (29 -> 30)."""
        step = tl.exp2(tl.maximum(tl.floor(tl.log2(tl.maximum(tl.abs(x), 1e-30))), -6.0) - 3.0)  # subnormals: 2^-9
        return rint(x / step) * step

else:

    @triton.jit
    def rint(x):
        return libdevice.rint(x)

    @triton.jit
    def sigmoid(x):
        """0.5 + 0.5 tanh(x / 2) with the hardware tanh (one special-function op, relative error ~2^-11, far below
        the 8-bit codes the activations become) instead of an exponential and a full-precision division."""
        half_tanh = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x * 0.5], dtype=tl.float32,
                                              is_pure=True, pack=1)
        return 0.5 + 0.5 * half_tanh

    @triton.jit
    def e4m3_grid(x):
        return x  # the hardware conversion to e4m3 rounds half-to-even itself


@triton.jit
def load_per_group(ptr, rows, offs, mask, rows_per_group, stride_g, stride_c):
    """An operand broadcast over rows in groups (adaLN's per-sample vectors; [C] vectors: stride_g = 0) as fp32."""
    group = rows // rows_per_group
    return tl.load(ptr + group[:, None] * stride_g + offs[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def apply_activation(x, ACT: tl.constexpr):
    """act(x) for an ACTIVATION_CODES value: 0 identity, 1 GELU (erf), 2 GELU (tanh), 3 SiLU."""
    if ACT == 1:  # gelu (erf)
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:  # gelu, tanh approximation
        x = x * sigmoid(TANH_GELU_SCALE * (x + 0.044715 * x * x * x))
    elif ACT == 3:  # silu
        x = x * sigmoid(x)
    return x


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, zero_ptr, w_ptr, b_ptr, mul_ptr, add_ptr,
    M, K, stride_xm, stride_qm, eps,
    rows_per_mul, stride_mul_g, stride_mul_c, rows_per_add, stride_add_g, stride_add_c,
    tail_ptr, tail_mul_ptr, tail_add_ptr, stride_xb, stride_tail_b, stride_tail_m, head_tokens, tail_tokens,
    rows_per_tail_mul, stride_tail_mul_g, stride_tail_mul_c, rows_per_tail_add, stride_tail_add_g, stride_tail_add_c,
    NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MUL: tl.constexpr, HAS_ADD: tl.constexpr,
    ACT: tl.constexpr, GATED: tl.constexpr, FP8: tl.constexpr, CONCAT: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # loads of x stay in this body: torch's analysis of which pointers a kernel writes (Inductor copies every
    # argument it thinks written) marks a pointer passed into a helper returning several values as written
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (offs[None, :] < K)
    if CONCAT:  # output row -> (sample, token): the first head_tokens of a sample are x's rows, the rest tail's;
        # each part read in place, strided per sample and per token
        sample = rows // (head_tokens + tail_tokens)
        token = rows - sample * (head_tokens + tail_tokens)
        in_head = (token < head_tokens)[:, None]
        x = tl.load(x_ptr + (sample * stride_xb + token * stride_xm)[:, None] + offs[None, :],
                    mask=mask & in_head, other=0.0).to(tl.float32)
        x += tl.load(tail_ptr + (sample * stride_tail_b + (token - head_tokens) * stride_tail_m)[:, None]
                     + offs[None, :], mask=mask & ~in_head, other=0.0).to(tl.float32)
    else:
        row_ptrs = x_ptr + rows[:, None] * stride_xm + offs[None, :]  # gated: the first half of each row
        x = tl.load(row_ptrs, mask=mask, other=0.0).to(tl.float32)
    if NORM == 1:
        x = tl.where(mask, x - (tl.sum(x, axis=1) / K)[:, None], 0.0)
    if NORM != 0:  # layer: centred above; rms: as loaded
        x = x * tl.math.rsqrt((tl.sum(x * x, axis=1) / K + eps).to(tl.float32))[:, None]
    if HAS_W:
        x = x * tl.load(w_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        x = x + tl.load(b_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)[None, :]
    # CONCAT: a row reads its own part's modulation only (masked loads: the other part's costs no memory traffic)
    head_mask, tail_mask = (mask & in_head, mask & ~in_head) if CONCAT else (mask, mask)
    if HAS_MUL:
        mul = load_per_group(mul_ptr, rows, offs, head_mask, rows_per_mul, stride_mul_g, stride_mul_c)
        if CONCAT:
            mul += load_per_group(tail_mul_ptr, rows, offs, tail_mask, rows_per_tail_mul, stride_tail_mul_g,
                                  stride_tail_mul_c)
        x = x * mul
    if HAS_ADD:
        add = load_per_group(add_ptr, rows, offs, head_mask, rows_per_add, stride_add_g, stride_add_c)
        if CONCAT:
            add += load_per_group(tail_add_ptr, rows, offs, tail_mask, rows_per_tail_add, stride_tail_add_g,
                                  stride_tail_add_c)
        x = x + add
    if GATED:  # the gate is the second half of each 2K-wide row
        x = x * apply_activation(tl.load(row_ptrs + K, mask=mask, other=0.0).to(tl.float32), ACT)
    else:
        x = apply_activation(x, ACT)
    if FP8:
        scale = tl.maximum(tl.div_rn(tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1), FP8_MAX), SCALE_EPS)
        q = e4m3_grid(tl.minimum(tl.maximum(x * tl.div_rn(1.0, scale)[:, None], -FP8_MAX), FP8_MAX))
    else:
        lo = tl.minimum(tl.min(tl.where(mask, x, float("inf")), axis=1), 0.0)
        hi = tl.maximum(tl.max(tl.where(mask, x, float("-inf")), axis=1), 0.0)
        scale = tl.maximum(tl.div_rn(hi - lo, 255.0), SCALE_EPS)
        zero = rint(-128.0 - tl.div_rn(lo, scale))
        q = tl.minimum(tl.maximum(rint(x * tl.div_rn(1.0, scale)[:, None]) + zero[:, None], -128.0), 127.0)
        tl.store(zero_ptr + rows, zero.to(tl.int32), mask=rows < M)
    tl.store(q_ptr + rows[:, None] * stride_qm + offs[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=rows < M)


@triton.jit
def _modulation_table_kernel(table_ptr, embedding_ptr, out_ptr, GROUPS, C, stride_tb, stride_tg, stride_eb, stride_eg,
                             plus_one_mask, BLOCK_C: tl.constexpr):
    """One (sample, group) row of fxquant::modulation_table per program: table + embedding rounded to the output's
    dtype, then + 1 rounded again where bit `group` of plus_one_mask is set (PyTorch's two roundings)."""
    sample = tl.program_id(0) // GROUPS
    group = tl.program_id(0) % GROUPS
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    total = (tl.load(table_ptr + sample * stride_tb + group * stride_tg + offs, mask=mask, other=0.0).to(tl.float32)
             + tl.load(embedding_ptr + sample * stride_eb + group * stride_eg + offs, mask=mask, other=0.0).to(
                 tl.float32)).to(out_ptr.dtype.element_ty)
    one = ((plus_one_mask >> group) & 1).to(tl.float32)
    out = (total.to(tl.float32) + one).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + (sample * GROUPS + group) * C + offs, out, mask=mask)


def modulation_table(table: torch.Tensor, embedding: torch.Tensor, plus_one: list[int],
                     traced: bool = False) -> torch.Tensor:
    """fxquant::modulation_table on the GPU: table and embedding broadcast to [B, G, C] (e.g. [1, G, C] and
    [B, G, C]), each with its last dim contiguous -> a contiguous [B, G, C] in their result dtype, one program per
    (sample, group) row."""
    shape = torch.broadcast_shapes(table.shape, embedding.shape)
    assert len(shape) == 3 and table.stride(-1) == 1 and embedding.stride(-1) == 1, \
        f"[B, G, C] operands with contiguous channels: {tuple(table.shape)} + {tuple(embedding.shape)}"
    dtype = torch.result_type(table, embedding)
    table, embedding = table.expand(shape), embedding.expand(shape)
    batch, groups, width = shape
    out = torch.empty(shape, dtype=dtype, device=embedding.device)
    mask = sum(1 << group for group in plus_one)
    launcher(_modulation_table_kernel, traced)[(batch * groups,)](
        table, embedding, out, groups, width, table.stride(0), table.stride(1), embedding.stride(0), embedding.stride(1),
        mask, BLOCK_C=next_power_of_two(width))
    return out


def _launch_config(k: int, gated: bool, concat: bool = False) -> tuple[int, int, int]:
    """(rows per program, BLOCK_K, warps): one row per program, a warp per 2048 values loaded (swept on an H100 at
    widths 640-4608 and GEGLU 2 x 5120: benchmarks/results/gpu-bench-h100/quantize-configs-and-flux-torchao.json), per
    1024 in the concat form, whose rows also pick their part's modulation vectors (CogVideoX's 1920-wide rows on an
    H200: int8 136 -> 125 us, fp8 107 -> 106 us with 2 warps;
    gpu-bench-h200/residual-parts-and-concat-prologue-configs.json)."""
    block = next_power_of_two(k)
    return 1, block, max(1, min(16, block * (2 if gated else 1) * (2 if concat else 1) // 2048))


def launcher(kernel, traced: bool):
    """The kernel itself, or wrapped for tracing into an Inductor graph (torch.library.wrap_triton)."""
    return wrap_triton(kernel) if traced else kernel


def row_strided(x: torch.Tensor) -> torch.Tensor:
    """x itself when its rows (all dims but the last, flattened) are evenly strided and its last dim contiguous, else
    a contiguous copy. The kernel gets the tensor, not a reshaped view: under Inductor a view of a value not yet in
    memory is copied into a buffer of its own for each argument it is passed as."""
    collapsible = all(x.stride(i) == x.stride(i + 1) * x.size(i + 1) for i in range(x.dim() - 2))
    return x if x.stride(-1) == 1 and collapsible else x.contiguous()


def per_group_operand(operand: torch.Tensor | None, shape: torch.Size, rows: int, placeholder: torch.Tensor):
    """An adaLN-style operand (broadcastable to shape, size 1 on every dim but the first and last) -> (the operand,
    rows per group, group stride, channel stride) for load_per_group; None -> a placeholder never read."""
    if operand is None:
        return placeholder, 1, 0, 0
    assert varies_per_sample(operand.shape, shape), f"operand {tuple(operand.shape)} varies inside a sample"
    groups = operand.shape[0] if operand.dim() == len(shape) else 1
    return (operand, rows // groups, operand.stride(0) if groups > 1 else 0,
            operand.stride(-1) if operand.shape[-1] > 1 else 0)


def fused_quantize_per_token(x: torch.Tensor, weight=None, bias=None, mul=None, add=None, norm: str = "none",
                             eps: float = 0.0, activation: str = "none", fp8: bool = False, traced: bool = False,
                             tail=None, tail_mul=None, tail_add=None, config: tuple | None = None):
    """fxquant::fused_quantize_per_token on the GPU: x [..., C_in] float -> (q [M, C] int8 or fp8, fp32 scale
    [M, 1], int32 zero [M, 1] (fp8: [M, 0])). Arguments as fxquant.ops.prologue_reference; traced: see launcher.
    With tail [B, T_tail, C] (x then [B, T_head, C]): fxquant::fused_quantize_concat, the rows of
    cat([prologue(x, mul, add), prologue(tail, tail_mul, tail_add)], dim=1), both parts read in place (strided per
    sample and per token: e.g. token slices of one buffer, without a copy).
    Absent operands are passed as the scale buffer (never read), not as x: Inductor materialises a separate copy of
    a not-yet-stored input for every argument it is passed as (4 copies of Flux's 15360-wide rows, measured).
    config (benchmarks): (rows per program, warps) in place of `_launch_config`'s."""
    check_prologue(norm, activation, any(t is not None for t in (weight, bias, mul, add)))
    concat = tail is not None
    if concat:
        check_concat(x, tail, activation)
        # the kernel modulates both parts or neither: a part without an operand gets its identity
        if (mul is None) != (tail_mul is None):
            mul, tail_mul = (t if t is not None else x.new_ones(x.shape[-1]) for t in (mul, tail_mul))
        if (add is None) != (tail_add is None):
            add, tail_add = (t if t is not None else x.new_zeros(x.shape[-1]) for t in (add, tail_add))
        x, tail = (part if part.stride(-1) == 1 else part.contiguous() for part in (x, tail))
    else:
        x = row_strided(x)
    gated = activation.startswith("geglu")
    out_shape = (x.shape[0], x.shape[1] + tail.shape[1], x.shape[2]) if concat else x.shape
    m = math.prod(out_shape[:-1]) if x.shape[-1] else 0
    width = x.shape[-1] // 2 if gated else x.shape[-1]
    q = torch.empty((m, width), dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    zero = torch.empty((m, 0 if fp8 else 1), dtype=torch.int32, device=x.device)
    if m:
        mul_args = per_group_operand(mul, out_shape, m, scale)
        add_args = per_group_operand(add, out_shape, m, scale)
        tail_mul_args = per_group_operand(tail_mul, out_shape, m, scale)
        tail_add_args = per_group_operand(tail_add, out_shape, m, scale)
        rows_per_program, block, warps = _launch_config(width, gated, concat)
        if config is not None:
            rows_per_program, warps = config
        launcher(_quantize_rows_kernel, traced)[(ceil_div(m, rows_per_program),)](
            x, q, scale, scale if fp8 else zero, scale if weight is None else weight, scale if bias is None else bias,
            mul_args[0], add_args[0], m, width, x.stride(-2) if x.dim() > 1 else 0, q.stride(0), eps,
            *mul_args[1:], *add_args[1:],
            tail if concat else scale, tail_mul_args[0], tail_add_args[0], x.stride(0) if concat else 0,
            tail.stride(0) if concat else 0, tail.stride(1) if concat else 0,
            x.shape[1] if concat else 0, tail.shape[1] if concat else 0, *tail_mul_args[1:], *tail_add_args[1:],
            NORM=NORM_CODES[norm], HAS_W=weight is not None, HAS_B=bias is not None, HAS_MUL=mul is not None,
            HAS_ADD=add is not None, ACT=ACTIVATION_CODES[activation], GATED=gated, FP8=fp8, CONCAT=concat,
            ROWS=rows_per_program, BLOCK_K=block, num_warps=warps)
    return q, scale, zero


def quantize_per_token(x: torch.Tensor, traced: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (int8 [M, K], fp32 scale [M, 1], int32 zero [M, 1]). traced: see launcher."""
    return fused_quantize_per_token(x, traced=traced)


def quantize_per_token_fp8(x: torch.Tensor, traced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (fp8 e4m3 [M, K], fp32 scale [M, 1]) with symmetric per-row absmax scales."""
    return fused_quantize_per_token(x, fp8=True, traced=traced)[:2]

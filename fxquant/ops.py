"""fxquant custom ops (`torch.library.custom_op`, namespace `fxquant`): the quantized model's only kernels.

Each op has a plain PyTorch reference body that is obviously right (integer matmuls on `torch._int_mm`) and a fake
implementation right below it, so torch.export, Dynamo and the compile backend see them as single nodes.
Backends replace these nodes with fused kernels; tests check kernels against these bodies.

Shapes: activations arrive 2-D ([M, K] rows = tokens); scales are fp32, zero points int32. Activations are
asymmetric int8 (x ~ scale * (q - zero)), weights symmetric int8 per output channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quantizer import (FP8_MAX, asymmetric_params, attention_operands, quantize_asymmetric, quantize_fp8,
                        quantize_fp8_with_scale, scale_groups, unpack_bits, unpack_fp8_layer_codes,
                        unpack_fp8_layer_e4m3, unpack_int4)

_CUDA_INT_MM_MIN_ROWS = 17  # cuBLAS int8 GEMM through torch._int_mm needs M > 16 and K, N multiples of 8


def _int_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int8 a [M, K] @ int8 b_t [N, K].T -> int32 [M, N], exact.

    CPU: torch._int_mm takes any shape. CUDA: operands are zero-padded to the shapes cuBLAS accepts (padding
    adds zero products, so the result is unchanged).
    """
    if a.device.type != "cuda":
        return torch._int_mm(a, b_t.t())
    m, k = a.shape
    n = b_t.shape[0]
    pad_m = max(_CUDA_INT_MM_MIN_ROWS, -(-m // 8) * 8) - m
    pad_k = -k % 8
    pad_n = -n % 8
    a = F.pad(a, (0, pad_k, 0, pad_m))
    b_t = F.pad(b_t, (0, pad_k, 0, pad_n))
    return torch._int_mm(a, b_t.t())[:m, :n]


def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference body of fxquant::quantize_per_token, on any device (kernels are checked against it)."""
    scale, zero = asymmetric_params(x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True))
    return quantize_asymmetric(x, scale, zero), scale, zero


def _group_columns(k: int, w_scale: torch.Tensor) -> list[slice]:
    """The input columns of each scale group of a [N, G] w_scale over K inputs (one group for a [N] w_scale)."""
    groups = scale_groups(w_scale) or 1
    size = k // groups
    return [slice(g * size, (g + 1) * size) for g in range(groups)]


def _group_scales(values: torch.Tensor, group: int) -> torch.Tensor:
    """Group `group`'s column of per-group values [N, G] as a [1, N] row (per-channel values [N]: all of them)."""
    return (values[:, group] if scale_groups(values) else values).reshape(1, -1)


def int8_linear_reference(x_q, x_scale, x_zero, w_q, w_scale, w_sum, bias, out_dtype) -> torch.Tensor:
    """The reference body of fxquant::int8_linear, on any device (kernels are checked against it): exact int32 sums
    per scale group, scaled and added in fp32."""
    out = 0
    for group, columns in enumerate(_group_columns(x_q.shape[1], w_scale)):
        acc = _int_matmul(x_q[:, columns].contiguous(), w_q[:, columns].contiguous())
        acc = acc - x_zero.reshape(-1, 1) * _group_scales(w_sum, group)
        out = out + acc.float() * _group_scales(w_scale, group)
    out = out * x_scale.reshape(-1, 1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def fp8_linear_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype) -> torch.Tensor:
    """The reference body of fxquant::fp8_linear, on any device: an fp32 product per scale group."""
    out = 0
    for group, columns in enumerate(_group_columns(x_q.shape[1], w_scale)):
        out = out + (x_q[:, columns].float() @ w_q[:, columns].float().t()) * _group_scales(w_scale, group)
    out = out * x_scale.reshape(-1, 1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


@torch.library.custom_op("fxquant::quantize_per_token", mutates_args=())
def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (int8 q [M, K], fp32 scale [M, 1], int32 zero [M, 1]): asymmetric min-max per row."""
    return quantize_per_token_reference(x)


@quantize_per_token.register_fake
def _(x):
    rows = (*x.shape[:-1], 1)
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(rows, dtype=torch.float32),
            x.new_empty(rows, dtype=torch.int32))


PROLOGUE_NORMS = ("none", "layer", "rms")
PROLOGUE_ACTIVATIONS = ("none", "gelu", "gelu_tanh", "silu", "geglu", "geglu_tanh")  # geglu*: gated (a * gelu(g))


def check_prologue(norm: str, activation: str, has_modulation: bool) -> None:
    """Raise ValueError for a prologue fused_quantize_per_token does not define."""
    if norm not in PROLOGUE_NORMS or activation not in PROLOGUE_ACTIVATIONS:
        raise ValueError(f"prologue norm {norm!r} / activation {activation!r}: norms are {PROLOGUE_NORMS}, "
                         f"activations {PROLOGUE_ACTIVATIONS}")
    if activation.startswith("geglu") and (norm != "none" or has_modulation):
        raise ValueError("a gated activation (geglu) takes no norm, affine or modulation before it")


def varies_per_sample(operand_shape, shape) -> bool:
    """An operand of operand_shape broadcasts against shape varying at most along the first (sample) and last
    (channel) dims: adaLN's per-sample vectors, [C] vectors, scalars."""
    if len(operand_shape) > len(shape):
        return False
    padded = (1,) * (len(shape) - len(operand_shape)) + tuple(operand_shape)
    return all(size == 1 for size in padded[1:-1]) and padded[0] in (1, shape[0]) and padded[-1] in (1, shape[-1])


def prologue_reference(x, weight, bias, mul, add, norm: str, eps: float, activation: str) -> torch.Tensor:
    """The prologue of fxquant::fused_quantize_per_token in fp32: x [..., C_in] -> rows [M, C].

    y = activation((norm(x) * weight + bias) * mul + add); norm over the last dim ("layer": LayerNorm, "rms":
    RMSNorm, eps inside the root); weight / bias [C] (the norm's affine) and mul / add (adaLN modulation, shaped
    [B, 1, ..., C] or [C]) are optional. Gated activations split x into halves (a, g) and give a * act(g), C = C_in / 2.
    """
    check_prologue(norm, activation, any(t is not None for t in (weight, bias, mul, add)))
    y = x.float()
    if activation.startswith("geglu"):
        y, gate = y.chunk(2, dim=-1)
    if norm == "layer":
        y = F.layer_norm(y, y.shape[-1:], eps=eps)
    elif norm == "rms":
        y = y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + eps)
    for operand, combine in ((weight, torch.mul), (bias, torch.add), (mul, torch.mul), (add, torch.add)):
        if operand is not None:
            y = combine(y, operand.float())
    if activation.startswith("geglu"):
        y = y * apply_activation(gate, activation.replace("geglu", "gelu"))
    else:
        y = apply_activation(y, activation)
    return y.reshape(-1, y.shape[-1])


def apply_activation(y: torch.Tensor, activation: str) -> torch.Tensor:
    """y after "none" | "gelu" | "gelu_tanh" | "silu", in y's dtype."""
    if activation.startswith("gelu"):
        return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    return F.silu(y) if activation == "silu" else y


@torch.library.custom_op("fxquant::fused_quantize_per_token", mutates_args=())
def fused_quantize_per_token(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mul: torch.Tensor | None,
    add: torch.Tensor | None,
    norm: str,
    eps: float,
    activation: str,
    fp8: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm / modulation / activation, then per-token quantization, in one op (the compile backend puts it in place
    of such chains ending in quantize_per_token or quantize_per_token_fp8; kernels never write the float rows).

    x [..., C_in] float -> (q [M, C], fp32 scale [M, 1], int32 zero [M, 1]) as quantize_per_token of
    prologue_reference(...), or with fp8: (float8_e4m3fn q, scale, an empty int32 zero [M, 0]).
    """
    return _quantized_rows(prologue_reference(x, weight, bias, mul, add, norm, eps, activation), fp8)


def _quantized_rows(rows: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token quantization of rows [M, C] as the fused quantize ops return it: int8 (q, scale, zero), or fp8
    (q, scale, an empty int32 zero [M, 0])."""
    if fp8:
        q, scale = quantize_fp8(rows, dim=-1)
        return q, scale, rows.new_empty((rows.shape[0], 0), dtype=torch.int32)
    return quantize_per_token_reference(rows)


@fused_quantize_per_token.register_fake
def _(x, weight, bias, mul, add, norm, eps, activation, fp8):
    width = x.shape[-1] // 2 if activation.startswith("geglu") else x.shape[-1]
    rows = x.numel() // x.shape[-1]
    return (x.new_empty((rows, width), dtype=torch.float8_e4m3fn if fp8 else torch.int8),
            x.new_empty((rows, 1), dtype=torch.float32), x.new_empty((rows, 0 if fp8 else 1), dtype=torch.int32))


@torch.library.custom_op("fxquant::fused_quantize_concat", mutates_args=())
def fused_quantize_concat(
    head: torch.Tensor,
    tail: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    head_mul: torch.Tensor | None,
    head_add: torch.Tensor | None,
    tail_mul: torch.Tensor | None,
    tail_add: torch.Tensor | None,
    norm: str,
    eps: float,
    activation: str,
    fp8: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fused_quantize_per_token of torch.cat([prologue(head), prologue(tail)], dim=1) (CogVideoX's text and video
    tokens, each with its own adaLN modulation, before q / k / v and the feed-forward); the concatenated float rows
    are never written. head [B, T_head, C], tail [B, T_tail, C] -> rows [B * (T_head + T_tail), C], sample by sample.
    """
    check_concat(head, tail, activation)
    parts = [prologue_reference(x, weight, bias, mul, add, norm, eps, activation).reshape(x.shape)
             for x, mul, add in ((head, head_mul, head_add), (tail, tail_mul, tail_add))]
    return _quantized_rows(torch.cat(parts, dim=1).reshape(-1, head.shape[-1]), fp8)


@torch.library.custom_op("fxquant::modulation_table", mutates_args=())
def modulation_table(table: torch.Tensor, embedding: torch.Tensor, plus_one: list[int]) -> torch.Tensor:
    """adaLN-single's per-sample modulation vectors in one tensor: table (e.g. [1, G, C]) + embedding ([B, G, C])
    as PyTorch adds them (broadcast, in their result dtype), then 1 added, in that dtype, to the groups in plus_one
    (the scales a block uses as `1 + scale`) -> [B, G, C]. The compile backend puts it in place of PixArt's
    `(scale_shift_table[None] + timestep.reshape(B, 6, -1)).chunk(6, dim=1)` add where every chunk goes to fxquant's
    fused kernels: Inductor would otherwise compute each chunk (and each 1 + scale) in a kernel of its own; one
    buffer's chunks reach the kernels as views."""
    out = table + embedding
    if plus_one:
        out[:, plus_one] = 1 + out[:, plus_one]
    return out


@modulation_table.register_fake
def _(table, embedding, plus_one):
    return embedding.new_empty(torch.broadcast_shapes(table.shape, embedding.shape),
                               dtype=torch.result_type(table, embedding))


def check_concat(head: torch.Tensor, tail: torch.Tensor, activation: str) -> None:
    """Raise ValueError unless head and tail are [B, T, C] with equal B and C and the activation is not gated."""
    if head.dim() != 3 or tail.dim() != 3 or head.shape[::2] != tail.shape[::2]:
        raise ValueError(f"parts concatenated along tokens must be [B, T, C] with equal B and C: {tuple(head.shape)}, "
                         f"{tuple(tail.shape)}")
    if activation.startswith("geglu"):
        raise ValueError("a gated activation (geglu) cannot follow a concatenation")


@fused_quantize_concat.register_fake
def _(head, tail, weight, bias, head_mul, head_add, tail_mul, tail_add, norm, eps, activation, fp8):
    rows = head.shape[0] * (head.shape[1] + tail.shape[1])
    return (head.new_empty((rows, head.shape[-1]), dtype=torch.float8_e4m3fn if fp8 else torch.int8),
            head.new_empty((rows, 1), dtype=torch.float32), head.new_empty((rows, 0 if fp8 else 1), dtype=torch.int32))


@torch.library.custom_op("fxquant::quantize_per_tensor", mutates_args=())
def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                        bits: int = 8) -> torch.Tensor:
    """x (any shape) float with static fp32 scale [1] and int32 zero [1] -> int8 of x's shape, on the signed
    `bits`-bit grid (bits 4: values in [-8, 7], run by the int8 kernels)."""
    return quantize_asymmetric(x, scale, zero, bits)


@quantize_per_tensor.register_fake
def _(x, scale, zero, bits=8):
    return x.new_empty(x.shape, dtype=torch.int8)


@torch.library.custom_op("fxquant::int8_linear", mutates_args=())
def int8_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    w_sum: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """int8 x_q [M, K] (scale, zero [M, 1] or [1]) @ int8 w_q [N, K]^T (scale [N], row sums w_sum [N]) + bias.

    out[m, n] = x_scale[m] * w_scale[n] * (sum_k x_q[m, k] w_q[n, k] - x_zero[m] * w_sum[n]) + bias[n], computed
    in int32 then fp32, cast once to out_dtype. Group-wise weights: w_scale and w_sum [N, G], one per run of K / G
    inputs; out[m, n] = x_scale[m] * sum_g w_scale[n, g] * (the group's sum - x_zero[m] * w_sum[n, g]) + bias[n].
    """
    return int8_linear_reference(x_q, x_scale, x_zero, w_q, w_scale, w_sum, bias, out_dtype)


@int8_linear.register_fake
def _(x_q, x_scale, x_zero, w_q, w_scale, w_sum, bias, out_dtype):
    return x_q.new_empty((x_q.shape[0], w_q.shape[0]), dtype=out_dtype)


@torch.library.custom_op("fxquant::packed_int8_linear", mutates_args=())
def packed_int8_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor,
    w_packed: torch.Tensor,
    weight_bits: int,
    w_scale: torch.Tensor,
    w_sum: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """int8_linear with 4- or 2-bit weight codes packed uint8 [N, K * weight_bits / 8] (quantizer.pack_bits).

    The compile backend puts it in place of unpack_int4 / unpack_int2 -> int8_linear, so that kernels unpack the
    weights inside the GEMM (the int8 codes never reach memory). Reference: unpack, then int8_linear.
    """
    return int8_linear_reference(x_q, x_scale, x_zero, unpack_bits(w_packed, weight_bits), w_scale, w_sum, bias,
                                 out_dtype)


@packed_int8_linear.register_fake
def _(x_q, x_scale, x_zero, w_packed, weight_bits, w_scale, w_sum, bias, out_dtype):
    return x_q.new_empty((x_q.shape[0], w_packed.shape[0]), dtype=out_dtype)


@torch.library.custom_op("fxquant::quantize_per_token_fp8", mutates_args=())
def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (float8_e4m3fn [M, K], fp32 scale [M, 1]): symmetric absmax / 448 per row."""
    return quantize_fp8(x, dim=-1)


@quantize_per_token_fp8.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op("fxquant::quantize_per_tensor_fp8", mutates_args=())
def quantize_per_tensor_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (any shape) float with a static fp32 scale [1] -> float8_e4m3fn of x's shape: x * (1 / scale), saturated."""
    return quantize_fp8_with_scale(x, scale)


@quantize_per_tensor_fp8.register_fake
def _(x, scale):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn)


@torch.library.custom_op("fxquant::fp8_linear", mutates_args=())
def fp8_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """fp8 x_q [M, K] (scale [M, 1], or [1] when static) @ fp8 w_q [N, K]^T (scale [N], or [N, G] per run of K / G
    inputs) + bias -> out_dtype [M, N].

    Reference: the fp8 values upcast to fp32 (exact), an fp32 matmul, per-row x per-column scales, bias, one cast.
    """
    return fp8_linear_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype)


@fp8_linear.register_fake
def _(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    return x_q.new_empty((x_q.shape[0], w_q.shape[0]), dtype=out_dtype)


@torch.library.custom_op("fxquant::packed_fp8_linear", mutates_args=())
def packed_fp8_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_packed: torch.Tensor,
    weight_bits: int,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """fp8_linear against 4- or 2-bit integer weight codes packed uint8 [N, K * weight_bits / 8] in an fp8 layer's
    layout (quantizer.unpack_fp8_layer_codes; their e4m3 values are the codes exactly). The compile backend puts it in
    place of unpack_fp8_codes -> fp8_linear, so that kernels unpack the weights inside the GEMM. Reference: the codes
    upcast to fp32, then fp8_linear's."""
    return fp8_linear_reference(x_q, x_scale, unpack_fp8_layer_codes(w_packed, weight_bits), w_scale, bias, out_dtype)


@packed_fp8_linear.register_fake
def _(x_q, x_scale, w_packed, weight_bits, w_scale, bias, out_dtype):
    return x_q.new_empty((x_q.shape[0], w_packed.shape[0]), dtype=out_dtype)


@torch.library.custom_op("fxquant::linear_residual", mutates_args=())
def linear_residual(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor | None,
    w: torch.Tensor,
    weight_bits: int,
    w_scale: torch.Tensor,
    w_sum: torch.Tensor | None,
    bias: torch.Tensor | None,
    gate: torch.Tensor | None,
    residual: torch.Tensor,
) -> torch.Tensor:
    """residual + gate * linear(x) in one op: the compile backend puts it in place of a quantized linear whose
    output (through row views) is scaled by a per-sample gate (adaLN-Zero's `gate * out`, optional) and added to a
    residual stream, so that kernels apply both in the GEMM's epilogue and never write the linear's output.

    The linear is fp8_linear (fp8 x_q, x_zero / w_sum None, weight_bits 8), packed_fp8_linear (fp8 x_q, weight_bits
    4 / 2), int8_linear (weight_bits 8) or packed_int8_linear (weight_bits 4 / 2) with these arguments; its rows [M, N] are viewed as residual [..., N];
    gate broadcasts against residual varying at most per sample (varies_per_sample). Computed in fp32, cast once
    to residual's dtype; the output has residual's shape.
    """
    return _gated_sum(_linear_fp32(x_q, x_scale, x_zero, w, weight_bits, w_scale, w_sum, bias).reshape(residual.shape),
                      gate, residual)


def _gated_sum(out: torch.Tensor, gate: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
    """residual + gate * out (fp32 out; gate optional) in fp32, cast once to residual's dtype."""
    if gate is not None:
        out = out * gate.float()
    return (residual.float() + out).to(residual.dtype)


@linear_residual.register_fake
def _(x_q, x_scale, x_zero, w, weight_bits, w_scale, w_sum, bias, gate, residual):
    return torch.empty_like(residual, memory_format=torch.contiguous_format)


@torch.library.custom_op("fxquant::linear_residual_parts", mutates_args=())
def linear_residual_parts(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor | None,
    w: torch.Tensor,
    weight_bits: int,
    w_scale: torch.Tensor,
    w_sum: torch.Tensor | None,
    bias: torch.Tensor | None,
    head_gate: torch.Tensor | None,
    head_residual: torch.Tensor,
    tail_gate: torch.Tensor | None,
    tail_residual: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_residual over two token parts (CogVideoX: text, then video tokens of each sample), for a linear whose
    output [B, T_head + T_tail, N] is split along tokens and each part gated and added to its own residual stream:
    -> (head_residual + head_gate * out[:, :T_head], tail_residual + tail_gate * out[:, T_head:]). The linear's
    arguments as in linear_residual; residuals [B, T_part, N] (the token counts come from them), gates per sample
    (both or neither). Kernels write each part's result directly and never the linear's output.
    """
    out = _linear_fp32(x_q, x_scale, x_zero, w, weight_bits, w_scale, w_sum, bias)
    head, tail = out.reshape(head_residual.shape[0], -1, out.shape[-1]).split(
        [head_residual.shape[1], tail_residual.shape[1]], dim=1)
    return _gated_sum(head, head_gate, head_residual), _gated_sum(tail, tail_gate, tail_residual)


@linear_residual_parts.register_fake
def _(x_q, x_scale, x_zero, w, weight_bits, w_scale, w_sum, bias, head_gate, head_residual, tail_gate, tail_residual):
    return (torch.empty_like(head_residual, memory_format=torch.contiguous_format),
            torch.empty_like(tail_residual, memory_format=torch.contiguous_format))


def _linear_fp32(x_q, x_scale, x_zero, w, weight_bits, w_scale, w_sum, bias) -> torch.Tensor:
    """fp8_linear / packed_fp8_linear (fp8 x_q), int8_linear / packed_int8_linear (weight_bits 8 / 4, 2) ->
    fp32 [M, N]."""
    if x_q.dtype == torch.float8_e4m3fn:
        codes = w if weight_bits == 8 else unpack_fp8_layer_codes(w, weight_bits)
        return fp8_linear_reference(x_q, x_scale, codes, w_scale, bias, torch.float32)
    codes = w if weight_bits == 8 else unpack_bits(w, weight_bits)
    return int8_linear_reference(x_q, x_scale, x_zero, codes, w_scale, w_sum, bias, torch.float32)


@torch.library.custom_op("fxquant::linear_activation_quantize", mutates_args=())
def linear_activation_quantize(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor | None,
    w: torch.Tensor,
    weight_bits: int,
    w_scale: torch.Tensor,
    w_sum: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: str,
    out_scale: torch.Tensor,
    out_zero: torch.Tensor | None,
) -> torch.Tensor:
    """quantize(activation(linear(x))) in one op: the compile backend puts it in place of a quantized linear whose
    output passes (through row views) a GELU / SiLU / GEGLU into a static per-tensor quantization, so that kernels
    apply both in the GEMM's epilogue and write the next linear's 8-bit codes, never the float activations.

    The linear's arguments as in linear_residual; activation "gelu" | "gelu_tanh" | "silu" | "none", or "geglu" |
    "geglu_tanh" (diffusers' GEGLU: the linear's 2N outputs split into halves a, g -> a * gelu(g)); out_scale fp32
    [1] with out_zero int32 [1] (asymmetric int8, as quantize_per_tensor) or None (fp8 e4m3, as
    quantize_per_tensor_fp8). Computed in fp32 -> codes [M, N].
    """
    out = _linear_fp32(x_q, x_scale, x_zero, w, weight_bits, w_scale, w_sum, bias)
    if activation.startswith("geglu"):
        out, gate = out.chunk(2, dim=-1)
        out = out * apply_activation(gate, activation.replace("geglu", "gelu"))
    else:
        out = apply_activation(out, activation)
    if out_zero is None:
        return quantize_fp8_with_scale(out, out_scale)
    return quantize_asymmetric(out, out_scale, out_zero)


@linear_activation_quantize.register_fake
def _(x_q, x_scale, x_zero, w, weight_bits, w_scale, w_sum, bias, activation, out_scale, out_zero):
    width = w_scale.shape[0] // 2 if activation.startswith("geglu") else w_scale.shape[0]
    return x_q.new_empty((x_q.shape[0], width), dtype=torch.float8_e4m3fn if out_zero is None else torch.int8)


def heads_last(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> the same values stored as [B, N, H, D] (so the caller's transpose(1, 2).reshape is free)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def empty_heads_last(q: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised tensor shaped like q [B, H, N, D] (typed like q, or dtype), stored as [B, N, H, D]."""
    batch, heads, tokens, head_dim = q.shape
    return q.new_empty((batch, tokens, heads, head_dim), dtype=dtype or q.dtype).transpose(1, 2)


REFERENCE_SCORE_ELEMENTS = 2**26  # the reference holds at most this many fp32 scores at once (256 MiB)


def quantized_attention_reference(q, k, v, scale: float, pv_fp8: bool,
                                  operand_scales: torch.Tensor | None = None) -> torch.Tensor:
    """The reference body of fxquant::quantized_attention, on any device: whole score rows at once, in chunks of
    queries that keep the score block under REFERENCE_SCORE_ELEMENTS (each row's softmax is exact either way; the
    kernel's online softmax quantizes P against running row maxima instead, so the two agree to rounding)."""
    q_q, q_scale, k_q, k_scale, v_op, v_scale = attention_operands(q, k, v, pv_fp8, operand_scales)
    k_t = k_q.float().transpose(-1, -2)
    v_float = v_op.float()
    batch, heads, n_q, _ = q.shape
    rows = max(1, REFERENCE_SCORE_ELEMENTS // max(1, batch * heads * k.shape[-2]))
    chunks = []
    for start in range(0, n_q, rows):
        block = slice(start, start + rows)
        scores = (q_q[..., block, :].float() @ k_t) * (q_scale[..., block, None] * k_scale[..., None, :] * scale)
        p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        if pv_fp8:
            out = ((p * FP8_MAX).to(torch.float8_e4m3fn).float() @ v_float) * (v_scale / FP8_MAX)
        else:
            out = p.to(v.dtype).float() @ v_float
        chunks.append(out / p.sum(dim=-1, keepdim=True))
    return heads_last(torch.cat(chunks, dim=-2).to(q.dtype))


@torch.library.custom_op("fxquant::quantized_attention", mutates_args=())
def quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        pv_fp8: bool, operand_scales: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q K^T * scale) V with int8 Q K^T (quantizer.attention_operands) and, with pv_fp8, float8 P V; with
    operand_scales (fp32 [3], needs pv_fp8) Q, K and V are float8 with those static per-tensor scales.

    q [B, H, Nq, D], k / v [B, H, Nk, D] -> [B, H, Nq, D] in q's dtype, stored as [B, Nq, H, D]."""
    if operand_scales is not None and not pv_fp8:
        raise ValueError("static fp8 operand_scales quantize V to fp8 as well: pass pv_fp8=True")
    return quantized_attention_reference(q, k, v, scale, pv_fp8, operand_scales)


@quantized_attention.register_fake
def _(q, k, v, scale, pv_fp8, operand_scales=None):
    return empty_heads_last(q)


def split_codes(out: torch.Tensor, out_scale: torch.Tensor, out_split: int) -> torch.Tensor:
    """An attention's output [B, H, Nq, D] -> its fp8 codes stored as [B, Nq, H, D]: of out_scale (fp32 [1]), or of
    out_scale[0] for queries before out_split and out_scale[1] for the rest (out_split > 0)."""
    scales = out_scale.reshape(-1)
    if out_split:
        before = torch.arange(out.shape[2], device=out.device) < out_split
        scales = torch.where(before, scales[0], scales[1])[:, None]
    return empty_heads_last(out, torch.float8_e4m3fn).copy_(quantize_fp8_with_scale(out, scales))


@torch.library.custom_op("fxquant::quantized_attention_codes", mutates_args=())
def quantized_attention_codes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, pv_fp8: bool,
                              operand_scales: torch.Tensor | None, out_scale: torch.Tensor,
                              out_split: int = 0) -> torch.Tensor:
    """quantize_per_tensor_fp8(quantized_attention(...), out_scale) in one op (`split_codes`: with out_split, two
    scales for the queries before / from out_split): the compile backend puts it in place of an attention whose
    output (through views) only feeds static fp8 quantizations (output projections' inputs, recipe option
    static_attention_outputs; a joint attention's two token ranges, two projections), so that the attention kernel
    writes the projections' codes. -> float8_e4m3fn [B, H, Nq, D], stored as [B, Nq, H, D]."""
    return split_codes(quantized_attention(q, k, v, scale, pv_fp8, operand_scales), out_scale, out_split)


@quantized_attention_codes.register_fake
def _(q, k, v, scale, pv_fp8, operand_scales, out_scale, out_split=0):
    return empty_heads_last(q, torch.float8_e4m3fn)


MIN_TAIL = 32  # the attention kernel's Q / K tail tile: 8-bit MMA reduces over at least 32 values
MIN_VALUE_TAIL = 16  # its V / output tail tile (the N side of the P V product)
KEY_ALIGNMENT = 16  # a keys-major fp8 V operand holds a multiple of this many keys (16-byte rows for the fp8 MMA)


def _tail(head_dim: int, smallest: int) -> int:
    """A power of two >= smallest covering what head_dim has past its largest power of two."""
    rest = head_dim - (1 << (head_dim.bit_length() - 1))
    return max(smallest, 1 << (max(rest, 1) - 1).bit_length())


def head_dim_split(head_dim: int) -> tuple[int, int, int]:
    """head_dim -> (power-of-two part, Q / K tail tile width (>= MIN_TAIL), V tail tile width (>= MIN_VALUE_TAIL));
    the attention kernel skips the tails when there is no rest (PixArt's 72: 64, 32, 16)."""
    return 1 << (head_dim.bit_length() - 1), _tail(head_dim, MIN_TAIL), _tail(head_dim, MIN_VALUE_TAIL)


def padded_head_dim(head_dim: int, value: bool = False) -> int:
    """The head dim attention operands are stored with: head_dim when a power of two, else the width of its two
    tiles, the Q / K ones or (value) V's (PixArt's 72: 96 / 80)."""
    dim_a, dim_b, dim_bv = head_dim_split(head_dim)
    return head_dim if head_dim == dim_a else dim_a + (dim_bv if value else dim_b)


def attention_operand_shape(batch: int, heads: int, tokens: int, head_dim: int, keys_major: bool) -> tuple:
    """The stored shape of an fp8 attention operand (attention_operand_fp8; keys_major: V)."""
    if keys_major:
        return batch, heads, padded_head_dim(head_dim, True), -(-tokens // KEY_ALIGNMENT) * KEY_ALIGNMENT
    return batch, heads, tokens, padded_head_dim(head_dim)


def attention_operand_reference(x: torch.Tensor, scale: torch.Tensor, keys_major: bool) -> torch.Tensor:
    """The body of fxquant::attention_operand_fp8 in plain PyTorch (the compile backend hands it to Inductor, which
    fuses it into whatever produces x). V's keys stay padded to KEY_ALIGNMENT, each channel's row 16-byte aligned:
    a view sliced back to N keys made Inductor copy it into misaligned rows (SD3's 4429 keys: the attention kernel
    2.5 ms compiled against 0.46 eager, gpu-bench-h100/sd3-attention-compiled-profile.txt)."""
    tokens, head_dim = x.shape[-2:]
    codes = quantize_fp8_with_scale(x, scale.reshape(())).view(torch.uint8)  # padded as bytes: 0x00 is +0.0
    codes = F.pad(codes, (0, padded_head_dim(head_dim, keys_major) - head_dim))
    if keys_major:
        codes = F.pad(codes.transpose(-1, -2), (0, -tokens % KEY_ALIGNMENT))
    return codes.contiguous().view(torch.float8_e4m3fn)


@torch.library.custom_op("fxquant::attention_operand_fp8", mutates_args=())
def attention_operand_fp8(x: torch.Tensor, scale: torch.Tensor, keys_major: bool) -> torch.Tensor:
    """x [B, H, N, D] float, scale fp32 (one value) -> the float8 e4m3 codes of x / scale (saturated) in the layout the
    static-fp8 attention kernel loads: [B, H, N, Dp] (Q, K) or, keys_major, [B, H, Dv, Np] (V, each channel's keys
    contiguous), Dp / Dv = padded_head_dim(D, keys_major), Np = N rounded up to KEY_ALIGNMENT. The padding is zero
    here; producers fused into a GEMM (linear_attention_operand) leave it unwritten, and attention_fp8_codes never
    reads it."""
    return attention_operand_reference(x, scale, keys_major)


@attention_operand_fp8.register_fake
def _(x, scale, keys_major):
    return x.new_empty(attention_operand_shape(*x.shape, keys_major), dtype=torch.float8_e4m3fn)


def heads_first(x: torch.Tensor, heads: int, tokens: int) -> torch.Tensor:
    """[B * N, H * D] rows of tokens -> the view [B, H, N, D] an attention takes."""
    return x.view(-1, tokens, heads, x.shape[-1] // heads).transpose(1, 2)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """The rotary embedding's partner of x [..., D]: channel pairs (2i, 2i + 1) -> (-x[2i + 1], x[2i])."""
    real, imaginary = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([-imaginary, real], dim=-1).flatten(-2)


@torch.library.custom_op("fxquant::linear_attention_operand", mutates_args=())
def linear_attention_operand(x_q: list[torch.Tensor], x_scale: list[torch.Tensor], w_q: list[torch.Tensor],
                             w_scale: list[torch.Tensor], bias: list[torch.Tensor | None], scale: torch.Tensor,
                             heads: int, tokens: list[int], keys_major: bool, norm: str,
                             norm_weight: list[torch.Tensor | None], norm_bias: list[torch.Tensor | None],
                             norm_eps: float, rope: list[torch.Tensor], weight_bits: int = 8) -> torch.Tensor:
    """attention_operand_fp8 of fp8 linears' outputs seen as heads and concatenated along tokens (one part, or SD3 /
    Flux joint attention's image and text parts), the outputs kept in fp32 until quantized: part p is
    heads_first(fp8_linear(x_q[p] [B * tokens[p], K_p], x_scale[p], w_q[p], w_scale[p], bias[p]), heads, tokens[p]),
    then normalised over each head's channels unless norm_weight[p] is None: norm "rms" (RMSNorm, weight [D]) or
    "layer" (LayerNorm, weight and bias norm_bias[p] [D]), eps norm_eps; with rope = [cos, sin] ([sum(tokens), D]
    each; or []) the concatenation is rotated: x * cos + rotate_pairs(x) * sin (Flux's q / k; CogVideoX's are
    LayerNorm-ed). The compile backend puts it in place of the q / k / v projections feeding a static-fp8 attention,
    so that their GEMMs' epilogues write the attention's operand. weight_bits 4 / 2: every w_q[p] holds an fp8 layer's
    packed integer codes (as packed_fp8_linear's; `w4a8-fp8`). -> fp8 codes, shaped as attention_operand_fp8's."""
    if weight_bits != 8:
        w_q = [unpack_fp8_layer_codes(packed, weight_bits) for packed in w_q]
    parts = [heads_first(fp8_linear_reference(*linear, torch.float32), heads, count)
             for *linear, count in zip(x_q, x_scale, w_q, w_scale, bias, tokens)]
    parts = [part if weight is None else F.rms_norm(part, part.shape[-1:], weight.float(), norm_eps) if norm == "rms"
             else F.layer_norm(part, part.shape[-1:], weight.float(), bias.float(), norm_eps)
             for part, weight, bias in zip(parts, norm_weight, norm_bias)]
    joint = torch.cat(parts, dim=2)
    if rope:
        cos, sin = (table.float() for table in rope)
        joint = joint * cos + rotate_pairs(joint) * sin
    return attention_operand_reference(joint, scale, keys_major)


@linear_attention_operand.register_fake
def _(x_q, x_scale, w_q, w_scale, bias, scale, heads, tokens, keys_major, norm, norm_weight, norm_bias, norm_eps, rope,
      weight_bits=8):
    shape = (x_q[0].shape[0] // tokens[0], heads, sum(tokens), w_q[0].shape[0] // heads)
    return x_q[0].new_empty(attention_operand_shape(*shape, keys_major), dtype=torch.float8_e4m3fn)


@torch.library.custom_op("fxquant::attention_fp8_codes", mutates_args=())
def attention_fp8_codes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, scale: float,
                        operand_scales: torch.Tensor, out_dtype: torch.dtype,
                        out_scale: torch.Tensor | None = None, out_split: int = 0) -> torch.Tensor:
    """quantized_attention with static fp8 operand_scales (fp32 [3]) on operands already quantized and laid out by
    attention_operand_fp8 / linear_attention_operand: q [B, H, Nq, Dp], k [B, H, Nk, Dp], v keys-major
    [B, H, Dv, Nkp] (only the first head_dim channels and Nk keys are read) -> [B, H, Nq, head_dim] in out_dtype,
    stored as [B, Nq, H, head_dim]; with out_scale its fp8 codes, as quantized_attention_codes."""
    n_k = k.shape[2]
    q_scale, k_scale, v_scale = operand_scales.float().unbind()
    out = quantized_attention(q[..., :head_dim].float() * q_scale, k[..., :head_dim].float() * k_scale,
                              v[:, :, :head_dim, :n_k].float().transpose(-1, -2) * v_scale, scale, True,
                              operand_scales).to(out_dtype)  # the codes times their scales requantize exactly
    return out if out_scale is None else split_codes(out, out_scale, out_split)


@attention_fp8_codes.register_fake
def _attention_fp8_codes_fake(q, k, v, head_dim, scale, operand_scales, out_dtype, out_scale=None, out_split=0):
    like = q.new_empty((*q.shape[:3], head_dim))  # the output's shape
    return empty_heads_last(like, torch.float8_e4m3fn if out_scale is not None else out_dtype)


@torch.library.custom_op("fxquant::gluon_attention_fp8_codes", mutates_args=())
def gluon_attention_fp8_codes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int, scale: float,
                              operand_scales: torch.Tensor, out_dtype: torch.dtype,
                              out_scale: torch.Tensor | None = None, out_split: int = 0) -> torch.Tensor:
    """attention_fp8_codes (same arguments, same result) run on Hopper GPUs by the Gluon kernel that keeps its MMAs
    in flight across the softmax, where it applies (the compile backend's option fxquant.gluon_attention); here its
    reference."""
    return attention_fp8_codes(q, k, v, head_dim, scale, operand_scales, out_dtype, out_scale, out_split)


gluon_attention_fp8_codes.register_fake(_attention_fp8_codes_fake)


@torch.library.custom_op("fxquant::unpack_int4", mutates_args=())
def unpack_int4_op(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] (two signed nibbles per byte, quantizer.pack_bits) -> int8 [N, K] for the int8 GEMM."""
    return unpack_int4(packed)


@unpack_int4_op.register_fake
def _(packed):
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=torch.int8)


@torch.library.custom_op("fxquant::unpack_int2", mutates_args=())
def unpack_int2_op(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/4] (four signed 2-bit fields per byte, quantizer.pack_bits) -> int8 [N, K] for the int8 GEMM."""
    return unpack_bits(packed, 2)


@unpack_int2_op.register_fake
def _(packed):
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 4), dtype=torch.int8)


@torch.library.custom_op("fxquant::unpack_fp8_codes", mutates_args=())
def unpack_fp8_codes(packed: torch.Tensor, weight_bits: int) -> torch.Tensor:
    """An fp8 layer's packed 4- / 2-bit weight codes uint8 [N, K * weight_bits / 8]
    (quantizer.unpack_fp8_layer_codes' layouts) -> float8_e4m3fn [N, K] holding the codes exactly, for fp8_linear."""
    return unpack_fp8_layer_e4m3(packed, weight_bits)


@unpack_fp8_codes.register_fake
def _(packed, weight_bits):
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 8 // weight_bits), dtype=torch.float8_e4m3fn)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """A convolution's output length along one spatial dim."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _conv_output(x: torch.Tensor, w_q: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """An empty [B, O, H', W'] output of x's dtype for a convolution of x [B, C, H, W] with w_q [O, C, kh, kw]."""
    batch, _, height, width = x.shape
    out_channels, _, kh, kw = w_q.shape
    out_h = conv_output_size(height, kh, stride[0], padding[0], dilation[0])
    out_w = conv_output_size(width, kw, stride[1], padding[1], dilation[1])
    return x.new_empty((batch, out_channels, out_h, out_w))


@torch.library.custom_op("fxquant::int8_conv2d", mutates_args=())
def int8_conv2d(
    x: torch.Tensor,
    act_scale: torch.Tensor | None,
    act_zero: torch.Tensor | None,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    w_sum: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    """Float x [B, C, H, W] conv int8 w_q [O, C, kh, kw] (scale [O]) -> x.dtype [B, O, H', W'].

    The activation is quantized (asymmetric int8) inside the op. act_scale None: dynamic, one scale and zero point
    per patch (the C*kh*kw input values of one output position: the convolution's "token"; a patch's min / max
    are min- / max-pools of per-pixel channel min / max over the kernel window). act_scale, act_zero [1]:
    static, one for the tensor. w_sum [O]: per-channel sums of w_q for the zero-point correction.
    Reference: im2col, integer matmul, dequantisation with per-patch x per-channel scales, bias, one cast.
    """
    return int8_conv2d_reference(x, act_scale, act_zero, w_q, w_scale, w_sum, bias, stride, padding, dilation)


def int8_conv2d_reference(x, act_scale, act_zero, w_q, w_scale, w_sum, bias, stride, padding, dilation):
    """The reference body of fxquant::int8_conv2d, on any device (kernels are checked against it)."""
    batch, _, height, width = x.shape
    out_channels, _, kh, kw = w_q.shape
    out_h = conv_output_size(height, kh, stride[0], padding[0], dilation[0])
    out_w = conv_output_size(width, kw, stride[1], padding[1], dilation[1])
    cols = F.unfold(x.float(), (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [B, CKK, L]
    cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # [B*L, CKK]: one row per output position
    if act_scale is None:
        scale, zero = asymmetric_params(cols.amin(dim=1, keepdim=True), cols.amax(dim=1, keepdim=True))
    else:
        scale, zero = act_scale.reshape(1, 1), act_zero.reshape(1, 1)
    acc = _int_matmul(quantize_asymmetric(cols, scale, zero), w_q.reshape(out_channels, -1))  # [B*L, O] int32
    acc = acc - zero * w_sum.reshape(1, -1)
    out = acc.float() * scale * w_scale.reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.reshape(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2).to(x.dtype).contiguous()


@int8_conv2d.register_fake
def _(x, act_scale, act_zero, w_q, w_scale, w_sum, bias, stride, padding, dilation):
    return _conv_output(x, w_q, stride, padding, dilation)


@torch.library.custom_op("fxquant::fp8_conv2d", mutates_args=())
def fp8_conv2d(
    x: torch.Tensor,
    act_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    """Float x [B, C, H, W] conv float8 e4m3 w_q [O, C, kh, kw] (scale [O]) -> x.dtype [B, O, H', W'].

    The activation is quantized inside the op to float8 e4m3 with the static act_scale [1] (symmetric, saturated;
    the zero padding is code 0). Reference: a float convolution of the codes, dequantisation by act_scale x
    w_scale, bias, one cast."""
    return fp8_conv2d_reference(x, act_scale, w_q, w_scale, bias, stride, padding, dilation)


def fp8_conv2d_reference(x, act_scale, w_q, w_scale, bias, stride, padding, dilation):
    """The reference body of fxquant::fp8_conv2d, on any device (the kernel is checked against it)."""
    codes = quantize_fp8_with_scale(x, act_scale.reshape(()))
    out = F.conv2d(codes.float(), w_q.float(), None, stride, padding, dilation)
    out = out * act_scale.reshape(()).float() * w_scale.reshape(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.float().reshape(1, -1, 1, 1)
    return out.to(x.dtype).contiguous()


@fp8_conv2d.register_fake
def _(x, act_scale, w_q, w_scale, bias, stride, padding, dilation):
    return _conv_output(x, w_q, stride, padding, dilation)

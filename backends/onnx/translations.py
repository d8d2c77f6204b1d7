"""ONNX translations of the fxquant ops (onnxscript functions for torch.onnx's `custom_translation_table`).

Every quantized layer becomes standard ONNX integer ops that ONNX Runtime runs on its integer GEMM (MLAS u8 x s8):
QuantizeLinear / DynamicQuantizeLinear for the activation, MatMulInteger / ConvInteger for the product, then the
dequantisation (per-row x per-channel scales) and bias in float. Activations travel as uint8 (ORT's fast path is
u8 x s8): fxquant's asymmetric int8 q with zero point z is the same grid as uint8 q + 128 with zero point z + 128.

Three forms of the dynamic activations (`act_form`):
- "per_token": fxquant's own quantizer, one (scale, zero point) per row (per im2col patch for convs), computed in
  the graph with ReduceMin / ReduceMax and applied by a per-axis QuantizeLinear; MatMulInteger accepts only a
  scalar zero point, so the product runs without one and the zero point is corrected with the weights' row sums:
  for a linear with an entry in `zero_point_columns` (per layer, or per weight shape), inside the integer GEMM
  (each row's zero point repeated in that many extra uint8 columns of the activations, against extra int8 weight
  rows summing to -w_sum: one MatMulIntegerToFloat, exact in int32), else as a rank-one float term after the
  scaled product; for per-patch convs exactly in int32. Matches the torch reference up to rounding ties and fp32
  rounding.
- "per_token_symmetric": one scale per row, absmax / 127, and the zero point fixed at the grid's middle (uint8 128):
  a scalar zero point, which MatMulInteger takes, so a linear is one MatMulIntegerToFloat with no correction term
  and no ReduceMin. It changes the numbers (torch's per-token activations are asymmetric); convs keep the exact
  per-patch form above.
- "per_tensor": ONNX's DynamicQuantizeLinear (one uint8 scale / zero point per call), the form ORT fuses; it changes
  the numbers (one range for all tokens). Both changed forms' costs are measured, not assumed.
Static (calibrated) activations use the plan's scale and zero point unchanged in every form. Group-wise weight
scales ([N, G]) make a linear one MatMulIntegerToFloat per group of inputs, summed (`group_wise_linear`).
"""

from __future__ import annotations

import numpy as np
import torch
from onnxscript import ir
from onnxscript import opset20 as op

F32 = ir.DataType.FLOAT
I32 = ir.DataType.INT32
I8 = ir.DataType.INT8
U8 = ir.DataType.UINT8
ACT_FORMS = ("per_token", "per_token_symmetric", "per_tensor")
MIDDLE_U8 = 128  # the uint8 grid's zero for symmetric activations


def _const(value: float):
    return op.Constant(value_float=value)


def _int32(value: int):
    return op.Constant(value=ir.tensor(np.array(value, dtype=np.int32)))


def _axes(*axes: int):
    return op.Constant(value_ints=list(axes))


def _per_row_params(rows):
    """rows [M, K] -> (scale [M, 1], uint8-grid zero point [M, 1] as float): fxquant's asymmetric min-max."""
    low = op.Min(op.ReduceMin(rows, _axes(-1), keepdims=1), _const(0.0))
    high = op.Max(op.ReduceMax(rows, _axes(-1), keepdims=1), _const(0.0))
    scale = op.Max(op.Div(op.Sub(high, low), _const(255.0)), _const(1e-8))
    return scale, op.Round(op.Neg(op.Div(low, scale)))  # the uint8-grid zero = fxquant's int8 zero + 128


def _quantize_rows(rows, scale, zero_u8_grid):
    """Per-row QuantizeLinear (axis 0, scale and uint8 zero point as [M] vectors) -> uint8 [M, K]."""
    return op.QuantizeLinear(rows, op.Reshape(scale, _axes(-1)), op.Cast(op.Reshape(zero_u8_grid, _axes(-1)), to=U8),
                             axis=0)


def _dequantize_product(acc_int32, x_scale, w_scale, bias):
    """int32 accumulator [M, N] -> float: acc * x_scale [M, 1] * w_scale [N] + bias [N]."""
    out = op.Mul(op.Mul(op.Cast(acc_int32, to=F32), x_scale), w_scale)
    return out if bias is None else op.Add(out, bias)


def _corrected_product(x_u8, weight_kn, zero_u8_grid_int32, w_sum):
    """sum_k (q_u8 - zero_u8) w = MatMulInteger(q_u8, w) - zero_u8 [M, 1] * w_sum [N], exact in int32
    (MatMulInteger takes only a scalar zero point)."""
    return op.Sub(op.MatMulInteger(x_u8, weight_kn), op.Mul(zero_u8_grid_int32, op.Unsqueeze(w_sum, _axes(0))))


def _zero_point_product(x_u8, weight_kn, x_scale, zero_u8_grid_int32, w_scale, w_sum, bias):
    """Per-row asymmetric activations against per-channel weights, dequantized: x_scale [M, 1] * w_scale [N] *
    (MatMulInteger(q_u8, w) - zero [M, 1] * w_sum [N]) + bias. Written as MatMulInteger -> Cast -> Mul(x_scale *
    w_scale), which ORT fuses into one MatMulIntegerToFloat (scales applied in the GEMM's output stage), minus the
    rank-one zero-point term (x_scale * zero) (w_scale * w_sum) in float, then the bias, added with the bias first:
    ORT 1.31 and 1.32 fold a trailing constant Add into MatMulIntegerToFloat and then scale it by a per-row A scale."""
    product = op.Mul(op.Cast(op.MatMulInteger(x_u8, weight_kn), to=F32), op.Mul(x_scale, w_scale))
    correction = op.Mul(op.Mul(x_scale, op.Cast(zero_u8_grid_int32, to=F32)), op.Mul(op.Cast(w_sum, to=F32), w_scale))
    out = op.Sub(product, correction)
    return out if bias is None else op.Add(bias, out)


def _augmented_product(x_u8, weight_kn, x_scale, zero_u8_grid_int32, w_scale, w_sum, bias, columns: int):
    """The per-row zero point inside the integer GEMM: x_u8 [M, K] gets `columns` more columns holding its row's
    uint8 zero point, weight_kn [K, N] gets `columns` int8 rows summing to -w_sum (row r: -sign(w_sum) *
    clip(|w_sum| - 127 r, 0, 127); needs columns >= max |w_sum| / 127), so MatMulInteger gives sum_k (q - zero) w
    exactly; the scaling fuses with it into MatMulIntegerToFloat, the bias goes in as a Sub (see
    `_zero_point_product`). The weight rows fold into an initializer when w_sum is constant."""
    zero_columns = op.Expand(op.Cast(zero_u8_grid_int32, to=U8),
                             op.Concat(op.Shape(x_u8, end=-1), _axes(columns), axis=0))
    steps = op.Constant(value=ir.tensor((127 * np.arange(columns, dtype=np.int32))[:, None]))
    magnitude = op.Clip(op.Sub(op.Unsqueeze(op.Abs(w_sum), _axes(0)), steps), _int32(0), _int32(127))
    rows = op.Cast(op.Mul(magnitude, op.Unsqueeze(op.Neg(op.Sign(w_sum)), _axes(0))), to=I8)
    product = op.MatMulInteger(op.Concat(x_u8, zero_columns, axis=-1), op.Concat(weight_kn, rows, axis=0))
    out = op.Mul(op.Cast(product, to=F32), op.Mul(x_scale, w_scale))
    return out if bias is None else op.Sub(out, op.Neg(bias))


def _symmetric_rows(rows, signed: bool = False):
    """rows [M, K] -> (codes [M, K], scale [M, 1]): one scale per row, absmax / 127; the codes as uint8 with zero point
    128, or (signed) as int8 with zero point 0."""
    scale = op.Max(op.Div(op.ReduceMax(op.Abs(rows), _axes(-1), keepdims=1), _const(127.0)), _const(1e-8))
    scale_vector = op.Reshape(scale, _axes(-1))
    zero = np.array(0, dtype=np.int8) if signed else np.array(MIDDLE_U8, dtype=np.uint8)
    zeros = op.Expand(op.Constant(value=ir.tensor(zero)), op.Shape(scale_vector))
    return op.QuantizeLinear(rows, scale_vector, zeros, axis=0), scale


def _symmetric_tokens(x, signed: bool):
    """x [B, H, N, D] -> (codes [B, H, N, D], scale [B, H, N, 1]): `_symmetric_rows` over each token's D values
    (fxquant.quantizer.attention_operands' Q and K)."""
    codes, scale = _symmetric_rows(op.Reshape(x, op.Concat(_axes(-1), op.Shape(x, start=-1), axis=0)), signed)
    return (op.Reshape(codes, op.Shape(x)),
            op.Reshape(scale, op.Concat(op.Shape(x, end=-1), _axes(1), axis=0)))


def _shift_to_uint8_grid(zero_int32):
    """fxquant's int8-grid zero point (int32) -> the uint8-grid one (int32)."""
    return op.Add(zero_int32, _int32(128))


def _group_wise(w_scale) -> bool:
    """Whether a linear's weight scales (a graph value) are group-wise, [N, G] with G > 1 (as quantizer.scale_groups
    says of tensors)."""
    return w_scale.shape is not None and len(w_scale.shape) == 2 and w_scale.shape[1] != 1


def _first_element(tensor):
    """A [M, 1] tensor whose rows are all equal -> its scalar value."""
    return op.Reshape(op.Slice(op.Reshape(tensor, _axes(-1)), _axes(0), _axes(1)), _axes())


def translation_table(act_form: str = "per_token", zero_point_columns: dict | None = None) -> dict:
    """{torch op overload: onnxscript function} for torch.onnx.export(custom_translation_table=...);
    zero_point_columns: extra GEMM columns of the per-token form's linears (see above), keyed by the weight codes'
    graph input name (per layer) or else by their (N, K) shape (export.zero_point_columns)."""
    zero_point_columns = zero_point_columns or {}
    if act_form not in ACT_FORMS:
        raise ValueError(f"act_form must be one of {ACT_FORMS}, got {act_form!r}.")
    per_token = act_form == "per_token"
    per_row = act_form in ("per_token", "per_token_symmetric")  # convs: per-patch, exact, in both per-token forms

    # fxquant::quantize_per_token's outputs (q, scale, zero) are declared int8 / fp32 [M, 1] / int32 [M, 1]; here
    # q is uint8 (export_onnx re-types Cast outputs) and, in the per-tensor form, scale / zero are one value
    # broadcast to [M, 1] so the declared shapes hold.
    # per-tensor form: the [M, 1]-broadcast scale / zero handed on (their declared shapes) -> DynamicQuantizeLinear's
    # own scalars, so int8_linear can use those and ORT fuses the layer into DynamicQuantizeMatMul
    scalar_of: dict[int, tuple] = {}
    symmetric_scales: set[int] = set()  # per-row scales of symmetric activations (zero point: MIDDLE_U8)
    static_scales: set[int] = set()  # static activation scales (one zero point, in every form)

    def quantize_per_token(x):
        if per_token:
            scale, zero = _per_row_params(x)
            return _quantize_rows(x, scale, zero), scale, op.Sub(op.Cast(zero, to=I32), _int32(128))
        if act_form == "per_token_symmetric":
            q, scale = _symmetric_rows(x)
            symmetric_scales.add(id(scale))
            return q, scale, op.Expand(_int32(0), op.Shape(scale))
        q, scale, zero = op.DynamicQuantizeLinear(x)
        column = op.Concat(op.Slice(op.Shape(x), _axes(0), _axes(1)), _axes(1), axis=0)
        scale_rows, zero_rows = op.Expand(scale, column), op.Expand(op.Sub(op.Cast(zero, to=I32), _int32(128)), column)
        scalar_of[id(scale_rows)] = scale, zero
        return q, scale_rows, zero_rows

    def quantize_per_tensor(x, scale, zero, bits: int = 8):
        static_scales.add(id(scale))
        zero_u8 = op.Cast(_shift_to_uint8_grid(zero), to=U8)
        q = op.QuantizeLinear(x, op.Reshape(scale, _axes()), op.Reshape(zero_u8, _axes()))
        if bits == 8:
            return q
        bounds = [op.Constant(value=ir.tensor(np.array(128 + v, dtype=np.uint8)))
                  for v in (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)]
        return op.Clip(q, *bounds)  # the uint8 grid shifted by 128: a signed bits-bit grid

    def one_zero_point(x_scale, x_zero):
        """(the activations' row or tensor scale, their one uint8 zero point for MatMulInteger), or zero None for
        fxquant's per-token activations, whose rows each have their own."""
        if id(x_scale) in scalar_of:  # DynamicQuantizeLinear's own scalars
            return scalar_of[id(x_scale)]
        if id(x_scale) in symmetric_scales:
            return x_scale, op.Constant(value=ir.tensor(np.array(MIDDLE_U8, dtype=np.uint8)))
        if per_token and id(x_scale) not in static_scales:
            return x_scale, None
        return x_scale, op.Cast(_first_element(_shift_to_uint8_grid(x_zero)), to=U8)  # static activations

    def int8_linear(x_q, x_scale, x_zero, w_q, w_scale, w_sum, bias, out_dtype):
        if _group_wise(w_scale):
            return group_wise_linear(x_q, x_scale, x_zero, w_q, w_scale, w_sum, bias)
        weight = op.Transpose(w_q, perm=[1, 0])  # [K, N], folded into the initializer
        scale, zero = one_zero_point(x_scale, x_zero)
        if zero is None:
            columns = zero_point_columns.get(w_q.name, zero_point_columns.get(tuple(w_q.shape or ())))
            zero = _shift_to_uint8_grid(x_zero)
            if columns:
                return _augmented_product(x_q, weight, x_scale, zero, w_scale, w_sum, bias, columns)
            return _zero_point_product(x_q, weight, x_scale, zero, w_scale, w_sum, bias)
        # MatMulInteger -> Cast -> Mul(x_scale * w_scale): ORT fuses it into one MatMulIntegerToFloat (with
        # DynamicQuantizeLinear's scalars: DynamicQuantizeMatMul) where x_scale is computed; a static x_scale folds
        # with w_scale into one constant, which ORT's fusion does not take (it looks for the Mul of the two scales),
        # so static layers stay MatMulInteger -> Cast -> Mul
        out = op.Mul(op.Cast(op.MatMulInteger(x_q, weight, zero), to=F32), op.Mul(scale, w_scale))
        if bias is None:
            return out
        # per-row (symmetric per-token) scales take the bias as a Sub: ORT 1.31 and 1.32 fold an Add of a constant
        # that follows the scaling Mul into MatMulIntegerToFloat, then multiply it by the per-row A scale as well (see
        # _zero_point_product); one scale for all rows folds it correctly
        return op.Sub(out, op.Neg(bias)) if id(x_scale) in symmetric_scales else op.Add(out, bias)

    def group_wise_linear(x_q, x_scale, x_zero, w_q, w_scale, w_sum, bias):
        """Group-wise weight scales (w_scale / w_sum [N, G]): one integer product per group of inputs
        ([M, K / G] x [K / G, N]) scaled by the row scales times that group's weight scales (MatMulInteger -> Cast ->
        Mul, which ORT fuses into MatMulIntegerToFloat), the G products summed in one Sum; a per-row zero point comes
        off as the rank-one term x_scale * zero * sum_g w_scale[:, g] w_sum[:, g] (MatMulInteger's zero point must be
        one value there), a scalar one (symmetric, per-tensor, static forms) goes into each MatMulInteger."""
        groups, width = w_scale.shape[1], w_q.shape[1] // w_scale.shape[1]
        weight = op.Transpose(w_q, perm=[1, 0])  # [K, N], folded into the initializer
        x_scale, zero = one_zero_point(x_scale, x_zero)
        correction = None
        if zero is None:
            scaled_sums = op.ReduceSum(op.Mul(op.Cast(w_sum, to=F32), w_scale), _axes(1), keepdims=0)  # [N]
            correction = op.Mul(op.Mul(x_scale, op.Cast(_shift_to_uint8_grid(x_zero), to=F32)), scaled_sums)
        parts = []
        for group in range(groups):
            start, stop = _axes(group * width), _axes((group + 1) * width)
            product = op.MatMulInteger(op.Slice(x_q, start, stop, _axes(-1)), op.Slice(weight, start, stop, _axes(0)),
                                       *([zero] if zero is not None else []))
            group_scale = op.Reshape(op.Slice(w_scale, _axes(group), _axes(group + 1), _axes(1)), _axes(-1))
            parts.append(op.Mul(op.Cast(product, to=F32), op.Mul(x_scale, group_scale)))
        out = op.Sum(*parts)
        out = out if correction is None else op.Sub(out, correction)
        return out if bias is None else op.Sub(out, op.Neg(bias))  # the bias as a Sub, as in _zero_point_product

    def unpack(packed, bits: int):
        """uint8 [N, K * bits / 8] -> int8 [N, K]: field i of every byte, for i = 0 .. 8 / bits - 1 (lowest bits
        first), concatenated along K and sign-extended (fxquant.quantizer.unpack_bits)."""
        mask = op.Constant(value=ir.tensor(np.array(2**bits - 1, dtype=np.uint8)))
        fields = [op.BitwiseAnd(op.BitShift(packed, op.Constant(value=ir.tensor(np.array(i * bits, dtype=np.uint8))),
                                            direction="RIGHT"), mask) for i in range(8 // bits)]
        unsigned = op.Cast(op.Concat(*fields, axis=-1), to=I32)
        signed = op.Sub(unsigned, op.Mul(op.Cast(op.Greater(unsigned, _int32(2 ** (bits - 1) - 1)), to=I32),
                                         _int32(2**bits)))
        return op.Cast(signed, to=ir.DataType.INT8)

    def unpack_int4(packed):
        return unpack(packed, 4)

    def unpack_int2(packed):
        return unpack(packed, 2)

    def int8_conv2d(x, act_scale, act_zero, w_q, w_scale, w_sum, bias, stride, padding, dilation):
        out_channels, in_channels, kh, kw = w_q.shape
        pads = [padding[0], padding[1], padding[0], padding[1]]
        if act_scale is not None or not per_row:
            if act_scale is not None:  # static: the plan's scale and zero point
                q, scale = quantize_per_tensor(x, act_scale, act_zero), op.Reshape(act_scale, _axes())
                zero = op.Reshape(op.Cast(_shift_to_uint8_grid(act_zero), to=U8), _axes())
            else:
                q, scale, zero = op.DynamicQuantizeLinear(x)
            acc = op.ConvInteger(q, w_q, zero, strides=stride, pads=pads, dilations=dilation)
            out = op.Mul(op.Mul(op.Cast(acc, to=F32), scale), op.Reshape(w_scale, _axes(-1, 1, 1)))
            return out if bias is None else op.Add(out, op.Reshape(bias, _axes(-1, 1, 1)))
        # per patch: im2col as a depthwise convolution with one-hot kernels (exact copies of the inputs), channels
        # ordered (c, i, j) like torch's unfold; then one quantized row per output position
        patch = in_channels * kh * kw
        one_hot = np.zeros((patch, 1, kh, kw), dtype=np.float32)
        one_hot[np.arange(patch), 0, np.tile(np.repeat(np.arange(kh), kw), in_channels),
                np.tile(np.arange(kw), kh * in_channels)] = 1.0
        cols = op.Conv(x, op.Constant(value=ir.tensor(one_hot)), group=in_channels, strides=stride, pads=pads,
                       dilations=dilation)  # [B, patch, H', W']
        out_shape = op.Shape(cols)
        rows = op.Reshape(op.Transpose(cols, perm=[0, 2, 3, 1]), op.Constant(value_ints=[-1, patch]))
        scale, zero = _per_row_params(rows)
        weight = op.Transpose(op.Reshape(w_q, op.Constant(value_ints=[out_channels, patch])), perm=[1, 0])
        acc = _corrected_product(_quantize_rows(rows, scale, zero), weight, op.Cast(zero, to=I32), w_sum)
        out = _dequantize_product(acc, scale, w_scale, bias)  # [B*H'*W', O]
        batch_hw = op.Concat(op.Slice(out_shape, _axes(0), _axes(1)), op.Slice(out_shape, _axes(2), _axes(4)),
                             axis=0)
        out = op.Reshape(out, op.Concat(batch_hw, op.Constant(value_ints=[out_channels]), axis=0))
        return op.Transpose(out, perm=[0, 3, 1, 2])

    def quantized_attention(q, k, v, scale: float, pv_fp8: bool, operand_scales=None):
        """The "int8" format (fxquant.quantizer.attention_operands): Q and K symmetric int8 per token, K first minus
        its mean over tokens; Q K^T as one batched MatMulInteger (Q as uint8 around 128, K^T int8), scaled per query
        x per key, Softmax, then P V in float. export_onnx refuses the fp8 formats before this is reached."""
        if pv_fp8 or operand_scales is not None:
            raise ValueError("Only attention='int8' has an ONNX translation (ORT's CPU provider has no fp8 matmul).")
        q_u8, q_scale = _symmetric_tokens(q, signed=False)
        k_s8, k_scale = _symmetric_tokens(op.Sub(k, op.ReduceMean(k, _axes(-2), keepdims=1)), signed=True)
        middle = op.Constant(value=ir.tensor(np.array(MIDDLE_U8, dtype=np.uint8)))
        acc = op.MatMulInteger(q_u8, op.Transpose(k_s8, perm=[0, 1, 3, 2]), middle)
        # the softmax scale rides on Q's scale, so the scaling is Mul(a_scale, b_scale) of ORT's MatMulIntegerToFloat
        # pattern (per query [.., Nq, 1] x per key [.., 1, Nk]), applied in the GEMM's output stage
        score_scale = op.Mul(op.Mul(q_scale, _const(scale)), op.Transpose(k_scale, perm=[0, 1, 3, 2]))
        return op.MatMul(op.Softmax(op.Mul(op.Cast(acc, to=F32), score_scale), axis=-1), v)

    def squeeze_dim(x, dim):
        """torch's squeeze(dim) is a no-op when that dim is not 1; torchlib's translation emits a failing Squeeze."""
        if x.shape is not None and isinstance(x.shape[dim], int) and x.shape[dim] != 1:
            return op.Identity(x)
        return op.Squeeze(x, _axes(dim))

    def bucketize(t, boundaries, out_int32=False, right=False):
        """torch.bucketize for the timestep-group index: the number of boundaries at or below (right) each value."""
        below = op.LessOrEqual(boundaries, op.Unsqueeze(t, _axes(-1))) if right else op.Less(
            boundaries, op.Unsqueeze(t, _axes(-1)))
        return op.ReduceSum(op.Cast(below, to=ir.DataType.INT64), _axes(-1), keepdims=0)

    fxq = torch.ops.fxquant
    return {
        fxq.quantize_per_token.default: quantize_per_token,
        fxq.quantize_per_tensor.default: quantize_per_tensor,
        fxq.int8_linear.default: int8_linear,
        fxq.unpack_int4.default: unpack_int4,
        fxq.unpack_int2.default: unpack_int2,
        fxq.int8_conv2d.default: int8_conv2d,
        fxq.quantized_attention.default: quantized_attention,
        torch.ops.aten.squeeze.dim: squeeze_dim,
        torch.ops.aten.bucketize.Tensor: bucketize,
    }

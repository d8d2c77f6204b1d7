"""Runtime modules of a converted model: packed int8 / int4 / fp8 weights and fxquant ops, no float weights.

`QuantLinear` / `QuantConv2d` replace `nn.Linear` / `nn.Conv2d` at the module FQNs the plan quantizes. They are
built either from the float module (`from_float`, at convert time) or as empty shells on the meta device
(`from_plan`, when a checkpoint is loaded) so loading never materialises full-precision weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops  # noqa: F401  (registers torch.ops.fxquant)
from .balance import rotate, rotation_signs
from .plan import LayerPlan
from .quantizer import (dequantize_weights, pack_bits, pack_sign_magnitude, plane_widths, quantize_fp8,
                        quantize_weight_per_channel, quantize_weight_planes, scale_groups, weight_sums)

fxq = torch.ops.fxquant


def _static_act_params(layer: LayerPlan, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(fp32 scale [G], int32 zero [G]) of a layer with static activations, else (None, None)."""
    if layer.act_mode != "static_per_tensor" or layer.act_bits == 16:
        return None, None
    if not layer.act_scale or not layer.act_zero:
        raise ValueError(f"Layer {layer.fqn!r} uses static activations but the plan holds no act_scale / act_zero.")
    return (torch.tensor(layer.act_scale, dtype=torch.float32, device=device),
            torch.tensor(layer.act_zero, dtype=torch.int32, device=device))


def combined_weight_sums(plane_sums: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """Row sums of nested planes' codes [P, N] combined by plane multipliers [P] (one timestep group) or [G, P] (every
    group) -> int32 [N] or [G, N]: the row sums of the codes those multipliers build."""
    return (plane_sums * multipliers.unsqueeze(-1)).sum(dim=-2, dtype=torch.int32)


def _static_params_for_call(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The static (scale [1], zero [1]) of the current call: group 0, or the group QuantizedModel selected."""
    if module._timestep is None:
        return module.act_scale[:1], module.act_zero[:1]
    index = module._timestep.index
    return module.act_scale.index_select(0, index), module.act_zero.index_select(0, index)


def _register_quant_buffers(module: nn.Module, weight_q: torch.Tensor, has_bias: bool, bias_dtype: torch.dtype,
                            act_params: tuple, fp8: bool, scale_groups: int = 0) -> None:
    """Buffers every quantized layer has: weight_q (given, empty), weight_scale (fp32 [N] per output channel, or
    [N, scale_groups] per group of inputs) and, for int8 activations, weight_sum (int32, shaped alike; None for fp8,
    whose activations have no zero point), bias in the model's dtype or None, static act_scale / act_zero or None."""
    out, device = weight_q.shape[0], weight_q.device
    shape = (out, scale_groups) if scale_groups else (out,)
    module.register_buffer("weight_q", weight_q)
    module.register_buffer("weight_scale", torch.empty(shape, dtype=torch.float32, device=device))
    module.register_buffer("weight_sum", None if fp8 else torch.empty(shape, dtype=torch.int32, device=device))
    module.register_buffer("bias", torch.empty(out, dtype=bias_dtype, device=device) if has_bias else None)
    module.register_buffer("act_scale", act_params[0])
    module.register_buffer("act_zero", act_params[1])


class QuantLinear(nn.Module):
    """y = int8_linear(quantize(balance(x)), weights, ...); x [..., K] -> y [..., N] in x's dtype.

    Weights are stored as planes (fxquant.quantizer.quantize_weight_planes): one plane of 8 bits (int8 [N, K]),
    4 bits (uint8 [N, K/2]) or 2 bits (uint8 [N, K/4]); or nested planes (e.g. 4 + 4) when the bits differ per
    timestep group, of which each group uses the first few (plane_multipliers int32 [G, P] combines them into the
    group's int8 codes on the device, level_divisor fp32 [G] refines the scale). Buffers: weight_q (plane 0),
    weight_q1, weight_q2 (further planes), weight_scale fp32 [N] (of plane 0), weight_sum int32 [N] (row sums of
    the codes; [P, N] per plane when nested), bias or None; inputs_per_scale > 0 (one 4- / 2-bit plane, group-wise:
    LayerPlan.inputs_per_scale): weight_scale and weight_sum [N, K / inputs_per_scale], one per group of inputs; fp8: fp8 activations against weight_q float8_e4m3fn
    [N, K], or (one 4- / 2-bit plane) the packed integer codes (4 bits: quantizer.pack_sign_magnitude's layout),
    unpacked into e4m3 (exact) per call, no weight_sum.
    act_scale fp32 [G] / act_zero int32 [G] (fp8: zeros) for static activations, None when per token;
    smooth_inv / rotation_signs fp32 [K] when balanced (fxquant.balance). fp_tokens > 0 (BOS-aware): the first
    fp_tokens tokens of x [..., L, K] skip activation quantization (full-precision x against the dequantized
    weights), or take the stored fp_token_out [fp_tokens, N] when they are the same for every prompt.
    """

    _timestep = None  # a fxquant.timestep.TimestepGroup when scales or weight bits are per timestep group

    def __init__(self, in_features: int, out_features: int, has_bias: bool, act_params: tuple,
                 bias_dtype: torch.dtype, planes: list[int] = (8,), group_planes: list[int] | None = None,
                 smoothed: bool = False, rotation_block: int = 0, fp8: bool = False, fp_tokens: int = 0,
                 fp_tokens_cached: bool = False, act_bits: int = 8, inputs_per_scale: int = 0, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.inputs_per_scale = inputs_per_scale
        self.act_bits = act_bits
        self.planes = list(planes)
        self.rotation_block = rotation_block
        self.fp8 = fp8
        self.fp_tokens = fp_tokens
        if fp8 and len(self.planes) > 1:
            raise ValueError(f"fp8 activations take one weight plane, got planes {self.planes} (nested planes "
                             "combine into codes wider than float8 e4m3 holds exactly).")
        if inputs_per_scale and (self.planes not in ([4], [2]) or in_features % inputs_per_scale):
            raise ValueError(f"group-wise scales take one 4- / 2-bit plane whose {in_features} inputs split into "
                             f"groups of {inputs_per_scale}; got planes {self.planes}")
        first = torch.empty((out_features, in_features), dtype=torch.float8_e4m3fn if fp8 else torch.int8,
                            device=device) if self.planes[0] == 8 else _packed_plane(out_features, in_features,
                                                                                     self.planes[0], device)
        _register_quant_buffers(self, first, has_bias, bias_dtype, act_params, fp8,
                                in_features // inputs_per_scale if inputs_per_scale else 0)
        for index, width in enumerate(self.planes[1:], start=1):
            self.register_buffer(f"weight_q{index}", _packed_plane(out_features, in_features, width, device))
        if len(self.planes) > 1:
            multipliers, divisors = _plane_tables(self.planes, group_planes)
            self.weight_sum = torch.empty(len(self.planes), out_features, dtype=torch.int32, device=device)
            self.register_buffer("plane_multipliers", multipliers.to(device))
            self.register_buffer("level_divisor", divisors.to(device))
        vector = (lambda: torch.empty(in_features, dtype=torch.float32, device=device))
        self.register_buffer("smooth_inv", vector() if smoothed else None)
        self.register_buffer("rotation_signs", vector() if rotation_block else None)
        self.register_buffer("fp_token_out", torch.empty(fp_tokens, out_features, dtype=torch.float32,
                                                         device=device) if fp_tokens_cached else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, layer: LayerPlan, seed: int = 0,
                   fp_rows: torch.Tensor | None = None) -> QuantLinear:
        """Fold the plan's balancing into the weight (W * s, then W R), quantize it per output channel (or group of
        inputs) into its planes, pack. fp_rows [fp_tokens, K]: the constant leading tokens whose outputs are stored (BOS-aware)."""
        weight = linear.weight.detach().float()
        device = weight.device
        planes = plane_widths(layer.group_weight_bits or [layer.weight_bits])
        cached = layer.fp_tokens_cached and fp_rows is not None
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     _static_act_params(layer, device), linear.weight.dtype, planes,
                     _group_planes(planes, layer.group_weight_bits), smoothed=_smooths_at_run_time(layer),
                     rotation_block=layer.rotation_block or 0, fp8=layer.number_format == "fp8",
                     fp_tokens=layer.fp_tokens, fp_tokens_cached=cached, act_bits=layer.act_bits or 8,
                     inputs_per_scale=layer.inputs_per_scale, device=device)
        if cached:
            module.fp_token_out = linear(fp_rows.to(device, linear.weight.dtype)).detach().float()
        if layer.smooth is not None:
            smooth = torch.tensor(layer.smooth, dtype=torch.float32, device=device)
            weight = weight * smooth
            if module.smooth_inv is not None:
                module.smooth_inv = smooth.reciprocal()
        if layer.rotation_block:
            module.rotation_signs = rotation_signs(linear.in_features, layer.fqn, seed).to(device)
            weight = rotate(weight, module.rotation_signs, layer.rotation_block)
        if module.fp8 and planes == [8]:
            module.weight_q, scale = quantize_fp8(weight, dim=1)
            module.weight_scale = scale.reshape(-1)
        else:
            codes, module.weight_scale = quantize_weight_planes(weight, planes, module.inputs_per_scale)
            if not module.fp8:
                sums = [weight_sums(code, scale_groups(module.weight_scale)) for code in codes]
                module.weight_sum = sums[0] if len(codes) == 1 else torch.stack(sums)
            for index, (code, width) in enumerate(zip(codes, planes)):
                if width != 8:
                    code = pack_sign_magnitude(code) if module.fp8 and width == 4 else pack_bits(code, width)
                setattr(module, "weight_q" if index == 0 else f"weight_q{index}", code)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    @classmethod
    def from_plan(cls, layer: LayerPlan, has_bias: bool, bias_dtype: torch.dtype) -> QuantLinear:
        planes = plane_widths(layer.group_weight_bits or [layer.weight_bits])
        return cls(layer.in_features, layer.out_features, has_bias, _static_act_params(layer, "meta"), bias_dtype,
                   planes, _group_planes(planes, layer.group_weight_bits), smoothed=_smooths_at_run_time(layer),
                   rotation_block=layer.rotation_block or 0, fp8=layer.number_format == "fp8",
                   fp_tokens=layer.fp_tokens, fp_tokens_cached=layer.fp_tokens_cached,
                   act_bits=layer.act_bits or 8, inputs_per_scale=layer.inputs_per_scale, device="meta")

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(int8 codes [N, K], fp32 scale [N], int32 row sums [N]) of the current call (its timestep group's
        planes when they are nested)."""
        if len(self.planes) == 1:
            return _unpack_plane(self.weight_q, self.planes[0]), self.weight_scale, self.weight_sum
        index = self._timestep.index if self.plane_multipliers.shape[0] > 1 else self.plane_multipliers.new_zeros(
            1, dtype=torch.int64)
        multipliers = self.plane_multipliers.index_select(0, index).reshape(-1)
        codes = _unpack_plane(self.weight_q, self.planes[0]).to(torch.int32) * multipliers[0]
        for plane in range(1, len(self.planes)):
            codes = codes + _unpack_plane(getattr(self, f"weight_q{plane}"), self.planes[plane]) * multipliers[plane]
        weight_sum = combined_weight_sums(self.weight_sum, multipliers)
        return codes.to(torch.int8), self.weight_scale / self.level_divisor.index_select(0, index), weight_sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp_tokens:
            head, x = x[..., :self.fp_tokens, :], x[..., self.fp_tokens:, :]
        rows = self._balance(x.reshape(-1, self.in_features))
        out, weight_q, weight_scale = (self._fp8_forward if self.fp8 else self._int_forward)(rows, x.dtype)
        out = out.reshape(*x.shape[:-1], self.out_features)
        if self.fp_tokens:
            out = torch.cat([self._full_precision_tokens(head, weight_q, weight_scale).to(out.dtype), out], dim=-2)
        return out

    def _fp8_forward(self, rows: torch.Tensor, dtype: torch.dtype):
        """rows [M, K] -> (out [M, N] in dtype, the fp8 weights, their scales); activations per token or static;
        packed integer codes unpacked into their e4m3 values first (fxquant::unpack_fp8_codes)."""
        weight_q = self.weight_q if self.planes == [8] else fxq.unpack_fp8_codes(self.weight_q, self.planes[0])
        if self.act_scale is None:
            x_q, x_scale = fxq.quantize_per_token_fp8(rows)
        else:
            x_scale = _static_params_for_call(self)[0]
            x_q = fxq.quantize_per_tensor_fp8(rows, x_scale)
        out = fxq.fp8_linear(x_q, x_scale, weight_q, self.weight_scale, self.bias, dtype)
        return out, weight_q, self.weight_scale

    def _int_forward(self, rows: torch.Tensor, dtype: torch.dtype):
        """rows [M, K] -> (out [M, N] in dtype, the call's int8 weight codes, their scales)."""
        weight_q, weight_scale, weight_sum = self._weights()
        if self.act_bits == 16:  # weight-only: the dequantized weights in the activations' dtype
            weight = dequantize_weights(weight_q, weight_scale).to(rows.dtype)
            out = F.linear(rows, weight, None if self.bias is None else self.bias.to(rows.dtype)).to(dtype)
        elif self.act_scale is None:
            x_q, x_scale, x_zero = fxq.quantize_per_token(rows)
            out = fxq.int8_linear(x_q, x_scale, x_zero, weight_q, weight_scale, weight_sum, self.bias, dtype)
        else:
            x_scale, x_zero = _static_params_for_call(self)
            x_q = fxq.quantize_per_tensor(rows, x_scale, x_zero, self.act_bits)
            out = fxq.int8_linear(x_q, x_scale, x_zero, weight_q, weight_scale, weight_sum, self.bias, dtype)
        return out, weight_q, weight_scale

    def _balance(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> (x / s) R: the run-time part of channel balancing (either step may be absent)."""
        if self.smooth_inv is not None:
            x = x * self.smooth_inv.to(x.dtype)
        if self.rotation_signs is not None:
            x = rotate(x, self.rotation_signs, self.rotation_block)
        return x

    def _full_precision_tokens(self, head: torch.Tensor, weight_q: torch.Tensor,
                               weight_scale: torch.Tensor) -> torch.Tensor:
        """Outputs [..., fp_tokens, N] of the leading tokens: stored, or x (balanced like the other tokens) against
        the dequantized weights, in fp32."""
        if self.fp_token_out is not None:
            return self.fp_token_out.expand(*head.shape[:-1], self.out_features)
        head = self._balance(head)
        weight = dequantize_weights(weight_q, weight_scale)
        return F.linear(head.float(), weight, None if self.bias is None else self.bias.float())

    def extra_repr(self) -> str:
        mode = "A16 (not quantized)" if self.act_bits == 16 else \
            f"A{self.act_bits} " + ("dynamic per-token" if self.act_scale is None else "static per-tensor")
        balance = [name for name, on in (("smooth", self.smooth_inv is not None),
                                         (f"rotate{self.rotation_block}", self.rotation_signs is not None)) if on]
        weights = "W" + "+".join(map(str, self.planes))
        if self.fp8:
            weights = "fp8 e4m3" if self.planes == [8] else f"{weights} codes as fp8 e4m3"
        granularity = f"group {self.inputs_per_scale}" if self.inputs_per_scale else "per-channel"
        return (f"in={self.in_features}, out={self.out_features}, {weights} {granularity}, {mode}"
                + (f", {'+'.join(balance)}" if balance else "")
                + (f", first {self.fp_tokens} tokens full precision" if self.fp_tokens else ""))


def _smooths_at_run_time(layer: LayerPlan) -> bool:
    """Smoothed, and the 1 / s not folded into a preceding norm: x / s is a multiply in forward."""
    return layer.smooth is not None and layer.smooth_folded_into is None


def _packed_plane(out_features: int, in_features: int, width: int, device) -> torch.Tensor:
    return torch.empty(out_features, in_features * width // 8, dtype=torch.uint8, device=device)


def _unpack_plane(plane: torch.Tensor, width: int) -> torch.Tensor:
    """A stored plane -> its int8 codes [N, K] (unpacked by the fxquant ops the backends replace)."""
    return plane if width == 8 else fxq.unpack_int4(plane) if width == 4 else fxq.unpack_int2(plane)


def _group_planes(planes: list[int], group_bits: list[int] | None) -> list[int] | None:
    """Per timestep group: how many of the nested planes its bit-width uses (None for a single plane; one entry
    when the layer runs at one width stored in several planes, e.g. 6 = 4 + 2)."""
    if len(planes) == 1:
        return None
    if group_bits is None:
        return [len(planes)]
    totals = [sum(planes[:count]) for count in range(1, len(planes) + 1)]
    return [totals.index(bits) + 1 for bits in group_bits]


def _plane_tables(planes: list[int], group_planes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 [G, P] multipliers: codes = sum_p plane_p * m[g, p]; fp32 [G] scale divisors 2^(refinement bits))."""
    multipliers = torch.zeros(len(group_planes), len(planes), dtype=torch.int32)
    divisors = torch.ones(len(group_planes), dtype=torch.float32)
    for group, used in enumerate(group_planes):
        for plane in range(used):
            multipliers[group, plane] = 2 ** sum(planes[plane + 1:used])
        divisors[group] = 2.0 ** sum(planes[1:used])
    return multipliers, divisors


def _fp8_conv(layer: LayerPlan) -> bool:
    """Whether a convolution's plan asks for fp8, which the conv kernel runs with 8-bit weights and static
    activations only."""
    if layer.number_format != "fp8":
        return False
    if layer.weight_bits != 8 or layer.act_mode != "static_per_tensor":
        raise ValueError(f"Layer {layer.fqn!r}: an fp8 convolution needs 8-bit weights and static activations "
                         f"(static_conv_activations=true); the plan gives {layer.weight_bits}-bit weights and "
                         f"{layer.act_mode} activations.")
    return True


class QuantConv2d(nn.Module):
    """Int8 conv2d: x [B, C, H, W] quantized inside the op, one scale per patch (dynamic) or per tensor (static);
    or (fp8) float8 e4m3 weights and activations, the activations with a static per-tensor scale.

    weight_q: int8 [O, C, kh, kw] stored channels-last (the order the implicit-GEMM kernel reads) (8-bit), the
    codes packed over C*kh*kw, uint8 [O, C*kh*kw*bits/8] (4 / 2 bits, unpacked for the op), or (fp8)
    float8_e4m3fn [O, C, kh, kw] channels-last with per-output-channel scales."""

    _timestep = None  # a fxquant.timestep.TimestepGroup when static scales are per timestep group

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride, padding,
                 dilation, has_bias: bool, act_params: tuple, bias_dtype: torch.dtype, weight_bits: int = 8,
                 fp8: bool = False, device=None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = list(stride)
        self.padding = list(padding)
        self.dilation = list(dilation)
        self.weight_bits = weight_bits
        self.fp8 = fp8
        patch = in_channels * self.kernel_size[0] * self.kernel_size[1]
        weight_q = torch.empty(out_channels, in_channels, *kernel_size, device=device,
                               dtype=torch.float8_e4m3fn if fp8 else torch.int8, memory_format=torch.channels_last) \
            if weight_bits == 8 else _packed_plane(out_channels, patch, weight_bits, device)
        _register_quant_buffers(self, weight_q, has_bias, bias_dtype, act_params, fp8)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, layer: LayerPlan) -> QuantConv2d:
        weight = conv.weight.detach()
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.bias is not None, _static_act_params(layer, weight.device), weight.dtype,
                     layer.weight_bits, _fp8_conv(layer), device=weight.device)
        if module.fp8:
            codes, scale = quantize_fp8(weight.reshape(weight.shape[0], -1), dim=1)
            module.weight_q = codes.reshape(weight.shape).contiguous(memory_format=torch.channels_last)
            module.weight_scale = scale.reshape(-1)
        else:
            codes, module.weight_scale = quantize_weight_per_channel(weight, layer.weight_bits)
            module.weight_sum = weight_sums(codes)
            module.weight_q = codes.contiguous(memory_format=torch.channels_last) if layer.weight_bits == 8 else \
                pack_bits(codes.reshape(codes.shape[0], -1), layer.weight_bits)
        if conv.bias is not None:
            module.bias = conv.bias.detach().clone()
        return module

    @classmethod
    def from_plan(cls, layer: LayerPlan, conv_meta: nn.Conv2d, bias_dtype: torch.dtype) -> QuantConv2d:
        return cls(conv_meta.in_channels, conv_meta.out_channels, conv_meta.kernel_size, conv_meta.stride,
                   conv_meta.padding, conv_meta.dilation, conv_meta.bias is not None,
                   _static_act_params(layer, "meta"), bias_dtype, layer.weight_bits, _fp8_conv(layer), device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act_scale, act_zero = _static_params_for_call(self) if self.act_scale is not None else (None, None)
        if self.fp8:
            return fxq.fp8_conv2d(x, act_scale, self.weight_q, self.weight_scale, self.bias, self.stride,
                                  self.padding, self.dilation)
        weight_q = self.weight_q if self.weight_bits == 8 else _unpack_plane(self.weight_q, self.weight_bits).reshape(
            self.out_channels, self.in_channels, *self.kernel_size)
        return fxq.int8_conv2d(x, act_scale, act_zero, weight_q, self.weight_scale, self.weight_sum, self.bias,
                               self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        mode = "dynamic per-patch" if self.act_scale is None else "static per-tensor"
        weights = "fp8 e4m3" if self.fp8 else f"W{self.weight_bits}"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"{weights} per-channel, A{'fp8' if self.fp8 else '8'} {mode}")


QUANT_MODULES = (QuantLinear, QuantConv2d)

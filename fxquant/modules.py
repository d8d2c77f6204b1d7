"""Runtime modules of a converted model: packed int8 / int4 / fp8 weights and fxquant ops, no float weights.

`QuantLinear` / `QuantConv2d` replace `nn.Linear` / `nn.Conv2d` at the module FQNs the plan quantizes. They are
built either from the float module (`from_float`, at convert time) or as empty shells on the meta device
(`from_plan`, when a checkpoint is loaded) so loading never materialises full-precision weights.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops  # noqa: F401  (registers torch.ops.fxquant)
from .balance import rotate, rotation_signs
from .plan import LayerPlan
from .quantizer import pack_int4, quantize_fp8, quantize_weight_per_channel

fxq = torch.ops.fxquant


def _static_act_params(layer: LayerPlan, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(fp32 scale [G], int32 zero [G]) of a layer with static activations, else (None, None)."""
    if layer.act_mode != "static_per_tensor":
        return None, None
    if not layer.act_scale or not layer.act_zero:
        raise ValueError(f"Layer {layer.fqn!r} uses static activations but the plan holds no act_scale / act_zero.")
    return (torch.tensor(layer.act_scale, dtype=torch.float32, device=device),
            torch.tensor(layer.act_zero, dtype=torch.int32, device=device))


def _weight_sum(weight_q: torch.Tensor) -> torch.Tensor:
    """int32 [N]: per-output-channel sums of the int8 weights (the activation zero-point correction)."""
    return weight_q.reshape(weight_q.shape[0], -1).sum(dim=1, dtype=torch.int32)


def _static_params_for_call(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The static (scale [1], zero [1]) of the current call: group 0, or the group QuantizedModel selected."""
    if module._timestep is None:
        return module.act_scale[:1], module.act_zero[:1]
    index = module._timestep.index
    return module.act_scale.index_select(0, index), module.act_zero.index_select(0, index)


def _register_quant_buffers(module: nn.Module, weight_q: torch.Tensor, has_bias: bool, bias_dtype: torch.dtype,
                            act_params: tuple) -> None:
    """Buffers every quantized layer has: weight_q (given, empty), per-output-channel weight_scale (fp32) and, for
    integer weights, weight_sum (int32; None for fp8), bias in the model's dtype or None, static act_scale /
    act_zero or None."""
    out, device = weight_q.shape[0], weight_q.device
    integer = weight_q.dtype != torch.float8_e4m3fn
    module.register_buffer("weight_q", weight_q)
    module.register_buffer("weight_scale", torch.empty(out, dtype=torch.float32, device=device))
    module.register_buffer("weight_sum", torch.empty(out, dtype=torch.int32, device=device) if integer else None)
    module.register_buffer("bias", torch.empty(out, dtype=bias_dtype, device=device) if has_bias else None)
    module.register_buffer("act_scale", act_params[0])
    module.register_buffer("act_zero", act_params[1])


class QuantLinear(nn.Module):
    """y = int8_linear(quantize(balance(x)), weight_q, ...); x [..., K] -> y [..., N] in x's dtype.

    Buffers: weight_q int8 [N, K] (8-bit), uint8 [N, K/2] (4-bit, two per byte) or float8_e4m3fn [N, K] (fp8,
    activations then fp8 per token too), weight_scale fp32 [N], weight_sum int32 [N] (integer formats), bias
    (model dtype) or None; act_scale fp32 [G] and act_zero int32 [G] for static activations (G timestep groups),
    None when activations are quantized per token at run time; smooth_inv fp32 [K] (1 / smoothing factors) and
    rotation_signs fp32 [K] when the layer is balanced (fxquant.balance).
    """

    _timestep = None  # a fxquant.timestep.TimestepGroup when static scales are per timestep group

    def __init__(self, in_features: int, out_features: int, has_bias: bool, act_params: tuple,
                 bias_dtype: torch.dtype, weight_bits: int = 8, smoothed: bool = False, rotation_block: int = 0,
                 fp8: bool = False, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_bits = weight_bits
        self.rotation_block = rotation_block
        self.fp8 = fp8
        packed = (out_features, in_features // 2) if weight_bits == 4 else (out_features, in_features)
        weight_dtype = torch.float8_e4m3fn if fp8 else torch.uint8 if weight_bits == 4 else torch.int8
        _register_quant_buffers(self, torch.empty(packed, dtype=weight_dtype, device=device), has_bias, bias_dtype,
                                act_params)
        vector = (lambda: torch.empty(in_features, dtype=torch.float32, device=device))
        self.register_buffer("smooth_inv", vector() if smoothed else None)
        self.register_buffer("rotation_signs", vector() if rotation_block else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, layer: LayerPlan, seed: int = 0) -> QuantLinear:
        """Fold the plan's balancing into the weight (W * s, then W R), quantize it per output channel, pack."""
        weight = linear.weight.detach().float()
        device = weight.device
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     _static_act_params(layer, device), linear.weight.dtype, layer.weight_bits,
                     smoothed=layer.smooth is not None, rotation_block=layer.rotation_block or 0,
                     fp8=layer.number_format == "fp8", device=device)
        if layer.smooth is not None:
            smooth = torch.tensor(layer.smooth, dtype=torch.float32, device=device)
            weight = weight * smooth
            module.smooth_inv = smooth.reciprocal()
        if layer.rotation_block:
            module.rotation_signs = rotation_signs(linear.in_features, layer.fqn, seed).to(device)
            weight = rotate(weight, module.rotation_signs, layer.rotation_block)
        if module.fp8:
            module.weight_q, scale = quantize_fp8(weight, dim=1)
            module.weight_scale = scale.reshape(-1)
        else:
            weight_q, module.weight_scale = quantize_weight_per_channel(weight, layer.weight_bits)
            module.weight_sum = _weight_sum(weight_q)
            module.weight_q = pack_int4(weight_q) if layer.weight_bits == 4 else weight_q
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    @classmethod
    def from_plan(cls, layer: LayerPlan, has_bias: bool, bias_dtype: torch.dtype) -> QuantLinear:
        return cls(layer.in_features, layer.out_features, has_bias, _static_act_params(layer, "meta"), bias_dtype,
                   layer.weight_bits, smoothed=layer.smooth is not None,
                   rotation_block=layer.rotation_block or 0, fp8=layer.number_format == "fp8", device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.smooth_inv is not None:
            rows = rows * self.smooth_inv.to(rows.dtype)
        if self.rotation_signs is not None:
            rows = rotate(rows, self.rotation_signs, self.rotation_block)
        if self.fp8:
            x_q, x_scale = fxq.quantize_per_token_fp8(rows)
            out = fxq.fp8_linear(x_q, x_scale, self.weight_q, self.weight_scale, self.bias, x.dtype)
            return out.reshape(*x.shape[:-1], self.out_features)
        weight_q = self.weight_q if self.weight_bits == 8 else fxq.unpack_int4(self.weight_q)
        if self.act_scale is None:
            x_q, x_scale, x_zero = fxq.quantize_per_token(rows)
        else:
            x_scale, x_zero = _static_params_for_call(self)
            x_q = fxq.quantize_per_tensor(rows, x_scale, x_zero)
        out = fxq.int8_linear(x_q, x_scale, x_zero, weight_q, self.weight_scale, self.weight_sum, self.bias,
                              x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        mode = "dynamic per-token" if self.act_scale is None else "static per-tensor"
        balance = [name for name, on in (("smooth", self.smooth_inv is not None),
                                         (f"rotate{self.rotation_block}", self.rotation_signs is not None)) if on]
        weights = "fp8 e4m3" if self.fp8 else f"W{self.weight_bits}"
        return (f"in={self.in_features}, out={self.out_features}, {weights} per-channel, A8 {mode}"
                + (f", {'+'.join(balance)}" if balance else ""))


class QuantConv2d(nn.Module):
    """Int8 conv2d: x [B, C, H, W] quantized inside the op, one scale per patch (dynamic) or per tensor (static)."""

    _timestep = None  # a fxquant.timestep.TimestepGroup when static scales are per timestep group

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride, padding,
                 dilation, has_bias: bool, act_params: tuple, bias_dtype: torch.dtype, device=None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = list(stride)
        self.padding = list(padding)
        self.dilation = list(dilation)
        weight_q = torch.empty(out_channels, in_channels, *kernel_size, dtype=torch.int8, device=device)
        _register_quant_buffers(self, weight_q, has_bias, bias_dtype, act_params)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, layer: LayerPlan) -> QuantConv2d:
        weight = conv.weight.detach()
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.bias is not None, _static_act_params(layer, weight.device), weight.dtype,
                     device=weight.device)
        module.weight_q, module.weight_scale = quantize_weight_per_channel(weight, layer.weight_bits)
        module.weight_sum = _weight_sum(module.weight_q)
        if conv.bias is not None:
            module.bias = conv.bias.detach().clone()
        return module

    @classmethod
    def from_plan(cls, layer: LayerPlan, conv_meta: nn.Conv2d, bias_dtype: torch.dtype) -> QuantConv2d:
        return cls(conv_meta.in_channels, conv_meta.out_channels, conv_meta.kernel_size, conv_meta.stride,
                   conv_meta.padding, conv_meta.dilation, conv_meta.bias is not None,
                   _static_act_params(layer, "meta"), bias_dtype, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act_scale, act_zero = _static_params_for_call(self) if self.act_scale is not None else (None, None)
        return fxq.int8_conv2d(x, act_scale, act_zero, self.weight_q, self.weight_scale, self.weight_sum, self.bias,
                               self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        mode = "dynamic per-patch" if self.act_scale is None else "static per-tensor"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"W8 per-channel, A8 {mode}")


QUANT_MODULES = (QuantLinear, QuantConv2d)

"""Quantized attention for any model: its `F.scaled_dot_product_attention` calls routed to fxquant's op.

Diffusers' attention processors (and its attention dispatcher) all end in `F.scaled_dot_product_attention`.
`QuantizedAttention` is a torch function mode that catches those calls and answers the ones it can quantize with
`fxquant::quantized_attention` (int8 Q K^T, optionally fp8 P V; or Q, K, V all fp8 with static scales); the others
(a mask, dropout, causal masking, grouped heads, unequal head dims or head dims under MIN_HEAD_DIM) run the original
call. `install` puts the mode around the forward of every attention module the plan quantizes
(`LayerPlan.attention_format`; the module's class becomes a subclass whose forward enters the mode), so the choice is
per layer and Dynamo traces the mode into the graph: the op is one node the compile backend lowers to the Triton
kernel.

The static format ("fp8-static") needs calibrated scales: `observe` wraps an attention module's forward during
calibration and records |Q|, |K|, |V| maxima per timestep group (`AttentionObserver`); `install` keeps the plan's
scales as the module's buffer OPERAND_SCALES [G, 3] and each call picks its timestep group's row on the device.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import runtime_class
from .plan import QuantPlan

MIN_HEAD_DIM = 16
STATIC_FORMAT = "fp8-static"
OPERAND_SCALES = "fxquant_operand_scales"  # buffer of a static-format attention module: fp32 [G, 3] (Q, K, V)


def _quantizable(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The (q, k, v, scale) of an SDPA call the quantized op computes exactly as asked, else None."""
    if attn_mask is not None or dropout_p or is_causal or enable_gqa or query.dim() != 4:
        return None
    if not (query.shape[:2] == key.shape[:2] == value.shape[:2] and query.shape[-1] == key.shape[-1] == value.shape[-1]
            and key.shape[-2] == value.shape[-2] and query.is_floating_point()):
        return None
    if query.shape[-1] < MIN_HEAD_DIM:  # too narrow for the kernel's int8 MMA, and too little work to gain from it
        return None
    return query, key, value, scale if scale is not None else query.shape[-1] ** -0.5


class QuantizedAttention(TorchFunctionMode):
    """Inside this mode, quantizable `F.scaled_dot_product_attention` calls run fxquant::quantized_attention in
    `attention_format` ("int8": int8 Q K^T, P V in the model's dtype; "int8-fp8": fp8 P V as well; "fp8-static":
    Q, K, V in fp8 with operand_scales, fp32 [3])."""

    def __init__(self, attention_format: str, operand_scales: torch.Tensor | None = None):
        super().__init__()
        if (attention_format == STATIC_FORMAT) != (operand_scales is not None):
            raise ValueError(f"attention format {attention_format!r} with operand_scales {operand_scales}: only "
                             f"{STATIC_FORMAT!r} takes (and needs) static scales")
        self.pv_fp8 = attention_format in ("int8-fp8", STATIC_FORMAT)
        self.operand_scales = operand_scales

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call = _quantizable(*args, **kwargs)
            if call is not None:
                return torch.ops.fxquant.quantized_attention(*call, self.pv_fp8, self.operand_scales)
        if func is torch.Tensor.unflatten:
            return _unflatten(*args, **kwargs)
        return func(*args, **kwargs)


def _unflatten(input: torch.Tensor, dim: int, sizes) -> torch.Tensor:
    """Tensor.unflatten as a reshape: Dynamo cannot trace Tensor.unflatten's `super()` call inside a torch function
    mode (a graph break in Flux's attention processor, which lost the fusions around it)."""
    dim = dim % input.dim()
    return input.reshape(*input.shape[:dim], *sizes, *input.shape[dim + 1:])


ATTENTION_FORMAT = "fxquant_attention_format"  # attribute of a quantized attention module: its format


def _operand_scales(module: nn.Module) -> torch.Tensor | None:
    """The static scales [3] of the module's current timestep group (its `_timestep`, set by QuantizedModel), or None
    for a dynamic format."""
    if getattr(module, ATTENTION_FORMAT) != STATIC_FORMAT:
        return None
    table = getattr(module, OPERAND_SCALES)
    timestep = getattr(module, "_timestep", None)
    return table[0] if timestep is None else table.index_select(0, timestep.index)[0]


def _quantized_members(cls: type) -> dict:
    """The quantized subclass of attention class cls (runtime_class kind "quantized", swapped in by `install`): its
    forward runs cls's inside QuantizedAttention."""
    def forward(self, *args, **kwargs):
        with QuantizedAttention(getattr(self, ATTENTION_FORMAT), _operand_scales(self)):
            return self.fxquant_unquantized_forward(*args, **kwargs)

    return {"forward": forward, "fxquant_unquantized_forward": cls.forward}


runtime_class.register("quantized", _quantized_members)


def _device_of(module: nn.Module) -> torch.device:
    """Where the module's tensors live (an attention module of a quantized model may hold only buffers)."""
    return next(itertools.chain(module.parameters(), module.buffers())).device


def install(model: nn.Module, plan: QuantPlan) -> None:
    """Run the attention of every layer in plan.quantized_attention() quantized (once per module); static-format
    layers get their scales (plan.attention_scales) as buffer OPERAND_SCALES on the module's device."""
    for layer in plan.quantized_attention():
        module = model.get_submodule(layer.fqn)
        if hasattr(module, ATTENTION_FORMAT):
            continue
        if layer.attention_format == STATIC_FORMAT:
            if not layer.attention_scales:
                raise ValueError(f"Attention layer {layer.fqn!r} is {STATIC_FORMAT} but the plan holds no "
                                 "attention_scales (calibrate before converting).")
            module.register_buffer(OPERAND_SCALES, torch.tensor(layer.attention_scales, dtype=torch.float32,
                                                                device=_device_of(module)))
        setattr(module, ATTENTION_FORMAT, layer.attention_format)
        module.__class__ = runtime_class.subclass("quantized", type(module))


class SdpaTap(TorchFunctionMode):
    """Inside this mode, `record(q, k, v, scale)` sees every quantizable `F.scaled_dot_product_attention` call before
    it runs unchanged (subclasses say what to keep)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call = _quantizable(*args, **kwargs)
            if call is not None:
                self.record(*call)
        return func(*args, **kwargs)

    def record(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
        raise NotImplementedError


class AttentionObserver(SdpaTap):
    """Records the |Q|, |K|, |V| maxima of the quantizable SDPA calls inside it: overall (`absmax`, fp32 [3]) and per
    timestep group (`group_absmax`, from group_of() at each call). module_calls counts the forwards it wrapped,
    calls the quantizable SDPA calls among them."""

    def __init__(self, group_of: Callable[[], int]):
        super().__init__()
        self.group_of = group_of
        self.absmax: torch.Tensor | None = None
        self.group_absmax: dict[int, torch.Tensor] = {}
        self.module_calls = 0
        self.calls = 0

    def record(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
        absmax = torch.stack([x.detach().abs().amax().float() for x in (q, k, v)])  # stays on the device: no sync
        self.calls += 1
        self.absmax = absmax if self.absmax is None else torch.maximum(self.absmax, absmax)
        group = self.group_of()
        previous = self.group_absmax.get(group)
        self.group_absmax[group] = absmax if previous is None else torch.maximum(previous, absmax)


class _ObservedForward:
    """Stands in for an attention module's forward during calibration; `remove()` puts the original back."""

    def __init__(self, module: nn.Module, observer: AttentionObserver):
        self.module = module
        self.forward = module.forward
        self.own_forward = "forward" in vars(module)  # else the class's, which must not be pinned to the instance
        self.observer = observer

    def __call__(self, *args, **kwargs):
        self.observer.module_calls += 1
        with self.observer:
            return self.forward(*args, **kwargs)

    def remove(self) -> None:
        if self.own_forward:
            self.module.forward = self.forward
        else:
            del self.module.forward


def observe(module: nn.Module, group_of: Callable[[], int]) -> tuple[AttentionObserver, _ObservedForward]:
    """Wrap the attention module's forward with a new AttentionObserver -> (observer, handle with remove())."""
    observer = AttentionObserver(group_of)
    handle = _ObservedForward(module, observer)
    module.forward = handle
    return observer, handle

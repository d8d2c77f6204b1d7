"""Quantized attention for any model: its `F.scaled_dot_product_attention` calls routed to fxquant's op.

Diffusers' attention processors (and its attention dispatcher) all end in `F.scaled_dot_product_attention`.
`QuantizedAttention` is a torch function mode that catches those calls and answers the ones it can quantize with
`fxquant::quantized_attention` (int8 Q K^T, optionally fp8 P V); the others (a mask, dropout, causal masking,
grouped heads, unequal head dims or head dims under MIN_HEAD_DIM) run the original call. `install` puts the mode
around the forward of every attention module the plan quantizes (`LayerPlan.attention_format`), so the choice is
per layer and Dynamo traces the mode into the graph: the op is one node the compile backend lowers to the Triton
kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .plan import QuantPlan

MIN_HEAD_DIM = 16


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
    `attention_format` ("int8": int8 Q K^T, P V in the model's dtype; "int8-fp8": fp8 P V as well)."""

    def __init__(self, attention_format: str):
        super().__init__()
        self.pv_fp8 = attention_format == "int8-fp8"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call = _quantizable(*args, **kwargs)
            if call is not None:
                return torch.ops.fxquant.quantized_attention(*call, self.pv_fp8)
        return func(*args, **kwargs)


class _QuantizedAttentionForward:
    """Stands in for an attention module's forward: the original forward, run inside QuantizedAttention."""

    def __init__(self, forward, attention_format: str):
        self.forward = forward
        self.attention_format = attention_format

    def __call__(self, *args, **kwargs):
        with QuantizedAttention(self.attention_format):
            return self.forward(*args, **kwargs)


def install(model: nn.Module, plan: QuantPlan) -> None:
    """Run the attention of every layer in plan.quantized_attention() quantized (once per module)."""
    for layer in plan.quantized_attention():
        module = model.get_submodule(layer.fqn)
        if not isinstance(module.forward, _QuantizedAttentionForward):
            module.forward = _QuantizedAttentionForward(module.forward, layer.attention_format)

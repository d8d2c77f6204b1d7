"""lower: replace every quantized nn.Linear / nn.Conv2d with its real-quant module (packed int8 weights).

Reads: plan layers (bits, static scales, balancing, full-precision tokens), the model's float modules,
config.seed (rotation signs), the observers' leading token rows (cached BOS outputs).
Writes: the model, in place: QuantLinear / QuantConv2d at each quantized FQN (the float weights are dropped),
LayerNorms named by smooth_folded_into divided by the smoothing factors;
node.meta["fxquant_lowered"] = the runtime module's class name on their graph nodes.
"""

from __future__ import annotations

import torch
from torch import nn

from fxquant.modules import QUANT_MODULES, QuantConv2d, QuantLinear
from fxquant.state import QuantState

from .base import PassResult, QuantPass


def replace_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """Set the submodule at `fqn` to `new`."""
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _divide_norm(norm: nn.Module, smooth: list[float]) -> None:
    """LayerNorm affine (weight, bias) <- (weight / s, bias / s): its output arrives pre-divided by s."""
    factors = torch.tensor(smooth, dtype=torch.float32, device=norm.weight.device)
    with torch.no_grad():
        norm.weight.copy_((norm.weight.float() / factors).to(norm.weight.dtype))
        if norm.bias is not None:
            norm.bias.copy_((norm.bias.float() / factors).to(norm.bias.dtype))


class LowerPass(QuantPass):
    name = "lower"

    def requires(self, state):
        assert not state.hooks, "lower needs calibrate to have detached the observers"

    def call(self, state: QuantState) -> PassResult:
        lowered, folded = {}, set()
        for layer in state.plan.quantized_layers():
            module = state.model.get_submodule(layer.fqn)
            if layer.op == "conv2d":
                new = QuantConv2d.from_float(module, layer)
            else:
                observer = state.observers.get(layer.fqn)
                fp_rows = observer.leading_rows[:layer.fp_tokens] if layer.fp_tokens_cached else None
                new = QuantLinear.from_float(module, layer, seed=state.config.seed, fp_rows=fp_rows)
            replace_module(state.model, layer.fqn, new)
            lowered[layer.fqn] = type(new).__name__
            if layer.smooth_folded_into and layer.smooth_folded_into not in folded:
                _divide_norm(state.model.get_submodule(layer.smooth_folded_into), layer.smooth)
                folded.add(layer.smooth_folded_into)
        for node in state.graph.nodes:
            if node.meta.get("fxquant_fqn") in lowered:
                node.meta["fxquant_lowered"] = lowered[node.meta["fxquant_fqn"]]
        return PassResult(modified=bool(lowered))

    def ensures(self, state):
        for layer in state.plan.quantized_layers():
            module = state.model.get_submodule(layer.fqn)
            assert isinstance(module, QUANT_MODULES), f"{layer.fqn} was not lowered"

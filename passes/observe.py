"""observe: attach an activation observer to every layer the plan quantizes.

Reads: plan layers (quantized ones, and attention layers of the static "fp8-static" format), the model's modules.
Writes: state.observers (FQN -> ActivationObserver; per-position statistics on cross-attention key / value
inputs when the config is BOS-aware), state.attention_observers (attention FQN -> fxquant.attention
AttentionObserver), state.hooks (forward pre-hooks on those modules, the attention forwards' wrappers),
node.meta["fxquant_observed"] = True on the graph nodes of observed layers.
"""

from __future__ import annotations

from fxquant import attention
from fxquant.observers import ActivationObserver
from fxquant.state import QuantState

from .base import PassResult, QuantPass


class ObservePass(QuantPass):
    name = "observe"

    def requires(self, state):
        assert state.plan is not None, "observe needs the plan written by annotate"
        assert not state.hooks, "observers are already attached"

    def call(self, state: QuantState) -> PassResult:
        for layer in state.plan.quantized_layers():
            text_key_value = layer.group == "cross-attention" and layer.role != "latent"
            observer = ActivationObserver(layer.fqn, channel_dim=1 if layer.op == "conv2d" else -1,
                                          group_of=lambda: state.timestep_group,
                                          track_positions=state.config.bos_aware and text_key_value)
            module = state.model.get_submodule(layer.fqn)
            state.hooks.append(module.register_forward_pre_hook(observer.hook))
            state.observers[layer.fqn] = observer
        for layer in state.plan.quantized_attention():
            if layer.attention_format == attention.STATIC_FORMAT:
                observer, handle = attention.observe(state.model.get_submodule(layer.fqn),
                                                     group_of=lambda: state.timestep_group)
                state.hooks.append(handle)
                state.attention_observers[layer.fqn] = observer
        for node in state.graph.nodes:
            if node.meta.get("fxquant_fqn") in state.observers:
                node.meta["fxquant_observed"] = True
        return PassResult(modified=bool(state.observers or state.attention_observers))

    def ensures(self, state):
        missing = [layer.fqn for layer in state.plan.quantized_layers() if layer.fqn not in state.observers]
        assert not missing, f"quantized layers without observers: {missing[:3]}"

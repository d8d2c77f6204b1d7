"""balance: decide and compute ViDiT-Q's static-dynamic channel balancing for each quantized linear.

Reads: state.observers (per-channel |x| maxima from calibration), the model's float weights, the config
(smooth_alpha, rotate, balance_threshold).
Writes: LayerPlan.outlier_ratio for every quantized linear; for those at or above the threshold, LayerPlan.balance
("smooth", "rotate" or "smooth+rotate"), LayerPlan.smooth (factors s) and LayerPlan.rotation_block. The choice
comes from calibration statistics only, never from layer names. Convolutions are not balanced.

Folding: when a smoothed linear's input is the output of an affine LayerNorm that feeds only smoothed linears
(attention's q / k / v after norm1, say), those linears share one s (from their joint weight maxima) and
LayerPlan.smooth_folded_into names the norm: lower divides the norm's weight and bias by s, so x / s costs
nothing at run time. Norms without an affine (adaLN-modulated DiTs) keep the run-time multiply.
"""

from __future__ import annotations

import torch
from torch import fx

from fxquant.balance import outlier_ratio, rotation_block, smoothing_scale
from fxquant.capture import node_op_kind
from fxquant.state import QuantState

from .base import PassResult, QuantPass


class BalancePass(QuantPass):
    name = "balance"

    def requires(self, state):
        assert not state.hooks, "balance needs calibrate to have detached the observers"

    def call(self, state: QuantState) -> PassResult:
        config = state.config
        balanced = 0
        for layer in state.plan.quantized_layers():
            observer = state.observers.get(layer.fqn)
            if layer.op != "linear" or observer is None or observer.channel_absmax is None:
                continue
            layer.outlier_ratio = outlier_ratio(observer.channel_absmax)
            if not config.balances or layer.outlier_ratio < config.balance_threshold:
                continue
            steps = []
            if config.smooth_alpha is not None:
                weight = state.model.get_submodule(layer.fqn).weight
                layer.smooth = smoothing_scale(observer.channel_absmax, weight, config.smooth_alpha).tolist()
                steps.append("smooth")
            if config.rotate and rotation_block(layer.in_features) > 1:
                layer.rotation_block = rotation_block(layer.in_features)
                steps.append("rotate")
            layer.balance = "+".join(steps) or None
            balanced += bool(steps)
        self._fold_into_norms(state)
        return PassResult(modified=balanced > 0)

    @staticmethod
    def _fold_into_norms(state: QuantState) -> None:
        """Share one smoothing vector among the linears an affine LayerNorm feeds alone, and name the norm."""
        smoothed = {layer.fqn: layer for layer in state.plan.quantized_layers() if layer.smooth is not None}
        captured = state.captured
        norm_nodes: dict[str, list[fx.Node]] = {}
        for node in state.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.aten.layer_norm.default:
                weight = node.args[2] if len(node.args) > 2 else None
                if isinstance(weight, fx.Node) and weight.name in captured.param_names:
                    norm_nodes.setdefault(captured.param_names[weight.name].rsplit(".", 1)[0], []).append(node)
        for norm, nodes in norm_nodes.items():
            if len(nodes) != 1:  # a norm module called more than once: its parameters serve several inputs
                continue
            consumers = [user.meta.get("fxquant_fqn") for user in nodes[0].users]
            if not consumers or any(node_op_kind(user) != "linear" or fqn not in smoothed
                                    for user, fqn in zip(nodes[0].users, consumers)):
                continue
            layers = [smoothed[fqn] for fqn in dict.fromkeys(consumers)]
            weights = torch.cat([state.model.get_submodule(layer.fqn).weight.detach() for layer in layers])
            shared = smoothing_scale(state.observers[layers[0].fqn].channel_absmax, weights,
                                     state.config.smooth_alpha).tolist()
            for layer in layers:
                layer.smooth, layer.smooth_folded_into = shared, norm

    def ensures(self, state):
        for layer in state.plan.quantized_layers():
            if layer.smooth is not None:
                assert len(layer.smooth) == layer.in_features, layer.fqn

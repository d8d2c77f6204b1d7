"""balance: decide and compute ViDiT-Q's static-dynamic channel balancing for each quantized linear.

Reads: state.observers (per-channel |x| maxima from calibration), the model's float weights, the config
(smooth_alpha, rotate, balance_threshold).
Writes: LayerPlan.outlier_ratio for every quantized linear; for those at or above the threshold, LayerPlan.balance
("smooth", "rotate" or "smooth+rotate"), LayerPlan.smooth (factors s) and LayerPlan.rotation_block. The choice
comes from calibration statistics only, never from layer names. Convolutions are not balanced.
"""

from __future__ import annotations

from fxquant.balance import outlier_ratio, rotation_block, smoothing_scale
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
        return PassResult(modified=balanced > 0)

    def ensures(self, state):
        for layer in state.plan.quantized_layers():
            if layer.smooth is not None:
                assert len(layer.smooth) == layer.in_features, layer.fqn

"""calibrate: turn the observers' statistics into plan fields, then detach the observers.

Reads: state.observers (filled while the user's pipeline ran the prepared model), plan layers, config.
Writes: LayerPlan.act_scale / act_zero (asymmetric int8 from the calibrated min / max, or fp8 absmax / 448 with
zero 0, one entry per timestep group; a group calibration never saw uses the statistics of all calls) for layers
with static activations; BOS-aware configs: LayerPlan.fp_tokens / fp_tokens_cached for text key / value layers whose leading tokens are
range outliers (their static range then excludes those tokens); LayerPlan.attention_scales (fp8 absmax / 448 of
Q, K, V per timestep group) for "fp8-static" attention layers, or keeps one in full precision when none of its
calls could be quantized (a mask, causal, ...); plan.calibrated_groups. Removes the observer hooks from the model.

Raises CalibrationError when no calibration call reached the model, or a static layer was never called (it would
have no scale): the message names the layer and how to fix the calibration set.
"""

from __future__ import annotations

from fxquant.errors import CalibrationError
import torch

from fxquant.attention import STATIC_FORMAT, AttentionObserver
from fxquant.quantizer import asymmetric_params, fp8_scale
from fxquant.state import QuantState

from .base import PassResult, QuantPass


class CalibratePass(QuantPass):
    name = "calibrate"

    def requires(self, state):
        assert state.plan is not None, "calibrate needs the plan written by annotate"

    def call(self, state: QuantState) -> PassResult:
        if state.plan.calibration_calls == 0:
            raise CalibrationError(
                "convert() was called before any calibration: call the prepared model (or a pipeline that holds "
                "it) on representative inputs first, or use fxquant.quantize(model, recipe, calibration)."
            )
        for layer in state.plan.quantized_layers():
            observer = state.observers[layer.fqn]
            if observer.track_positions:
                layer.fp_tokens = observer.leading_outliers(state.config.bos_ratio)
                layer.fp_tokens_cached = bool(layer.fp_tokens) and bool(
                    observer.leading_constant[:layer.fp_tokens].all())
            if layer.act_mode == "static_per_tensor":
                if observer.calls == 0:
                    raise CalibrationError(
                        f"Layer {layer.fqn!r} was never called during calibration, so it has no static activation "
                        "scale. Calibrate with inputs that exercise it, or keep it in full precision with "
                        f"keep_full_precision={{{layer.fqn!r}: 'not calibrated'}}."
                    )
                groups = range(len(state.plan.timestep_boundaries) + 1)
                ranges = [(observer.group_min.get(g, observer.min), observer.group_max.get(g, observer.max))
                          for g in groups]
                if layer.fp_tokens:  # the text does not change with the timestep: one range without the outliers
                    ranges = [(observer.position_min[layer.fp_tokens:].min(),
                               observer.position_max[layer.fp_tokens:].max())] * len(groups)
                if layer.number_format == "fp8":
                    params = [(fp8_scale(torch.maximum(lo.abs(), hi.abs())), torch.tensor(0)) for lo, hi in ranges]
                else:
                    params = [asymmetric_params(lo, hi, layer.act_bits) for lo, hi in ranges]
                layer.act_scale = [scale.item() for scale, _ in params]
                layer.act_zero = [int(zero.item()) for _, zero in params]
        for fqn, observer in state.attention_observers.items():
            _calibrate_attention(state.plan.layers[fqn], observer, len(state.plan.timestep_boundaries) + 1)
        state.plan.calibrated_groups = sorted({g for o in state.observers.values() for g in o.group_min})
        for handle in state.hooks:
            handle.remove()
        state.hooks.clear()
        return PassResult(modified=True)

    def ensures(self, state):
        for layer in state.plan.quantized_layers():
            static = layer.act_mode == "static_per_tensor"
            assert (layer.act_scale is not None) == static and (layer.act_zero is not None) == static, layer.fqn
        for layer in state.plan.quantized_attention():
            assert (layer.attention_scales is not None) == (layer.attention_format == STATIC_FORMAT), layer.fqn


def _calibrate_attention(layer, observer: AttentionObserver, groups: int) -> None:
    """The layer's static fp8 scales [Q, K, V] per timestep group (a group calibration never saw: all calls)."""
    if observer.module_calls == 0:
        raise CalibrationError(
            f"Attention layer {layer.fqn!r} was never called during calibration, so its {STATIC_FORMAT} attention "
            "has no scales. Calibrate with inputs that exercise it, or keep it in full precision with "
            f"keep_full_precision={{{layer.fqn!r}: 'not calibrated'}}.")
    if observer.calls == 0:
        layer.keep(f"{STATIC_FORMAT} attention: no call during calibration could be quantized (a mask, dropout, "
                   "causal masking, grouped or narrow heads)")
        return
    layer.attention_scales = [fp8_scale(observer.group_absmax.get(g, observer.absmax)).tolist()
                              for g in range(groups)]

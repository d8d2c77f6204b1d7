"""calibrate: turn the observers' statistics into plan fields, then detach the observers.

Reads: state.observers (filled while the user's pipeline ran the prepared model), plan layers, config.
Writes: LayerPlan.act_scale / act_zero (asymmetric int8 from the calibrated min / max, one timestep group) for
layers with static activations. Removes the observer hooks from the model.

Raises CalibrationError when no calibration call reached the model, or a static layer was never called (it would
have no scale): the message names the layer and how to fix the calibration set.
"""

from __future__ import annotations

from fxquant.errors import CalibrationError
from fxquant.quantizer import asymmetric_params
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
            if layer.act_mode == "static_per_tensor":
                if observer.calls == 0:
                    raise CalibrationError(
                        f"Layer {layer.fqn!r} was never called during calibration, so it has no static activation "
                        "scale. Calibrate with inputs that exercise it, or keep it in full precision with "
                        f"keep_full_precision={{{layer.fqn!r}: 'not calibrated'}}."
                    )
                scale, zero = asymmetric_params(observer.min, observer.max, layer.act_bits)
                layer.act_scale, layer.act_zero = [scale.item()], [int(zero.item())]
        for handle in state.hooks:
            handle.remove()
        state.hooks.clear()
        return PassResult(modified=True)

    def ensures(self, state):
        for layer in state.plan.quantized_layers():
            static = layer.act_mode == "static_per_tensor"
            assert (layer.act_scale is not None) == static and (layer.act_zero is not None) == static, layer.fqn

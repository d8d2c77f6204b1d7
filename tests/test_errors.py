"""Bad input gets an error that names the problem and the fix."""

import math

import pytest
import torch
from torch import nn

import fxquant
from families import FAMILIES


class DataDependentModel(nn.Module):
    """Branches on a tensor value: torch.export cannot capture it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, hidden_states, timestep):
        if hidden_states.sum() > 0:
            return self.proj(hidden_states)
        return -self.proj(hidden_states)


def test_model_that_cannot_be_captured():
    prepared = fxquant.prepare(DataDependentModel(), "w8a8")
    with pytest.raises(fxquant.CaptureError, match="(?s)could not capture DataDependentModel.*torch.cond"):
        prepared(hidden_states=torch.randn(2, 4, 8), timestep=torch.tensor([1, 2]))


def test_model_without_latent_input():
    class NoLatent(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, features):
            return self.proj(features)

    with pytest.raises(fxquant.CaptureError, match="no latent input"):
        fxquant.prepare(NoLatent(), "w8a8", example_kwargs={"features": torch.randn(2, 4)})


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(fxquant.RecipeError, match="Unknown recipe 'w3a3'. Known recipes: .*viditq-w8a8.*w8a8-static"):
        fxquant.prepare(nn.Linear(2, 2), "w3a3")


def test_invalid_config_values():
    with pytest.raises(fxquant.RecipeError, match="act_mode"):
        fxquant.W8A8DynamicConfig(act_mode="per_everything")
    with pytest.raises(fxquant.RecipeError, match="not a valid regex"):
        fxquant.W8A8DynamicConfig(keep_full_precision={"re:(": "x"})
    with pytest.raises(fxquant.RecipeError, match="weight_bits=3 is not supported; use one of"):
        fxquant.QuantConfig(weight_bits=3)
    with pytest.raises(fxquant.RecipeError, match="balancing .* needs act_mode='dynamic_per_token'"):
        fxquant.W8A8StaticConfig(smooth_alpha=0.5)
    with pytest.raises(fxquant.RecipeError, match="balancing .* and static_hidden_activations=False"):
        fxquant.get_config("viditq-w8a8:static_hidden_activations=true")
    with pytest.raises(fxquant.RecipeError, match="smooth_alpha=1.5 must lie in"):
        fxquant.SmoothQuantW8A8Config(smooth_alpha=1.5)
    with pytest.raises(fxquant.RecipeError, match=r"attention='int4' is unknown; use one of \(None, 'int8', "):
        fxquant.get_config("w8a8:attention=int4")
    with pytest.raises(fxquant.RecipeError, match="static_conv_activations='maybe' must be true or false"):
        fxquant.get_config("w8a8:static_conv_activations=maybe")
    with pytest.raises(fxquant.RecipeError, match="weight_group_size=48 must be a power of two"):
        fxquant.get_config("w4a8:weight_granularity=per_group,weight_group_size=48")
    with pytest.raises(fxquant.RecipeError, match="per_group' applies to 4- / 2-bit weights"):
        fxquant.get_config("w8a8:weight_granularity=per_group")


def test_fp8_linear_refuses_nested_weight_planes():
    """Nested planes combine into codes wider than e4m3 holds exactly (the config refuses such recipes; a plan made
    by hand reaches the module)."""
    from fxquant.modules import QuantLinear

    with pytest.raises(ValueError, match="fp8 activations take one weight plane, got planes \\[4, 4\\]"):
        QuantLinear(16, 8, False, (None, None), torch.float32, planes=[4, 4], fp8=True, device="meta")


def test_convert_without_calibration():
    family = FAMILIES["dit"]
    with pytest.raises(fxquant.CalibrationError, match="before any calibration"):
        fxquant.convert(fxquant.prepare(family.build(), "w8a8"))
    prepared = fxquant.prepare(family.build(), "w8a8", example_kwargs=family.inputs())
    with pytest.raises(fxquant.CalibrationError, match="before any calibration"):
        fxquant.convert(prepared)


def test_calibration_batches_must_be_keyword_dicts():
    """An empty calibration iterable, or batches that are not dicts of forward keyword arguments (a bare tensor, a
    tuple), are refused before the model runs, with what to pass instead."""
    family = FAMILIES["dit"]
    with pytest.raises(fxquant.CalibrationError, match="calibration iterable is empty"):
        fxquant.quantize(family.build(), "w8a8", [])
    batch = family.inputs()
    for bad in (batch["hidden_states"], tuple(batch.values())):
        with pytest.raises(fxquant.CalibrationError, match=f"batch 1 is a {type(bad).__name__}; each batch must be "
                                                           "a dict of the model's forward keyword arguments"):
            fxquant.quantize(family.build(), "w8a8", [batch, bad])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_in_calibration_names_the_layer(bad):
    family = FAMILIES["pixart"]
    prepared = fxquant.prepare(family.build(), "w8a8")
    inputs = family.inputs()
    inputs["hidden_states"][0, 0, 0, 0] = bad
    with pytest.raises(fxquant.CalibrationError, match=r"(NaN|Inf) in the input of layer 'transformer_blocks\.0"):
        prepared(**inputs)


def test_converted_prepared_model_cannot_be_called_again():
    family = FAMILIES["dit"]
    prepared = fxquant.prepare(family.build(), "w8a8")
    prepared(**family.inputs())
    fxquant.convert(prepared)
    with pytest.raises(fxquant.CalibrationError, match="has been converted"):
        prepared(**family.inputs())


def test_save_rejects_non_diffusers_model(tmp_path):
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.out = nn.Linear(8, 8)
            self.mid = nn.Linear(8, 8)

        def forward(self, hidden_states):
            return self.out(self.mid(self.proj(hidden_states)))

    qmodel = fxquant.quantize(Plain(), "w8a8", [{"hidden_states": torch.randn(3, 8)}])
    assert qmodel.plan.layers["mid"].quantized
    with pytest.raises(fxquant.CheckpointError, match="needs a diffusers model"):
        fxquant.save(qmodel, tmp_path / "x")


def test_fp8_convolution_without_static_activations_is_refused():
    """A plan that gives a convolution fp8 with per-patch activations (e.g. an edited checkpoint plan.json) is
    refused, naming the layer and the recipe option it needs."""
    from fxquant.modules import QuantConv2d
    from fxquant.plan import LayerPlan

    layer = LayerPlan(fqn="down.conv", op="conv2d", group="conv", role="latent", weight_bits=8, number_format="fp8",
                      act_bits=8, act_mode="dynamic_per_token")
    with pytest.raises(ValueError, match="'down.conv'.*static_conv_activations=true"):
        QuantConv2d.from_plan(layer, nn.Conv2d(4, 8, 3, device="meta"), torch.float32)

"""Timestep-aware static scales: calibrated per timestep group, selected on the device from the timestep."""

import copy

import pytest
import torch

import fxquant
from families import FAMILIES, inputs_at_timesteps
from fxquant.backends.triton.backend import compile_counter
from fxquant.metrics import relative_l2
from fxquant.timestep import group_index, timestep_scale

BOUNDARIES = [300.0, 700.0]


@pytest.fixture(scope="module")
def grouped():
    family = FAMILIES["dit"]
    reference = family.build()
    config = fxquant.W8A8StaticConfig(timestep_groups=BOUNDARIES)
    qmodel = fxquant.quantize(copy.deepcopy(reference), config, inputs_at_timesteps(family, [950, 500, 100, 50]))
    return reference, qmodel


def test_group_index_on_the_normalised_scale():
    boundaries = torch.tensor(BOUNDARIES)
    assert [int(group_index(t, boundaries, 1.0)) for t in (0, 299, 300, 699, 700, 999)] == [0, 0, 1, 1, 2, 2]
    assert int(group_index(torch.tensor([0.95, 0.95]), boundaries, timestep_scale([0.95]))) == 2  # Flux: t in [0, 1]
    assert timestep_scale(torch.tensor([999.0])) == 1.0


def test_scales_are_calibrated_per_group(grouped):
    _, qmodel = grouped
    plan = qmodel.plan
    assert plan.timestep_boundaries == BOUNDARIES and plan.timestep_argument == "timestep"
    assert plan.calibrated_groups == [0, 1, 2]
    layers = plan.quantized_layers()
    assert all(len(layer.act_scale) == 3 and len(layer.act_zero) == 3 for layer in layers)
    assert any(len(set(layer.act_scale)) > 1 for layer in layers)  # ranges drift with the timestep
    assert "timestep groups at [300.0, 700.0]" in plan.summary()


def test_group_selected_on_device_per_call(grouped):
    reference, qmodel = grouped
    family = FAMILIES["dit"]
    for t, group in ((80, 0), (420, 1), (990, 2)):
        inputs = inputs_at_timesteps(family, [t])[0]
        with torch.no_grad():
            out = qmodel(**inputs, return_dict=False)[0]
            expected = reference(**inputs, return_dict=False)[0]
        index = qmodel._timestep.index
        assert isinstance(index, torch.Tensor) and index.tolist() == [group]
        assert relative_l2(out, expected) < 0.05


def test_compiles_once_for_all_timestep_groups(grouped):
    _, qmodel = grouped
    torch._dynamo.reset()
    compile_counter.clear()
    compiled = torch.compile(qmodel, backend="fxquant")
    family = FAMILIES["dit"]
    for t in (990, 420, 80):  # three steps, three groups
        inputs = inputs_at_timesteps(family, [t])[0]
        with torch.no_grad():
            eager = qmodel(**inputs, return_dict=False)[0]
            fast = compiled(**inputs, return_dict=False)[0]
        assert relative_l2(fast, eager) <= 1e-3
    assert compile_counter["graphs"] == 1, f"{compile_counter['graphs']} graphs for three timestep groups"


def test_save_load_keeps_groups(grouped, tmp_path):
    _, qmodel = grouped
    loaded = fxquant.load(fxquant.save(qmodel, tmp_path / "ckpt"))
    inputs = inputs_at_timesteps(FAMILIES["dit"], [420])[0]
    with torch.no_grad():
        assert torch.equal(loaded(**inputs, return_dict=False)[0], qmodel(**inputs, return_dict=False)[0])
    assert loaded._timestep.index.tolist() == [1]


def test_invalid_groups_are_clear_errors():
    with pytest.raises(fxquant.RecipeError, match="increasing boundaries inside"):
        fxquant.W8A8StaticConfig(timestep_groups=[700, 300])
    with pytest.raises(fxquant.RecipeError, match="timestep_groups select static activation scales"):
        fxquant.W8A8DynamicConfig(timestep_groups=[500])


def test_timestep_groups_need_a_timestep_input_and_argument(grouped):
    class NoTimestep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.mid, self.last = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, hidden_states):
            return self.last(self.mid(self.first(hidden_states)))

    config = fxquant.W8A8StaticConfig(timestep_groups=[500])
    with pytest.raises(fxquant.CaptureError, match="timestep_groups need a timestep input"):
        fxquant.quantize(NoTimestep(), config, [{"hidden_states": torch.randn(2, 8)}])
    _, qmodel = grouped
    inputs = inputs_at_timesteps(FAMILIES["dit"], [420])[0]
    del inputs["timestep"]
    with pytest.raises(fxquant.CalibrationError, match="passes no 'timestep'"):
        qmodel(**inputs, return_dict=False)

"""save / load: identical outputs, no float weights for quantized layers, atomic writes, clear errors."""

import json

import pytest
import torch

import fxquant
from families import FAMILIES
from fxquant.checkpoint import CONFIG_NAME, PLAN_NAME, WEIGHTS_NAME


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("name,recipe", [(n, "w8a8") for n in FAMILIES] + [
    ("unet", "w8a8-static"), ("sd3", "w8a8:attention=int8-fp8"), ("pixart", "w8a8-fp8:static_hidden_activations=true"),
    ("flux", "w8a8:attention=fp8-static"), ("pixart", "w8a8-fp8:attention=fp8-static,static_attention_outputs=true"),
    ("pixart", "w4a8-fp8:static_hidden_activations=true"),
    ("sd3", "w4a8:weight_granularity=per_group,weight_group_size=32")])
def test_save_load_identical_outputs(quantized_family, tmp_path, name, recipe):
    _, qmodel, _ = quantized_family(name, recipe)
    fxquant.save(qmodel, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([CONFIG_NAME, PLAN_NAME, WEIGHTS_NAME])
    loaded = fxquant.load(tmp_path / "ckpt")
    assert loaded.plan == qmodel.plan
    inputs = FAMILIES[name].inputs(seed=5)
    assert torch.equal(_out(loaded, inputs), _out(qmodel, inputs))
    for layer in loaded.plan.quantized_layers():
        module = loaded.model.get_submodule(layer.fqn)
        assert type(module).__name__ in ("QuantLinear", "QuantConv2d")
        assert module.weight_q.dtype == (torch.uint8 if layer.weight_bits < 8 else torch.float8_e4m3fn
                                         if layer.number_format == "fp8" else torch.int8)
        if type(module).__name__ == "QuantConv2d":  # in the order the conv kernel reads, as when quantized
            assert module.weight_q.is_contiguous(memory_format=torch.channels_last)


def test_load_allocates_no_float_weights_for_quantized_layers(quantized_family, tmp_path, monkeypatch):
    """Loading builds the skeleton on the meta device: no tensor of a quantized layer's float shape is created."""
    _, qmodel, _ = quantized_family("pixart", "w8a8")
    fxquant.save(qmodel, tmp_path / "ckpt")
    created = []
    original = torch.nn.Linear.reset_parameters

    def spy(self):
        created.append(self.weight.device.type)
        return original(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", spy)
    fxquant.load(tmp_path / "ckpt")
    assert created and set(created) == {"meta"}


def test_save_replaces_existing_checkpoint_atomically(quantized_family, tmp_path):
    _, qmodel, _ = quantized_family("dit", "w8a8")
    target = tmp_path / "ckpt"
    fxquant.save(qmodel, target)
    fxquant.save(qmodel, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or old directories left
    fxquant.load(target)


def test_crash_mid_save_leaves_previous_checkpoint(quantized_family, tmp_path, monkeypatch):
    _, qmodel, _ = quantized_family("dit", "w8a8")
    target = tmp_path / "ckpt"
    fxquant.save(qmodel, target)
    before = (target / WEIGHTS_NAME).read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr("fxquant.checkpoint._write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        fxquant.save(qmodel, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (target / WEIGHTS_NAME).read_bytes() == before
    fxquant.load(target)


def test_corrupted_weights_detected(quantized_family, tmp_path):
    _, qmodel, _ = quantized_family("dit", "w8a8")
    target = fxquant.save(qmodel, tmp_path / "ckpt")
    data = bytearray((target / WEIGHTS_NAME).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (target / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(fxquant.CheckpointError, match="corrupted"):
        fxquant.load(target)


def test_missing_file_and_bad_json(quantized_family, tmp_path):
    _, qmodel, _ = quantized_family("dit", "w8a8")
    target = fxquant.save(qmodel, tmp_path / "ckpt")
    (target / PLAN_NAME).write_text("{not json")
    with pytest.raises(fxquant.CheckpointError, match="plan.json"):
        fxquant.load(target)
    (target / PLAN_NAME).unlink()
    with pytest.raises(fxquant.CheckpointError, match="plan.json is missing"):
        fxquant.load(target)
    with pytest.raises(fxquant.CheckpointError, match="No checkpoint directory"):
        fxquant.load(tmp_path / "nowhere")


def test_checkpoint_from_another_model_rejected(quantized_family, tmp_path):
    _, pixart, _ = quantized_family("pixart", "w8a8")
    _, dit, _ = quantized_family("dit", "w8a8")
    a = fxquant.save(pixart, tmp_path / "a")
    b = fxquant.save(dit, tmp_path / "b")
    (a / PLAN_NAME).write_text((b / PLAN_NAME).read_text())
    with pytest.raises(fxquant.CheckpointError, match="different models"):
        fxquant.load(a)


def test_config_of_another_model_rejected(quantized_family, tmp_path):
    _, pixart, _ = quantized_family("pixart", "w8a8")
    a = fxquant.save(pixart, tmp_path / "a")
    config = json.loads((a / CONFIG_NAME).read_text())
    config["model_config"]["num_layers"] = 3  # same fingerprint fields, but another architecture
    (a / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(fxquant.CheckpointError, match="another model"):
        fxquant.load(a)


def test_checkpoint_with_old_packing_layout_rejected(quantized_family, tmp_path):
    _, qmodel, _ = quantized_family("pixart", "w4a8")
    fxquant.save(qmodel, tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    del config["packing_format"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(fxquant.CheckpointError, match="interleaved layout"):
        fxquant.load(tmp_path / "ckpt")


def test_checkpoint_with_twos_complement_fp8_codes_rejected(quantized_family, tmp_path):
    """Packing format 2 kept fp8 layers' 4-bit codes as two's complement nibbles: such a checkpoint is refused, one
    whose packed layers are all int8 layers (the same layout since) still loads."""
    for recipe, loads in (("w4a8-fp8", False), ("w4a8", True)):
        _, qmodel, _ = quantized_family("pixart", recipe)
        fxquant.save(qmodel, tmp_path / recipe)
        config_path = tmp_path / recipe / "config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "packing_format": 2}))
        if loads:
            fxquant.load(tmp_path / recipe)
        else:
            with pytest.raises(fxquant.CheckpointError, match="two's complement"):
                fxquant.load(tmp_path / recipe)

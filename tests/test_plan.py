"""QuantPlan: JSON round trip, summary table, parameter-weighted average bits."""

import json

import pytest

from fxquant.errors import CheckpointError
from fxquant.plan import QuantPlan


def test_json_roundtrip_and_format(quantized_family):
    _, qmodel, _ = quantized_family("pixart", "w8a8-static")
    text = qmodel.plan.to_json()
    data = json.loads(text)
    assert data["_type"] == "QuantPlan" and data["_version"] == 1 and text.endswith("\n")
    again = QuantPlan.from_json(text)
    assert again == qmodel.plan
    assert again.to_json() == text


def test_summary_lists_every_layer_and_reason(quantized_family):
    _, qmodel, _ = quantized_family("sd3", "w8a8")
    summary = qmodel.plan.summary()
    for fqn, layer in qmodel.plan.layers.items():
        assert fqn in summary
    assert "kept in full precision: why" in summary
    assert "condition-only" in summary
    assert "average weight bits" in summary.splitlines()[-1]


def test_average_weight_bits_is_parameter_weighted(quantized_family):
    _, qmodel, _ = quantized_family("flux", "w8a8")
    layers = qmodel.plan.weighted_layers()
    expected = sum(l.num_params * (8 if l.quantized else 16) for l in layers) / sum(l.num_params for l in layers)
    assert qmodel.plan.average_weight_bits == pytest.approx(expected)
    assert 8 <= qmodel.plan.average_weight_bits < 16


def test_wrong_version_rejected(quantized_family):
    _, qmodel, _ = quantized_family("pixart", "w8a8")
    data = qmodel.plan.to_dict()
    data["_version"] = 99
    with pytest.raises(CheckpointError, match="version 99"):
        QuantPlan.from_dict(data)

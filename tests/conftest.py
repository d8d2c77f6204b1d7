"""Session-scoped fixtures: each tiny family is built, copied and quantized once per recipe for the whole run."""

from __future__ import annotations

import copy
import functools
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in the interpreter on the CPU (set before importing them)
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

from families import FAMILIES  # noqa: E402

import fxquant  # noqa: E402


@functools.cache
def quantized(family_name: str, recipe: str):
    """(float model, quantized model, calibration inputs) for a family and recipe, built once per session."""
    family = FAMILIES[family_name]
    model = family.build()
    reference = copy.deepcopy(model)
    calibration = [family.inputs(batch=2, seed=seed) for seed in range(2)]
    qmodel = fxquant.quantize(model, recipe, calibration)
    return reference, qmodel, calibration


@pytest.fixture(scope="session")
def quantized_family():
    return quantized


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """The tiny PixArt-alpha pipeline saved with save_pretrained (to be reloaded with from_pretrained)."""
    from tiny_pipeline import build_tiny_pixart_pipeline

    path = tmp_path_factory.mktemp("pipeline")
    build_tiny_pixart_pipeline(seed=0).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)

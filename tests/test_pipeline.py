"""quantize_pipeline on a real diffusers PixArtAlphaPipeline saved and reloaded with save/from_pretrained."""

import numpy as np
import pytest
import torch
from diffusers import PixArtAlphaPipeline

import fxquant
from tiny_pipeline import CALIBRATION_PROMPTS, EVAL_PROMPTS, pipeline_kwargs
from fxquant.metrics import psnr


def _generate(pipe, seed=3):
    return pipe(EVAL_PROMPTS[:2], num_inference_steps=4, generator=torch.Generator().manual_seed(seed),
                output_type="np", **pipeline_kwargs()).images


@pytest.fixture(scope="module")
def pipelines(tiny_pipeline_dir):
    reference = PixArtAlphaPipeline.from_pretrained(tiny_pipeline_dir)
    pipe = PixArtAlphaPipeline.from_pretrained(tiny_pipeline_dir)
    for p in (reference, pipe):
        p.set_progress_bar_config(disable=True)
    fxquant.quantize_pipeline(pipe, "w8a8", CALIBRATION_PROMPTS[:4], num_inference_steps=4, batch_size=2,
                              **pipeline_kwargs())
    return reference, pipe


def test_pipeline_generates_with_quantized_transformer(pipelines):
    reference, pipe = pipelines
    assert isinstance(pipe.transformer, fxquant.QuantizedModel)
    assert pipe.transformer.plan.calibration_calls == 2 * 4  # 2 batches x 4 steps (CFG in one batch)
    images, expected = _generate(pipe), _generate(reference)
    assert images.shape == expected.shape
    values = psnr(images, expected)
    assert min(values) > 30, f"PSNR against full precision {values}"
    assert not np.array_equal(images, expected)


def test_quantized_transformer_saves_and_loads_into_pipeline(pipelines, tmp_path):
    _, pipe = pipelines
    before = _generate(pipe)
    fxquant.save(pipe.transformer, tmp_path / "transformer-w8a8")
    pipe.transformer = fxquant.load(tmp_path / "transformer-w8a8")
    np.testing.assert_array_equal(_generate(pipe), before)


def test_prepared_model_is_accepted_by_the_pipeline(tiny_pipeline_dir):
    pipe = PixArtAlphaPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    prepared = fxquant.prepare(pipe.transformer, "w8a8-static")
    reference = _generate(pipe)
    pipe.transformer = prepared
    np.testing.assert_array_equal(_generate(pipe), reference)  # calibration runs in full precision
    pipe.transformer = fxquant.convert(prepared)
    assert min(psnr(_generate(pipe), reference)) > 25


def test_quantize_pipeline_hides_the_pipeline_bar_and_restores_it(tiny_pipeline_dir, capsys):
    """Calibration shows fxquant's one bar, not the pipeline's per-call bars; the user's bar settings come back."""
    pipe = PixArtAlphaPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(desc="pipeline steps")
    fxquant.quantize_pipeline(pipe, "w8a8", CALIBRATION_PROMPTS[:2], num_inference_steps=2, batch_size=2,
                              **pipeline_kwargs())
    calibration_output = capsys.readouterr().err
    assert "calibrating w8a8" in calibration_output and "pipeline steps" not in calibration_output
    assert pipe._progress_bar_config == {"desc": "pipeline steps"}
    _generate(pipe)
    assert "pipeline steps" in capsys.readouterr().err

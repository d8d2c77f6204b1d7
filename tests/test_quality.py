"""The reference models (trained on Fashion-MNIST, committed) and the quality harness, at small N on the CPU."""

import pytest
import torch

import fxquant
from fxquant.quality import calibration_prompts, eval_prompts, evaluate, generate, image_scores
from fxquant.reference.classifier import load_classifier
from fxquant.reference.pipeline import REFERENCE_MODELS, load_reference_pipeline


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.mark.parametrize("name", list(REFERENCE_MODELS))
def test_reference_pipeline_loads_offline_and_generates(name, classifier):
    pipe = load_reference_pipeline(name)
    steps, guidance = REFERENCE_MODELS[name]
    prompts, labels = eval_prompts(4, seed=0)
    noise = torch.randn((4, 1, 8, 32, 32) if pipe.is_video else (4, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    images, _ = generate(pipe, prompts, noise, steps, guidance, batch=4)
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.1
    scores = image_scores(images, labels, classifier)
    assert scores["accuracy"] >= 0.5, scores  # 4 samples: a smoke check; full-N figures are in README
    if pipe.is_video:
        assert images.shape == (4, 8, 1, 32, 32) and scores["temporal_consistency"] > 0.9


def test_pipeline_with_every_layer_kept_reproduces_full_precision():
    """The wrappers are transparent: a 'quantized' pipeline that keeps every layer generates the same images."""
    base = load_reference_pipeline("t2i-dit")
    prompts, _ = eval_prompts(2, seed=3)
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    reference, _ = generate(base, prompts, noise, 20, 3.0, batch=2)
    config = fxquant.W8A8DynamicConfig(keep_full_precision={"re:.*": "test: keep all"})
    fxquant.quantize_pipeline(base, config, calibration_prompts(2), num_inference_steps=20, guidance_scale=3.0)
    images, _ = generate(base, prompts, noise, 20, 3.0, batch=2)
    assert torch.equal(images, reference)


def test_harness_report_grid_and_table(tmp_path):
    report = evaluate("fewstep-unet", ["w8a8", "w8a8-static"], samples=4, calibration=2, out_dir=tmp_path, echo=lambda *_: None)
    rows = {row["recipe"]: row for row in report["rows"]}
    assert set(rows) == {"fp", "w8a8", "w8a8-static"}
    for recipe in ("w8a8", "w8a8-static"):
        row = rows[recipe]
        assert len(row["sqnr_db_per_step"]) == 4 and min(row["sqnr_db_per_step"]) > 15
        assert row["psnr_db"] > 25 and 0.9 < row["ssim"] <= 1
        assert row["weight_bytes"] < rows["fp"]["weight_bytes"] / 2
        assert (tmp_path / f"fewstep-unet-{recipe}.png").exists()
    assert (tmp_path / "fewstep-unet.json").exists() and "| fewstep-unet | w8a8 |" in (tmp_path / "fewstep-unet.md").read_text()


def test_harness_compiled_runner_scores_the_rewritten_graph():
    """runner="compiled": the denoiser's blocks compiled with backend="fxquant" (feed-forward GELU + quantize and
    gated residuals rewritten into fused ops); on the CPU their reference ops give the eager numbers exactly."""
    from fxquant.backends.triton.backend import compile_counter

    recipe = "w8a8-fp8:static_hidden_activations=true"
    torch._dynamo.reset()
    compile_counter.clear()
    compiled = evaluate("t2i-dit", [recipe], samples=2, calibration=2, runner="compiled", echo=lambda *_: None)
    assert compile_counter["fused_activations"] >= 1 and compile_counter["fused_residuals"] >= 1
    eager = evaluate("t2i-dit", [recipe], samples=2, calibration=2, echo=lambda *_: None)
    row, eager_row = compiled["rows"][1], eager["rows"][1]
    assert row["recipe"] == f"{recipe} (compiled)"
    assert row["psnr_db"] == eager_row["psnr_db"] and row["sqnr_db_per_step"] == eager_row["sqnr_db_per_step"]
    with pytest.raises(ValueError, match="runner must be"):
        evaluate("t2i-dit", [recipe], runner="inductor")


def test_harness_onnx_runner_takes_an_activation_form():
    """runner="onnx:per_token_symmetric": the export's symmetric per-token form generates end to end on ONNX Runtime,
    its row named for the form, near the torch row; an unknown form fails before any generation."""
    report = evaluate("t2i-dit", ["w8a8"], samples=2, calibration=2, runner="onnx:per_token_symmetric",
                      echo=lambda *_: None)
    row = report["rows"][1]
    assert row["recipe"] == "w8a8 (onnx per_token_symmetric)"
    assert row["psnr_db"] > 35 and min(row["sqnr_db_per_step"]) > 30
    with pytest.raises(ValueError, match="act form must be one of"):
        evaluate("t2i-dit", ["w8a8"], runner="onnx:per_row")
    with pytest.raises(ValueError, match="runner must be"):
        evaluate("t2i-dit", ["w8a8"], runner="compiled:per_tensor")

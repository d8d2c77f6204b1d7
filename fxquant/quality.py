"""The quality harness: every recipe measured the same way on a reference model, against full precision.

For a reference model (t2i-dit, video-dit, fewstep-unet) and recipes: N prompts (every class, every caption
template, held-out ones included) are generated in full precision and quantized from identical initial noise.
Reported per recipe: PSNR and SSIM against the full-precision images (video: per frame), SQNR of the denoiser
output per timestep on the full-precision trajectory, FD-FMNIST and prompt-class accuracy (full precision and
quantized), temporal consistency for video, weight bytes, quantization and generation time. Writes
quality.json, quality.md (table) and one grid PNG per recipe (full-precision row over quantized row).
Calibration prompts use the training templates with other seeds than the evaluated samples.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .api import find_denoiser, quantize_pipeline
from .config import QuantConfig, get_config
from .metrics import psnr, sqnr_db, ssim
from .reference.classifier import classify, feature_stats, frechet_distance, load_classifier, load_test_feature_stats
from .reference.data import CLASS_NAMES, TEMPLATES, TRAIN_TEMPLATES, caption
from .reference.pipeline import REFERENCE_MODELS, FashionPipeline, load_reference_pipeline

CALIBRATION_PROMPTS = 32
SQNR_SAMPLES = 8  # denoiser calls of this many samples are recorded for per-timestep SQNR


@contextmanager
def record_denoiser_calls(module: torch.nn.Module, calls: list):
    """Append a copy of every call's (args, kwargs) to `calls` while the context is open."""

    def hook(_module, args, kwargs):
        calls.append(torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, (args, kwargs)))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def eval_prompts(count: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """`count` prompts cycling through the classes with random templates (held-out ones included), and labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % len(CLASS_NAMES)
    templates = torch.randint(len(TEMPLATES), (count,), generator=generator)
    return [caption(int(l), int(t)) for l, t in zip(labels, templates)], labels


def calibration_prompts(count: int = CALIBRATION_PROMPTS, seed: int = 1234) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(CLASS_NAMES), (count,), generator=generator)
    templates = torch.randint(TRAIN_TEMPLATES, (count,), generator=generator)
    return [caption(int(l), int(t)) for l, t in zip(labels, templates)]


def _initial_noise(pipe: FashionPipeline, count: int, seed: int) -> torch.Tensor:
    shape = (count, 1, 8, 32, 32) if pipe.is_video else (count, 1, 32, 32)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def generate(pipe: FashionPipeline, prompts: list[str], noise: torch.Tensor, steps: int, guidance: float,
             batch: int) -> tuple[torch.Tensor, float]:
    """Images in [0, 1] as [N, 1, H, W] (video [N, F, 1, H, W]) on the CPU, and seconds taken."""
    start = time.perf_counter()
    outputs = []
    for i in tqdm(range(0, len(prompts), batch), desc="generating", unit="batch", leave=False):
        out = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                   latents=noise[i:i + batch], output_type="pt").images
        outputs.append(out.float().cpu())
    images = torch.cat(outputs)
    images = images.movedim(-1, 1) if images.dim() == 4 else images.movedim(-1, 2)
    return images, time.perf_counter() - start


def image_scores(images: torch.Tensor, labels: torch.Tensor, classifier) -> dict[str, float]:
    """Prompt-class accuracy, FD-FMNIST and, for video, temporal consistency of generated images in [0, 1]."""
    frames = images.flatten(0, 1) if images.dim() == 5 else images
    frame_labels = labels.repeat_interleave(images.shape[1]) if images.dim() == 5 else labels
    predicted, features = classify(classifier, frames * 2 - 1)
    scores = {"accuracy": (predicted == frame_labels).float().mean().item(),
              "fd_fmnist": frechet_distance(*feature_stats(features), *load_test_feature_stats())}
    if images.dim() == 5:
        feats = features.view(images.shape[0], images.shape[1], -1)
        scores["temporal_consistency"] = F.cosine_similarity(feats[:, 1:], feats[:, :-1], dim=-1).mean().item()
    return scores


def _as_frames(images: torch.Tensor) -> np.ndarray:
    frames = images.flatten(0, 1) if images.dim() == 5 else images
    return frames.permute(0, 2, 3, 1).numpy()


def save_grid(reference: torch.Tensor, quantized: torch.Tensor, path: Path, columns: int = 10) -> None:
    """PNG: full-precision row over quantized row (video: the first clips' frames)."""
    from PIL import Image

    top, bottom = _as_frames(reference)[:columns], _as_frames(quantized)[:columns]
    rows = [np.concatenate(list(row[..., 0]), axis=1) for row in (top, bottom)]
    grid = np.concatenate([rows[0], np.ones((2, rows[0].shape[1])), rows[1]], axis=0)
    Image.fromarray((grid * 255).round().astype(np.uint8)).resize(
        (grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


def evaluate(model: str, recipes: list[str | QuantConfig], samples: int = 100, seed: int = 0,
             device: str = "cpu", out_dir: str | Path | None = None, batch: int = 100,
             calibration: int = CALIBRATION_PROMPTS, echo=print, runner: str = "torch") -> dict[str, Any]:
    """Run the harness on reference `model` for `recipes`; returns (and writes, if out_dir) the report.

    runner "onnx": each quantized denoiser is exported and runs on ONNX Runtime (CPU, per-token activations;
    rows are named "<recipe> (onnx)"), "onnx:<act form>" the same with another activation form of the export
    (fxquant.backends.onnx.translations, e.g. "onnx:per_token_symmetric"; rows "<recipe> (onnx <act form>)");
    "compiled": its repeated blocks are compiled with backend="fxquant" (`QuantizedModel.compile_blocks`: the fused
    kernels on CUDA, the rewritten graph's reference ops on the CPU; rows "<recipe> (compiled)").
    """
    kind, _, act_form = runner.partition(":")
    if kind not in ("torch", "onnx", "compiled") or (act_form and kind != "onnx"):
        raise ValueError(f"runner must be 'torch', 'onnx', 'onnx:<act form>' or 'compiled', got {runner!r}.")
    if act_form:
        from .backends.onnx.translations import ACT_FORMS

        if act_form not in ACT_FORMS:
            raise ValueError(f"runner {runner!r}: the act form must be one of {ACT_FORMS}.")
    for recipe in recipes:  # a bad recipe string fails now, not after the full-precision generation
        get_config(recipe)
    steps, guidance = REFERENCE_MODELS[model]
    classifier = load_classifier(device)
    base = load_reference_pipeline(model, device=device)
    prompts, labels = eval_prompts(samples, seed)
    noise = _initial_noise(base, samples, seed + 1)
    calls: list = []
    with record_denoiser_calls(base.denoiser, calls):
        generate(base, prompts[:SQNR_SAMPLES], noise[:SQNR_SAMPLES], steps, guidance, batch)
    with torch.no_grad():
        reference_outputs = [base.denoiser(*args, **kwargs)[0] for args, kwargs in calls]
    reference_images, reference_seconds = generate(base, prompts, noise, steps, guidance, batch)
    reference_bytes = module_bytes(base.denoiser)
    rows = [{"recipe": "fp", **image_scores(reference_images, labels, classifier), "psnr_db": None, "ssim": None,
             "sqnr_db_per_step": None, "weight_bytes": reference_bytes, "average_weight_bits": 16.0,
             "quantized_weight_bits": None, "sensitivity_seconds": None, "allocation_checks": {},
             "quantize_seconds": 0.0, "generate_seconds": reference_seconds}]
    echo(f"{model} fp: accuracy {rows[0]['accuracy']:.3f}, FD-FMNIST {rows[0]['fd_fmnist']:.3f}")
    for recipe in recipes:
        name = recipe if isinstance(recipe, str) else recipe.name
        pipe = copy.deepcopy(base)
        start = time.perf_counter()
        quantize_pipeline(pipe, recipe, calibration_prompts(calibration), num_inference_steps=steps, batch_size=16,
                          guidance_scale=guidance)
        quantize_seconds = time.perf_counter() - start
        if kind == "onnx":
            from .backends.onnx import OrtDenoiser

            name = f"{name} (onnx {act_form})" if act_form else f"{name} (onnx)"
            setattr(pipe, find_denoiser(pipe), OrtDenoiser(pipe.denoiser, tempfile.mkdtemp(prefix="fxquant-onnx-"),
                                                           act_form=act_form or "per_token"))
        elif kind == "compiled":
            name = f"{name} (compiled)"
            pipe.denoiser.compile_blocks()
        qmodel = pipe.denoiser
        with torch.no_grad():
            outputs = [qmodel(*args, **kwargs)[0] for args, kwargs in calls]
        per_step = [sqnr_db(o, r) for o, r in zip(outputs, reference_outputs)]
        images, seconds = generate(pipe, prompts, noise, steps, guidance, batch)
        frames, reference_frames = _as_frames(images), _as_frames(reference_images)
        row = {"recipe": name, **image_scores(images, labels, classifier),
               "psnr_db": float(np.mean(psnr(frames, reference_frames))),
               "ssim": float(np.mean(ssim(frames, reference_frames))),
               "sqnr_db_per_step": [float(np.mean(per_step[i::steps])) for i in range(steps)],
               "weight_bytes": module_bytes(qmodel), "average_weight_bits": qmodel.plan.average_weight_bits,
               "quantized_weight_bits": qmodel.plan.quantized_average_weight_bits,
               "sensitivity_seconds": qmodel.plan.sensitivity_seconds,
               "allocation_checks": qmodel.plan.allocation_checks,
               "quantize_seconds": quantize_seconds, "generate_seconds": seconds}
        rows.append(row)
        echo(f"{model} {name}: accuracy {row['accuracy']:.3f}, FD-FMNIST {row['fd_fmnist']:.3f}, "
             f"PSNR {row['psnr_db']:.2f} dB")
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            save_grid(reference_images, images, Path(out_dir) / f"{model}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.png")
    report = {"model": model, "samples": samples, "calibration_prompts": calibration, "steps": steps,
              "guidance_scale": guidance, "seed": seed,
              "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if out_dir is not None:
        out = Path(out_dir)
        (out / f"{model}.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / f"{model}.md").write_text(format_table([report]) + "\n")
    return report


def format_table(reports: list[dict[str, Any]]) -> str:
    """One markdown table for several reports (model x recipe rows)."""
    lines = ["| model | recipe | W bits (quantized layers) | W bits (all, fp = 16) | accuracy | FD-FMNIST | PSNR dB | SSIM | SQNR dB (mean over steps) | "
             "temporal cons. | weight MB | quantize s | generate s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for report in reports:
        for row in report["rows"]:
            sqnr = row["sqnr_db_per_step"]
            lines.append(
                f"| {report['model']} | {row['recipe']} | "
                f"{'-' if row.get('quantized_weight_bits') is None else format(row['quantized_weight_bits'], '.2f')} | "
                f"{row['average_weight_bits']:.2f} | {row['accuracy']:.3f} | "
                f"{row['fd_fmnist']:.3f} | {'-' if row['psnr_db'] is None else format(row['psnr_db'], '.2f')} | "
                f"{'-' if row['ssim'] is None else format(row['ssim'], '.4f')} | "
                f"{'-' if sqnr is None else format(float(np.mean(sqnr)), '.1f')} | "
                f"{format(row['temporal_consistency'], '.4f') if 'temporal_consistency' in row else '-'} | "
                f"{row['weight_bytes'] / 1e6:.2f} | {row['quantize_seconds']:.1f} | {row['generate_seconds']:.1f} |")
    return "\n".join(lines)


def evaluate_all(models: list[str], recipes: list[str], samples: int, seed: int, device: str, out_dir: str | Path,
                 batch: int = 100, calibration: int = CALIBRATION_PROMPTS, echo=print, runner: str = "torch") -> str:
    """The harness over several models (video: a quarter of the samples, 8 frames each); writes quality.md."""
    reports = [evaluate(m, recipes, samples if m != "video-dit" else max(1, samples // 4), seed, device, out_dir,
                        batch, calibration, echo, runner) for m in tqdm(models, desc="reference models", disable=len(models) < 2)]
    table = format_table(reports)
    Path(out_dir, "quality.md").write_text(table + "\n")
    return table

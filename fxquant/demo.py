"""`fxquant demo`: quantize the built-in default pipeline with each recipe and compare it with full precision.

The default model is a tiny PixArt-alpha pipeline built in code from a fixed seed (T5 text encoder, word-level
tokenizer, AutoencoderKL, DPM-Solver): nothing is downloaded. For every recipe the same prompts are generated
from the same noise in full precision and quantized; the table reports the denoiser's output error on recorded
calls, PSNR / SSIM of the images, the denoiser's bytes and generation time.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .api import find_denoiser, quantize_pipeline
from .metrics import psnr, relative_l2, sqnr_db, ssim

CALIBRATION_PROMPTS = [
    "a photo of a cat", "a red car on the street", "a small house with a blue door", "a dog in the park",
    "a green tree under the sky", "a big red apple", "a cat with a hat", "a blue car near a tree",
]
EVAL_PROMPTS = ["a photo of a dog", "a red house", "a tree in the park", "a small blue car"]
_VOCABULARY = sorted({word for prompt in CALIBRATION_PROMPTS + EVAL_PROMPTS for word in prompt.split()})
IMAGE_SIZE = 32
MAX_TOKENS = 16
DEMO_STEPS = 8
DEMO_RECIPES = ("w8a8", "w8a8-static")


def build_demo_pipeline(seed: int = 0):
    """The built-in default model: a tiny PixArtAlphaPipeline with seeded random weights (CPU, float32)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(_VOCABULARY)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=MAX_TOKENS)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                           num_heads=4, decoder_start_token_id=0)).eval()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=4,
        cross_attention_dim=64, caption_channels=32, sample_size=IMAGE_SIZE // 2, patch_size=2,
        norm_type="ada_norm_single", use_additional_conditions=False,
    ).eval()
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=IMAGE_SIZE).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs(pipe) -> dict[str, Any]:
    """Arguments the demo pipeline needs on every call (size, token length, no caption cleaning)."""
    return dict(height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=MAX_TOKENS, clean_caption=False,
                use_resolution_binning=False)


@contextmanager
def record_denoiser_calls(module: nn.Module, calls: list[tuple[tuple, dict[str, Any]]]):
    """Append a copy of every call's (args, kwargs) to `calls` while the context is open."""

    def hook(_module, args, kwargs):
        calls.append(torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, (args, kwargs)))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def module_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def generate(pipe, prompts: list[str], steps: int, seed: int) -> tuple[np.ndarray, float]:
    """Images [N, H, W, 3] in [0, 1] from a fixed seed, and the seconds it took."""
    start = time.perf_counter()
    images = pipe(prompts, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
                  output_type="np", **pipeline_kwargs(pipe)).images
    return images, time.perf_counter() - start


def run_demo(recipes=DEMO_RECIPES, out_dir: str | Path = "fxquant-demo", steps: int = DEMO_STEPS, seed: int = 0,
             echo=print) -> dict[str, Any]:
    """Quantize the default pipeline with each recipe; print the comparison table and write demo.json."""
    base = build_demo_pipeline(seed)
    denoiser_name = find_denoiser(base)
    calls: list[tuple[tuple, dict[str, Any]]] = []
    with record_denoiser_calls(getattr(base, denoiser_name), calls):
        reference_images, reference_seconds = generate(base, EVAL_PROMPTS, steps, seed)
    with torch.no_grad():
        reference_outputs = [getattr(base, denoiser_name)(*args, **kwargs)[0] for args, kwargs in calls]
    rows = [{"recipe": "full precision", "denoiser_rel_l2": 0.0, "denoiser_sqnr_db": None, "psnr_db": None,
             "ssim": 1.0, "denoiser_bytes": module_bytes(getattr(base, denoiser_name)),
             "generate_seconds": reference_seconds}]
    for recipe in recipes:
        pipe = copy.deepcopy(base)
        quantize_pipeline(pipe, recipe, CALIBRATION_PROMPTS, num_inference_steps=steps, batch_size=4, seed=seed + 1,
                          **pipeline_kwargs(pipe))
        qmodel = getattr(pipe, denoiser_name)
        with torch.no_grad():
            outputs = [qmodel(*args, **kwargs)[0] for args, kwargs in calls]
        images, seconds = generate(pipe, EVAL_PROMPTS, steps, seed)
        rows.append({
            "recipe": recipe,
            "denoiser_rel_l2": float(np.mean([relative_l2(o, r) for o, r in zip(outputs, reference_outputs)])),
            "denoiser_sqnr_db": float(np.mean([sqnr_db(o, r) for o, r in zip(outputs, reference_outputs)])),
            "psnr_db": float(np.mean(psnr(images, reference_images))),
            "ssim": float(np.mean(ssim(images, reference_images))),
            "denoiser_bytes": module_bytes(qmodel),
            "generate_seconds": seconds,
            "average_weight_bits": qmodel.plan.average_weight_bits,
        })
    result = {"model": "built-in tiny PixArt-alpha pipeline (random weights, seed %d)" % seed,
              "prompts": EVAL_PROMPTS, "steps": steps, "torch": torch.__version__, "rows": rows}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    echo(format_table(rows))
    echo(f"\nwritten: {out / 'demo.json'}")
    return result


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the demo rows."""
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = ["| recipe | denoiser rel. L2 | denoiser SQNR dB | image PSNR dB | image SSIM | denoiser bytes | generate s |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['recipe']} | {fmt(row['denoiser_rel_l2'], '.4f')} | {fmt(row['denoiser_sqnr_db'], '.1f')} | "
            f"{fmt(row['psnr_db'], '.1f')} | {fmt(row['ssim'], '.4f')} | {row['denoiser_bytes']:,} | "
            f"{row['generate_seconds']:.2f} |"
        )
    return "\n".join(lines)

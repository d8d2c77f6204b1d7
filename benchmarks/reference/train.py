"""Train the reference models on real Fashion-MNIST data (GPU) and evaluate their sample quality.

    python benchmarks/reference/train.py --models t2i-dit fewstep-unet video-dit --out OUTDIR [--device cuda]

Each model is a diffusers denoiser trained with rectified flow (x_s = (1 - s) x0 + s noise, target noise - x0,
timestep s * 1000) on 32x32 Fashion-MNIST images (video: 8-frame clips of real items moving and zooming),
conditioned on MiniLM caption embeddings (committed table) with 10% caption dropout for classifier-free
guidance, bf16 autocast, AdamW, EMA. Seeded. Writes per model: OUTDIR/<name>/ (FashionPipeline, fp16 weights),
OUTDIR/<name>-loss.json; then samples the EMA model and reports prompt-class accuracy, FD-FMNIST and, for
video, frame-to-frame consistency into OUTDIR/reference-quality.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, LatteTransformer3DModel, PixArtTransformer2DModel, \
    UNet2DConditionModel

from fxquant.reference.classifier import classify, feature_stats, frechet_distance, load_classifier, \
    load_test_feature_stats
from fxquant.reference.data import (CLASS_NAMES, EMPTY_CAPTION_INDEX, TEMPLATES, TRAIN_TEMPLATES, caption,
                                    caption_index, load_fashion_mnist, moving_clips)
from fxquant.reference.pipeline import REFERENCE_MODELS, FashionPipeline
from fxquant.reference.text import CaptionTable


def build_denoiser(name: str) -> torch.nn.Module:
    """The architecture of each reference model (diffusers classes, no custom layers)."""
    if name == "t2i-dit":  # PixArt-alpha style: adaLN-single, cross-attention to MiniLM tokens
        return PixArtTransformer2DModel(
            num_attention_heads=6, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=8,
            cross_attention_dim=192, caption_channels=384, sample_size=32, patch_size=2, norm_type="ada_norm_single",
            use_additional_conditions=False)
    if name == "video-dit":  # Latte: alternating spatial and temporal transformer blocks
        return LatteTransformer3DModel(
            num_attention_heads=6, attention_head_dim=32, in_channels=1, out_channels=1, num_layers=4,
            cross_attention_dim=192, caption_channels=384, sample_size=32, patch_size=4, video_length=8,
            norm_type="ada_norm_single")
    if name == "fewstep-unet":  # SDXL-style blocks: plain down block, then cross-attention blocks
        return UNet2DConditionModel(
            sample_size=32, in_channels=1, out_channels=1, block_out_channels=(64, 96, 128), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=384, attention_head_dim=32,
            norm_num_groups=16)
    raise ValueError(name)


def denoise(model, name, x, sigma, embeds, mask):
    timestep = sigma * 1000
    if name == "fewstep-unet":
        return model(sample=x, timestep=timestep, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                     return_dict=False)[0]
    if name == "t2i-dit":
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    return model(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)[0]  # no mask: Latte mis-shapes it


def sample_sigmas(name: str, batch: int, generator, device) -> torch.Tensor:
    """Training noise levels: logit-normal (SD3); the few-step model also sees its 4 sampling levels often."""
    sigma = torch.sigmoid(torch.randn(batch, generator=generator)).to(device)
    if name == "fewstep-unet":
        grid = torch.tensor([1.0, 0.75, 0.5, 0.25], device=device)
        pick = grid[torch.randint(4, (batch,), generator=generator).to(device)]
        use_grid = (torch.rand(batch, generator=generator) < 0.5).to(device)
        sigma = torch.where(use_grid, pick, sigma)
    return sigma


def train(name: str, args, images, labels, captions: CaptionTable) -> tuple[torch.nn.Module, dict]:
    device = args.device
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = build_denoiser(name).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    steps = args.steps[name]
    batch = args.batch // 4 if name == "video-dit" else args.batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    warmup = 200
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    embeds_all, mask_all = captions.embeds.to(device), captions.mask.to(device)
    images = images.to(device)
    labels = labels.to(device)
    losses, start, done = [], time.time(), 0
    for step in range(steps):
        index = torch.randint(len(images), (batch,), generator=generator).to(device)
        x0 = images[index]
        if name == "video-dit":
            x0 = moving_clips(x0, generator)
        template = torch.randint(TRAIN_TEMPLATES, (batch,), generator=generator).to(device)
        rows = template * len(CLASS_NAMES) + labels[index]
        rows = torch.where((torch.rand(batch, generator=generator) < 0.1).to(device), EMPTY_CAPTION_INDEX, rows)
        sigma = sample_sigmas(name, batch, generator, device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        s = sigma.view(-1, *([1] * (x0.dim() - 1)))
        x = (1 - s) * x0 + s * noise
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            prediction = denoise(model, name, x, sigma, embeds_all[rows], mask_all[rows])
        loss = F.mse_loss(prediction.float(), noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        if step % 50 == 0 or step == steps - 1:
            losses.append([step, loss.item()])
        done = step + 1
        if time.time() - start > args.max_seconds:
            break
    seconds = time.time() - start
    print(f"{name}: {params / 1e6:.2f} M params, {done}/{steps} steps, {seconds:.0f} s, loss {losses[-1][1]:.4f}",
          flush=True)
    return ema, {"params": params, "steps": done, "planned_steps": steps, "batch": batch, "seconds": seconds,
                 "hit_time_cap": done < steps, "loss": losses, "lr": args.lr, "ema": args.ema, "seed": args.seed}


def evaluate(name: str, pipe: FashionPipeline, classifier, count: int, seed: int) -> dict:
    """Sample `count` prompts (every class, every template incl. held-out ones) and score them."""
    steps, guidance = REFERENCE_MODELS[name]
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % len(CLASS_NAMES)
    templates = torch.randint(len(TEMPLATES), (count,), generator=generator)
    prompts = [caption(int(l), int(t)) for l, t in zip(labels, templates)]
    images = []
    for start in range(0, count, 250):
        out = pipe(prompts[start:start + 250], num_inference_steps=steps, guidance_scale=guidance,
                   generator=generator, output_type="pt").images
        images.append(out.cpu())
    images = torch.cat(images).movedim(-1, 1 if images[0].dim() == 4 else 2) * 2 - 1  # back to [-1, 1]
    result = {"samples": count, "steps": steps, "guidance_scale": guidance}
    if images.dim() == 5:  # [N, F, 1, H, W]
        frames = images.flatten(0, 1)
        predicted, features = classify(classifier, frames)
        frame_labels = labels.repeat_interleave(images.shape[1])
        result["frame_accuracy"] = (predicted == frame_labels).float().mean().item()
        feats = features.view(count, images.shape[1], -1)
        result["temporal_consistency"] = F.cosine_similarity(feats[:, 1:], feats[:, :-1], dim=-1).mean().item()
        result["frame_to_frame_mse"] = (images[:, 1:] - images[:, :-1]).pow(2).mean().item()
    else:
        predicted, features = classify(classifier, images)
        result["accuracy"] = (predicted == labels).float().mean().item()
        held_out = templates >= TRAIN_TEMPLATES
        result["accuracy_held_out_templates"] = (predicted == labels)[held_out].float().mean().item()
    mean, cov = feature_stats(features)
    result["fd_fmnist"] = frechet_distance(mean, cov, *load_test_feature_stats())
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(REFERENCE_MODELS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps-t2i-dit", type=int, default=6000)
    parser.add_argument("--steps-video-dit", type=int, default=4000)
    parser.add_argument("--steps-fewstep-unet", type=int, default=6000)
    parser.add_argument("--max-seconds", type=float, default=150.0, help="time cap per model (recorded if hit)")
    parser.add_argument("--eval-samples", type=int, default=1000)
    args = parser.parse_args()
    args.steps = {"t2i-dit": args.steps_t2i_dit, "video-dit": args.steps_video_dit,
                  "fewstep-unet": args.steps_fewstep_unet}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_fashion_mnist("train")
    captions = CaptionTable()
    classifier = load_classifier(args.device)
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "models": {}}
    for name in args.models:
        ema, log = train(name, args, images, labels, captions)
        (out / f"{name}-loss.json").write_text(json.dumps(log) + "\n")
        pipe = FashionPipeline(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
                               **{"unet" if name == "fewstep-unet" else "transformer": ema.to(torch.float16)})
        pipe.save_pretrained(out / name)
        pipe.to(torch.float32)
        pipe.set_progress_bar_config(disable=True)
        quality = evaluate(name, pipe, classifier, args.eval_samples if name != "video-dit" else args.eval_samples // 4,
                           seed=args.seed + 1)
        report["models"][name] = {"training": {k: v for k, v in log.items() if k != "loss"}, "quality": quality}
        print(name, json.dumps(quality), flush=True)
        (out / "reference-quality.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

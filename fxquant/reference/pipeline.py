"""FashionPipeline: the reference models' diffusers pipeline (pixel space, flow matching, classifier-free guidance).

One class serves the three references: a PixArt transformer (t2i-dit), a Latte transformer (video-dit) or a
UNet2DConditionModel (fewstep-unet) denoises 32x32 grayscale images (or 8-frame clips) in pixel space; there is
no VAE. Sampling is rectified flow with diffusers' FlowMatchEulerDiscreteScheduler: x_sigma = (1 - sigma) x0 +
sigma * noise, the denoiser predicts noise - x0 at timestep sigma * 1000. Prompts are encoded by MiniLM (from
the committed caption table, or the encoder when installed).

    pipe = load_reference_pipeline("t2i-dit")
    images = pipe(["a photo of a sneaker"], num_inference_steps=20, generator=g).images   # [N, 32, 32, 1]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput

from .data import IMAGE_SIZE, VIDEO_FRAMES
from .text import CaptionTable, encode, load_text_encoder

REFERENCE_DIR = Path(__file__).parent / "weights"
REFERENCE_MODELS = {
    # name: (default steps, default guidance scale)
    "t2i-dit": (20, 3.0),
    "video-dit": (20, 3.0),
    "fewstep-unet": (4, 2.0),
}


@dataclass
class FashionPipelineOutput(BaseOutput):
    """images: [N, H, W, 1] (or [N, F, H, W, 1] for video) in [0, 1] as numpy / torch, or latents."""

    images: np.ndarray | torch.Tensor


class FashionPipeline(DiffusionPipeline):
    """Pixel-space text-to-image / text-to-video pipeline of the reference models."""

    model_cpu_offload_seq = "transformer->unet"
    _optional_components = ["transformer", "unet"]

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler, transformer=None, unet=None):
        super().__init__()
        self.register_modules(scheduler=scheduler, transformer=transformer, unet=unet)
        self._captions: CaptionTable | None = None
        self._text_encoder = None

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer if self.transformer is not None else self.unet

    @property
    def is_video(self) -> bool:
        return "video_length" in self.denoiser.config

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (MiniLM token embeddings [N, 16, 384], attention mask [N, 16]) on the CPU."""
        if self._captions is None:
            self._captions = CaptionTable()
        found = self._captions.lookup(prompts)
        if found is not None:
            return found
        if self._text_encoder is None:
            self._text_encoder = load_text_encoder()
        return encode(prompts, *self._text_encoder)

    def _denoise(self, latents, timestep, embeds, mask):
        """One denoiser call; the arguments follow the denoiser's config (wrappers hide forward's signature)."""
        kwargs = {"encoder_hidden_states": embeds, "timestep": timestep, "return_dict": False}
        if "use_additional_conditions" in self.denoiser.config:  # PixArt's adaLN-single takes size conditions
            kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        if not self.is_video:  # Latte mis-shapes per-frame text masks; it is trained without one
            kwargs["encoder_attention_mask"] = mask
        latent_name = "sample" if self.unet is not None else "hidden_states"
        return self.denoiser(**{latent_name: latents}, **kwargs)[0]

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 20, guidance_scale: float = 3.0,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "np", return_dict: bool = True):
        """Generate one image (or clip) per prompt. latents: initial noise, else drawn from `generator` (CPU)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = self.denoiser.device
        dtype = self.denoiser.dtype
        embeds, mask = self.encode_prompt(prompts)
        if guidance_scale > 1:
            empty_embeds, empty_mask = self.encode_prompt([""] * len(prompts))
            embeds, mask = torch.cat([empty_embeds, embeds]), torch.cat([empty_mask, mask])
        embeds, mask = embeds.to(device, dtype), mask.to(device)
        shape = (len(prompts), 1, VIDEO_FRAMES, IMAGE_SIZE, IMAGE_SIZE) if self.is_video else \
            (len(prompts), 1, IMAGE_SIZE, IMAGE_SIZE)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        latents = latents.to(device, torch.float32)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if guidance_scale > 1 else latents
            velocity = self._denoise(model_input.to(dtype), t.expand(model_input.shape[0]), embeds, mask).float()
            if guidance_scale > 1:
                uncond, cond = velocity.chunk(2)
                velocity = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(velocity, t, latents).prev_sample
        if output_type == "latent":
            images = latents
        else:
            images = ((latents.clamp(-1, 1) + 1) / 2).movedim(1, -1)  # channels last
            images = images.cpu().numpy() if output_type == "np" else images
        return FashionPipelineOutput(images=images) if return_dict else (images,)


def load_reference_pipeline(name: str, device: str | torch.device = "cpu",
                            directory: Path | None = None) -> FashionPipeline:
    """A committed reference pipeline ("t2i-dit", "video-dit", "fewstep-unet"), loaded offline."""
    if name not in REFERENCE_MODELS:
        raise ValueError(f"Unknown reference model {name!r}; choose one of {sorted(REFERENCE_MODELS)}.")
    path = Path(directory or REFERENCE_DIR) / name
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"No reference pipeline at {path}: train it with benchmarks/reference/train.py.")
    pipe = FashionPipeline.from_pretrained(path)  # fp16 weights on disk, computed in float32
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, torch.float32)

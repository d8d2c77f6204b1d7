"""Tiny random-init configs of the seven diffusers families fxquant supports, with inputs at two sizes.

FAMILIES maps a name to a Family: build(**overrides) makes the model from a fixed seed (overrides replace config
entries, e.g. num_layers=4 for a deeper one); inputs(batch, size) the forward keyword arguments (size = latent
height = width; frames fixed) with seeded random values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import (CogVideoXTransformer3DModel, DiTTransformer2DModel, FluxTransformer2DModel,
                       LatteTransformer3DModel, PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel)

TEXT_TOKENS = 7


@dataclass
class Family:
    name: str
    model_class: type
    config: dict
    inputs_fn: Callable[[torch.Generator, int, int], dict]
    size: int = 8
    second_size: int = 12

    def build(self, **overrides) -> torch.nn.Module:
        torch.manual_seed(0)
        return self.model_class(**{**self.config, **overrides}).eval()

    def inputs(self, batch: int = 2, size: int | None = None, seed: int = 0) -> dict:
        return self.inputs_fn(torch.Generator().manual_seed(seed), batch, size or self.size)


def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


def _timesteps(g, batch, scale=1000):
    return torch.rand(batch, generator=g) * scale


FAMILIES = {
    "pixart": Family(
        "pixart",
        PixArtTransformer2DModel, dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                       num_layers=2, cross_attention_dim=64, caption_channels=24, sample_size=8,
                                       patch_size=2, norm_type="ada_norm_single", use_additional_conditions=False),
        lambda g, b, s: dict(hidden_states=_randn(g, b, 4, s, s), encoder_hidden_states=_randn(g, b, TEXT_TOKENS, 24),
                             timestep=_timesteps(g, b).long()),
    ),
    "dit": Family(
        "dit",
        DiTTransformer2DModel, dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                    num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10),
        lambda g, b, s: dict(hidden_states=_randn(g, b, 4, s, s), timestep=_timesteps(g, b).long(),
                             class_labels=torch.randint(0, 10, (b,), generator=g)),
    ),
    "sd3": Family(
        "sd3",
        SD3Transformer2DModel, dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=32,
                                    num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=64,
                                    pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16),
        lambda g, b, s: dict(hidden_states=_randn(g, b, 4, s, s), encoder_hidden_states=_randn(g, b, TEXT_TOKENS, 24),
                             pooled_projections=_randn(g, b, 16), timestep=_timesteps(g, b)),
    ),
    "flux": Family(
        "flux",
        FluxTransformer2DModel, dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                     attention_head_dim=32, num_attention_heads=2, joint_attention_dim=24,
                                     pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(8, 12, 12)),
        lambda g, b, s: dict(hidden_states=_randn(g, b, (s // 2) ** 2, 16),
                             encoder_hidden_states=_randn(g, b, TEXT_TOKENS, 24), pooled_projections=_randn(g, b, 16),
                             timestep=_timesteps(g, b, 1.0), img_ids=_flux_image_ids(s // 2),
                             txt_ids=torch.zeros(TEXT_TOKENS, 3), guidance=torch.full((b,), 3.5)),
    ),
    "latte": Family(
        "latte",
        LatteTransformer3DModel, dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                      num_layers=2, cross_attention_dim=64, caption_channels=24, sample_size=8,
                                      patch_size=2, video_length=4, norm_type="ada_norm_single"),
        lambda g, b, s: dict(hidden_states=_randn(g, b, 4, 4, s, s), encoder_hidden_states=_randn(g, b, TEXT_TOKENS, 24),
                             timestep=_timesteps(g, b).long()),
    ),
    "cogvideox": Family(
        "cogvideox",
        CogVideoXTransformer3DModel, dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                                          num_layers=2, text_embed_dim=24, time_embed_dim=32, sample_width=8,
                                          sample_height=8, sample_frames=5, patch_size=2,
                                          max_text_seq_length=TEXT_TOKENS),
        lambda g, b, s: dict(hidden_states=_randn(g, b, 2, 4, s, s), encoder_hidden_states=_randn(g, b, TEXT_TOKENS, 24),
                             timestep=_timesteps(g, b).long()),
    ),
    "unet": Family(
        "unet",
        UNet2DConditionModel, dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                   layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=24,
                                   attention_head_dim=8, norm_num_groups=8),
        lambda g, b, s: dict(sample=_randn(g, b, 4, s, s), encoder_hidden_states=_randn(g, b, TEXT_TOKENS, 24),
                             timestep=_timesteps(g, b).long()),
    ),
}


def inputs_at_timesteps(family: Family, timesteps: list[float]) -> list[dict]:
    """One batch of 2 per timestep (seeds 0, 1, ...), every sample at that timestep: calibration sets that reach
    chosen timestep groups."""
    batches = []
    for seed, t in enumerate(timesteps):
        inputs = family.inputs(batch=2, seed=seed)
        inputs["timestep"] = torch.full_like(inputs["timestep"], t)
        batches.append(inputs)
    return batches


def _flux_image_ids(side: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()

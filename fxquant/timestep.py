"""Timestep groups: per-group quantization parameters chosen from the timestep tensor on the device.

Timesteps are normalised to one 0-1000 scale (PixArt / DiT / UNet pass 0..999 and SD3-style pipelines sigma * 1000;
Flux passes t in [0, 1], detected at calibration as all timesteps <= 1 and scaled by 1000). Boundaries
b_1 < ... < b_n split the scale into n + 1 groups [0, b_1), [b_1, b_2), ..., [b_n, 1000]. At run time the group index
is a one-element int64 tensor computed with torch.bucketize from the call's timestep: no host sync, no
recompilation per step, capturable in CUDA graphs.
"""

from __future__ import annotations

import torch


class TimestepGroup:
    """Shared by a QuantizedModel and its quantized modules: `index` holds the current call's group as a
    one-element int64 tensor (set by QuantizedModel.forward before the model runs)."""

    def __init__(self):
        self.index: torch.Tensor | None = None


def timestep_scale(t) -> float:
    """1000 when the timesteps live in [0, 1] (Flux-style), else 1."""
    return 1000.0 if float(torch.as_tensor(t).abs().max()) <= 1.0 else 1.0


def group_index(t, boundaries: torch.Tensor, scale: float) -> torch.Tensor:
    """Timestep (tensor or number; the first element decides) -> int64 [1] group index on boundaries' device."""
    t = torch.as_tensor(t, device=boundaries.device).reshape(-1)[:1].float() * scale
    return torch.bucketize(t, boundaries, right=True)

"""Calibration statistics of the activations entering a quantized layer.

An `ActivationObserver` is attached to a module as a forward pre-hook while the user's own pipeline runs the
prepared model. It keeps the running per-tensor min / max and per-input-channel absmax (what static scales and channel
balancing need), the min / max per timestep group, counts calls and tokens, and stops calibration at the first
NaN / Inf with the layer's name.
"""

from __future__ import annotations

import torch

from .errors import CalibrationError


class ActivationObserver:
    """Running statistics of one layer's input. channel_dim: 1 for conv2d inputs [B, C, H, W], -1 for linear;
    group_of: returns the timestep group of the call in progress."""

    def __init__(self, fqn: str, channel_dim: int, group_of=lambda: 0):
        self.fqn = fqn
        self.channel_dim = channel_dim
        self.group_of = group_of
        self.group_min: dict[int, torch.Tensor] = {}
        self.group_max: dict[int, torch.Tensor] = {}
        self.calls = 0
        self.tokens = 0
        self.min: torch.Tensor | None = None  # fp32 scalar
        self.max: torch.Tensor | None = None  # fp32 scalar
        self.channel_absmax: torch.Tensor | None = None  # fp32 [C]

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        if not torch.isfinite(x).all():
            bad = "NaN" if torch.isnan(x).any() else "Inf"
            raise CalibrationError(
                f"Calibration saw {bad} in the input of layer {self.fqn!r} (call {self.calls + 1}). Quantization "
                "scales cannot be computed from it. Check the calibration inputs, or calibrate in float32 if the "
                "model overflows in half precision."
            )
        channels = x.movedim(self.channel_dim, -1).reshape(-1, x.shape[self.channel_dim]).abs().amax(dim=0).float()
        self.channel_absmax = channels if self.channel_absmax is None else torch.maximum(self.channel_absmax, channels)
        lo, hi = x.min().float(), x.max().float()
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        group = self.group_of()
        self.group_min[group] = torch.minimum(self.group_min.get(group, lo), lo)
        self.group_max[group] = torch.maximum(self.group_max.get(group, hi), hi)
        self.calls += 1
        self.tokens += x.numel() // x.shape[self.channel_dim]

    def hook(self, module: torch.nn.Module, args: tuple) -> None:
        """forward_pre_hook signature: observe the first positional input."""
        self.observe(args[0])

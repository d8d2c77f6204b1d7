"""Calibration statistics of the activations entering a quantized layer.

An `ActivationObserver` is attached to a module as a forward pre-hook while the user's own pipeline runs the
prepared model. It keeps the running per-tensor min / max and per-input-channel absmax (what static scales and channel
balancing need), the min / max per timestep group, counts calls and tokens, and stops calibration at the first
NaN / Inf with the layer's name. With `track_positions` (cross-attention key / value inputs [B, L, K], for
BOS-aware quantization) it also keeps per token position the |x| maximum and the min / max, and the leading
tokens of the first call with whether every later call (and batch item) repeated them exactly.
"""

from __future__ import annotations

import torch

from .errors import CalibrationError

MAX_FP_TOKENS = 4  # leading token positions BOS-aware quantization may keep in full precision


class ActivationObserver:
    """Running statistics of one layer's input. channel_dim: 1 for conv2d inputs [B, C, H, W], -1 for linear;
    group_of: returns the timestep group of the call in progress."""

    def __init__(self, fqn: str, channel_dim: int, group_of=lambda: 0, track_positions: bool = False):
        self.fqn = fqn
        self.track_positions = track_positions
        self.position_absmax: torch.Tensor | None = None  # fp32 [L]
        self.position_min: torch.Tensor | None = None  # fp32 [L]
        self.position_max: torch.Tensor | None = None  # fp32 [L]
        self.leading_rows: torch.Tensor | None = None  # [MAX_FP_TOKENS, K] of the first call
        self.leading_constant: torch.Tensor | None = None  # bool [MAX_FP_TOKENS]
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
        if self.track_positions:
            self._observe_positions(x)
        group = self.group_of()
        self.group_min[group] = torch.minimum(self.group_min.get(group, lo), lo)
        self.group_max[group] = torch.maximum(self.group_max.get(group, hi), hi)
        self.calls += 1
        self.tokens += x.numel() // x.shape[self.channel_dim]

    def _observe_positions(self, x: torch.Tensor) -> None:
        """Per-position statistics of a [B, L, K] input; dropped for good if L changes or x is not 3-D."""
        if x.dim() != 3 or (self.position_absmax is not None and self.position_absmax.shape[0] != x.shape[1]):
            self.track_positions = False
            self.position_absmax = self.position_min = self.position_max = self.leading_rows = None
            return
        lo, hi = x.float().amin(dim=(0, 2)), x.float().amax(dim=(0, 2))
        lead = x[:, :MAX_FP_TOKENS].float()
        if self.position_absmax is None:
            self.position_min, self.position_max = lo, hi
            self.position_absmax = torch.maximum(lo.abs(), hi.abs())
            self.leading_rows = lead[0].clone()
            self.leading_constant = torch.ones(lead.shape[1], dtype=torch.bool, device=x.device)
        else:
            self.position_min = torch.minimum(self.position_min, lo)
            self.position_max = torch.maximum(self.position_max, hi)
            self.position_absmax = torch.maximum(self.position_absmax, torch.maximum(lo.abs(), hi.abs()))
        self.leading_constant &= (lead == self.leading_rows).all(dim=2).all(dim=0)

    def leading_outliers(self, ratio: float) -> int:
        """How many leading positions (0 if none, at most MAX_FP_TOKENS) each have an |x| maximum at least
        `ratio` times that of every later position: the tokens that alone stretch the static range."""
        if self.position_absmax is None:
            return 0
        for count in range(1, min(MAX_FP_TOKENS, self.position_absmax.shape[0] - 1) + 1):
            if self.position_absmax[:count].min() >= ratio * self.position_absmax[count:].max():
                return count
        return 0

    def hook(self, module: torch.nn.Module, args: tuple) -> None:
        """forward_pre_hook signature: observe the first positional input."""
        self.observe(args[0])

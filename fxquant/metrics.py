"""Quality metrics against full precision. Images are float arrays in [0, 1], shaped [N, H, W, C] or [N, C, H, W]."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def relative_l2(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference|| / ||reference|| (0 is identical)."""
    reference = reference.detach().double()
    return ((output.detach().double() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def sqnr_db(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (out - ref)^2)."""
    reference = reference.detach().double()
    noise = (output.detach().double() - reference).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def _as_nchw(images) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(images), dtype=torch.float64)
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.shape[-1] in (1, 3) and tensor.shape[1] not in (1, 3):
        tensor = tensor.permute(0, 3, 1, 2)
    return tensor


def psnr(images, reference, data_range: float = 1.0) -> list[float]:
    """Per-image PSNR in dB (inf for identical images)."""
    a, b = _as_nchw(images), _as_nchw(reference)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    return [math.inf if m == 0 else 10 * math.log10(data_range**2 / m.item()) for m in mse]


def ssim(images, reference, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> list[float]:
    """Per-image SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03), channel-averaged.
    The window shrinks to the image size for images smaller than 11 pixels."""
    a, b = _as_nchw(images), _as_nchw(reference)
    window = min(window, a.shape[-1], a.shape[-2])
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    gauss = torch.exp(-(coords**2) / (2 * sigma**2))
    gauss = gauss / gauss.sum()
    kernel = (gauss[:, None] * gauss[None, :]).expand(a.shape[1], 1, window, window).contiguous()

    def blur(x):
        return F.conv2d(x, kernel, groups=a.shape[1])

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(dim=1).tolist()

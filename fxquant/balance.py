"""Static-dynamic channel balancing (ViDiT-Q): static smoothing, then a Hadamard rotation, then dynamic per-token
quantization.

For a linear y = x W^T with input channels j:
    smoothing  s_j = max|x_j|^alpha / max_n|W_nj|^(1 - alpha)        x <- x / s,  W <- W * s   (SmoothQuant)
    rotation   R = diag(signs) . blockdiag(H_B, ..., H_B)             x <- x R,    W <- W R     (R R^T = I)
H_B is the orthonormal Walsh-Hadamard matrix of size B, the largest power of two dividing the width (capped at
MAX_BLOCK), so widths that are not powers of two (1152 = 9 x 128, 192 = 3 x 64) rotate in blocks. The signs are
drawn once from a seeded generator and stored with the layer; nothing is regenerated at load time.
"""

from __future__ import annotations

import hashlib

import torch

MAX_BLOCK = 128


def smoothing_scale(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel smoothing factors s [K] (fp32) from calibrated |x| maxima [K] and the weight [N, K]."""
    weight_absmax = weight.detach().float().abs().amax(dim=0).clamp_min(1e-5)
    scale = act_absmax.float().clamp_min(1e-5).pow(alpha) / weight_absmax.pow(1 - alpha)
    return scale.clamp(1e-4, 1e4)


def outlier_ratio(act_absmax: torch.Tensor) -> float:
    """max / median of the per-channel |x| maxima: how much a few channels dominate the per-token range."""
    return (act_absmax.max() / act_absmax.median().clamp_min(1e-8)).item()


def rotation_block(width: int) -> int:
    """Largest power of two dividing `width`, at most MAX_BLOCK (1 means: cannot rotate)."""
    return min(width & -width, MAX_BLOCK)


def rotation_signs(width: int, fqn: str, seed: int) -> torch.Tensor:
    """Deterministic random ±1 signs [width] for the layer `fqn` (seeded by seed and the name)."""
    digest = int(hashlib.sha256(f"{seed}:{fqn}".encode()).hexdigest()[:8], 16)
    generator = torch.Generator().manual_seed(digest)
    return torch.randint(0, 2, (width,), generator=generator).float() * 2 - 1


def rotate(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., K] -> x R with R = diag(signs) blockdiag(H_block), computed in fp32, returned in x's dtype.

    H_block x runs as the fast Walsh-Hadamard transform: log2(block) butterfly stages (a, b) -> (a + b, a - b) over
    element pairs h apart, h = 1, 2, ..., block / 2, in Sylvester's ordering, then 1 / sqrt(block). No matrix is
    built, so a compiled graph holds no constant to copy to the device on every call (and stays CUDA-graph safe)."""
    rows = (x.float() * signs).reshape(-1, block)
    half = 1
    while half < block:
        pairs = rows.reshape(-1, block // (2 * half), 2, half)
        first, second = pairs[:, :, 0], pairs[:, :, 1]
        rows = torch.stack([first + second, first - second], dim=2)
        half *= 2
    return (rows * block**-0.5).reshape(x.shape).to(x.dtype)

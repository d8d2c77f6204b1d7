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

import functools
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


@functools.cache
def hadamard(size: int, device: str = "cpu") -> torch.Tensor:
    """Orthonormal Walsh-Hadamard matrix [size, size] fp32 (size a power of two), Sylvester's construction."""
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return (matrix / size**0.5).to(device=device, dtype=torch.float32)


def rotation_signs(width: int, fqn: str, seed: int) -> torch.Tensor:
    """Deterministic random ±1 signs [width] for the layer `fqn` (seeded by seed and the name)."""
    digest = int(hashlib.sha256(f"{seed}:{fqn}".encode()).hexdigest()[:8], 16)
    generator = torch.Generator().manual_seed(digest)
    return torch.randint(0, 2, (width,), generator=generator).float() * 2 - 1


def rotate(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., K] -> x R with R = diag(signs) blockdiag(H_block), computed in fp32, returned in x's dtype."""
    blocks = (x.float() * signs).reshape(*x.shape[:-1], x.shape[-1] // block, block)
    return (blocks @ hadamard(block, str(x.device))).reshape(x.shape).to(x.dtype)

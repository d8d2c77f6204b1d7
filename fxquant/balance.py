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


def hadamard(size: int, like: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard matrix [size, size] (size a power of two) in Sylvester's ordering, H[i, j] =
    (-1)^(bits i and j share) / sqrt(size), in like's dtype on like's device. Built there from aranges, so a compiled
    graph computes it on the device and holds no constant copied to the device on every call (a matrix built on the
    CPU was, which also broke CUDA-graph capture)."""
    powers = 2 ** torch.arange(size.bit_length() - 1, device=like.device)
    bits = ((torch.arange(size, device=like.device)[:, None] // powers) % 2).float()  # [size, log2 size]
    return ((1 - 2 * ((bits @ bits.T) % 2)) * size**-0.5).to(like.dtype)


def rotate(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., K] -> x R with R = diag(signs) blockdiag(H_block), returned in x's dtype. Half-precision x runs as one
    matmul in its own dtype (x * signs is exact there; fp32 accumulation, one rounding of the result, as in fp32
    with a rounded output); anything else in fp32."""
    dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    rows = (x.to(dtype) * signs.to(dtype)).reshape(-1, block)
    return (rows @ hadamard(block, rows)).reshape(x.shape).to(x.dtype)

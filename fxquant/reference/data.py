"""Real data of the reference models: Fashion-MNIST, captions built from its class names, moving-item video clips.

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` (IDX files under FASHION_MNIST_DIR). Captions are
class names in varied templates; the first TRAIN_TEMPLATES are used in training, the rest are held out for
evaluation. Images are 28x28 items centred on a 32x32 canvas, scaled to [-1, 1].
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CLASS_NAMES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle boot")
TEMPLATES = (
    "a photo of a {}", "{}, product shot", "a {} on a white background", "a picture of a {}", "an image of a {}",
    "a black and white photo of a {}", "{}", "a small {}", "a {} in grayscale", "product photo: {}",
    # held out from training:
    "a centered {}", "a simple drawing of a {}",
)
TRAIN_TEMPLATES = 10
IMAGE_SIZE = 32
VIDEO_FRAMES = 8


def caption(label: int, template: int) -> str:
    return TEMPLATES[template].format(CLASS_NAMES[label])


def all_captions() -> list[str]:
    """Every (template, class) caption, index = template * 10 + label, then the empty caption (for CFG)."""
    return [caption(label, t) for t in range(len(TEMPLATES)) for label in range(len(CLASS_NAMES))] + [""]


def caption_index(label: int, template: int) -> int:
    return template * len(CLASS_NAMES) + label


EMPTY_CAPTION_INDEX = len(TEMPLATES) * len(CLASS_NAMES)


def _read_idx(path: Path) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found. Install Fashion-MNIST with `apt-get install dataset-fashion-mnist` or set "
            "FASHION_MNIST_DIR to a folder holding its IDX .gz files."
        )
    data = gzip.open(path).read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist(split: str = "train", directory: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float [N, 1, 32, 32] in [-1, 1], labels int64 [N]) of the train or test split."""
    directory = Path(directory or FASHION_MNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    images = torch.from_numpy(_read_idx(directory / f"{prefix}-images-idx3-ubyte.gz").copy())
    labels = torch.from_numpy(_read_idx(directory / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
    images = F.pad(images.float().div(127.5).sub(1.0).unsqueeze(1), (2, 2, 2, 2), value=-1.0)
    return images, labels


def moving_clips(items: torch.Tensor, generator: torch.Generator, frames: int = VIDEO_FRAMES) -> torch.Tensor:
    """Items [B, 1, 32, 32] in [-1, 1] -> clips [B, 1, frames, 32, 32]: each item moves on a straight line and
    zooms linearly between two random scales (affine resampling of the real image)."""
    batch = items.shape[0]
    device = items.device

    def rand(low, high):
        return torch.rand(batch, generator=generator).to(device) * (high - low) + low

    scale_start, scale_end = rand(0.65, 1.0), rand(0.65, 1.0)
    shift_start = torch.stack([rand(-0.3, 0.3), rand(-0.3, 0.3)], dim=1)
    shift_end = torch.stack([rand(-0.3, 0.3), rand(-0.3, 0.3)], dim=1)
    clips = []
    for f in range(frames):
        a = f / (frames - 1)
        zoom = scale_start * (1 - a) + scale_end * a
        shift = shift_start * (1 - a) + shift_end * a
        theta = torch.zeros(batch, 2, 3, device=device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / zoom
        theta[:, :, 2] = -shift / zoom[:, None]
        grid = F.affine_grid(theta, list(items.shape), align_corners=False)
        clips.append(F.grid_sample(items + 1.0, grid, align_corners=False, padding_mode="zeros") - 1.0)
    return torch.stack(clips, dim=2)

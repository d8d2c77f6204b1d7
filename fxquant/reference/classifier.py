"""The Fashion-MNIST classifier behind the quality harness's text alignment and FD-FMNIST.

Text alignment = accuracy of the prompt's class on generated images. FD-FMNIST = Fréchet distance between the
classifier's penultimate features (FEATURE_DIM) of generated images and of the real test split (statistics
committed with the weights). It is our own classifier's distance, never FID.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

WEIGHTS_DIR = Path(__file__).parent / "weights"
CLASSIFIER_FILE = WEIGHTS_DIR / "classifier.safetensors"
TEST_STATS_FILE = WEIGHTS_DIR / "classifier-test-features.safetensors"
FEATURE_DIM = 128


class FashionClassifier(nn.Module):
    """Images [N, 1, 32, 32] in [-1, 1] -> logits [N, 10]; `features` gives the penultimate layer [N, 128]."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(128, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def load_classifier(device: str | torch.device = "cpu") -> FashionClassifier:
    """The committed classifier in eval mode."""
    if not CLASSIFIER_FILE.exists():
        raise FileNotFoundError(f"{CLASSIFIER_FILE} missing: run benchmarks/reference/train_classifier.py")
    model = FashionClassifier()
    model.load_state_dict(load_file(str(CLASSIFIER_FILE)))
    return model.eval().to(device)


def load_test_feature_stats() -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [128], covariance [128, 128]) of the classifier's features on the real test split (float64)."""
    stats = load_file(str(TEST_STATS_FILE))
    return stats["mean"].double(), stats["cov"].double()


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features = features.double()
    return features.mean(dim=0), torch.cov(features.T)


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mean_a, cov_a, mean_b, cov_b) -> float:
    """||mu_a - mu_b||^2 + tr(A + B - 2 (A^1/2 B A^1/2)^1/2) for Gaussians fitted to two feature sets."""
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    return ((mean_a - mean_b).pow(2).sum() + torch.trace(cov_a + cov_b - 2 * cross)).item()


@torch.no_grad()
def classify(model: FashionClassifier, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels [N], features [N, 128]) of images [N, 1, 32, 32] in [-1, 1]."""
    device = next(model.parameters()).device
    labels, features = [], []
    for start in range(0, images.shape[0], batch):
        chunk = images[start:start + batch].to(device, torch.float32)
        feats = model.features(chunk)
        labels.append(model.head(feats).argmax(dim=1).cpu())
        features.append(feats.cpu())
    return torch.cat(labels), torch.cat(features)

"""Train the Fashion-MNIST classifier of the quality harness (train split only) and commit its weights.

    python benchmarks/reference/train_classifier.py [--epochs 6] [--device cpu]

Half of every batch is augmented the way video clips move items (random zoom 0.65-1 and shift), so frames of
the video reference model are classified too. Writes fxquant/reference/weights/classifier.safetensors, the
test-split feature statistics for FD-FMNIST, and benchmarks/results/classifier.json (test accuracy).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fxquant.reference.classifier import CLASSIFIER_FILE, TEST_STATS_FILE, FashionClassifier, classify, feature_stats
from fxquant.reference.data import load_fashion_mnist, moving_clips


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    model = FashionClassifier().to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = args.epochs * (len(images) // args.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for i in range(len(images) // args.batch):
            index = order[i * args.batch:(i + 1) * args.batch]
            batch, target = images[index], labels[index]
            half = args.batch // 2
            frames = moving_clips(batch[:half], generator, frames=2)[:, :, torch.randint(2, (1,)).item()]
            batch = torch.cat([frames, batch[half:]]).to(args.device)
            loss = F.cross_entropy(model(batch), target.to(args.device), label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        predicted, _ = classify(model, test_images)
        accuracy = (predicted == test_labels).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {accuracy:.4f}, {time.time() - start:.0f}s",
              flush=True)
    model = model.cpu().eval()
    _, features = classify(model, test_images)
    mean, cov = feature_stats(features)
    CLASSIFIER_FILE.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(CLASSIFIER_FILE))
    save_file({"mean": mean.float(), "cov": cov.float()}, str(TEST_STATS_FILE))
    clip_predicted, _ = classify(model, moving_clips(test_images, torch.Generator().manual_seed(1))[:, :, 3])
    result = {"test_accuracy": accuracy, "moving_frame_test_accuracy": (clip_predicted == test_labels).float().mean().item(),
              "epochs": args.epochs, "seconds": time.time() - start, "train_images": len(images)}
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/classifier.json").write_text(json.dumps(result, indent=2) + "\n")
    print(result)


if __name__ == "__main__":
    main()

"""Plot the training loss curves written by train.py next to each committed reference model.

    python benchmarks/reference/plot_losses.py [--logs benchmarks/results/reference]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fxquant.reference.pipeline import REFERENCE_DIR, REFERENCE_MODELS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logs", default="benchmarks/results/reference")
    args = parser.parse_args()
    for name in REFERENCE_MODELS:
        log = json.loads((Path(args.logs) / f"{name}-loss.json").read_text())
        steps, losses = zip(*log["loss"])
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot(steps, losses, lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("flow-matching MSE")
        ax.set_title(f"{name}: {log['params'] / 1e6:.1f} M params, batch {log['batch']}, {log['steps']} steps")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(REFERENCE_DIR / name / "loss.png")
        plt.close(fig)
        print(REFERENCE_DIR / name / "loss.png")


if __name__ == "__main__":
    main()

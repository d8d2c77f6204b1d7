"""The quality harness with the quantized denoiser on ONNX Runtime next to the same recipes in torch (CPU).

    python benchmarks/onnx_quality.py --samples 100 --out benchmarks/results/onnx-quality

Same prompts, seeds and noise for every row; the ONNX rows export each quantized denoiser (per-token activations,
one static-shape graph per batch shape) and generate with it end to end. Writes <model>.json / .md per runner.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fxquant.quality import evaluate, format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["t2i-dit", "fewstep-unet"])
    parser.add_argument("--recipes", nargs="+", default=["w8a8", "w8a8-static"])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results/onnx-quality")
    args = parser.parse_args()
    reports = []
    for model in args.models:
        for runner in ("torch", "onnx"):
            reports.append(evaluate(model, args.recipes, samples=args.samples, batch=args.samples,
                                    out_dir=Path(args.out) / runner, runner=runner))
    table = format_table(reports)
    Path(args.out, "quality.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()

"""`fxquant demo`: quantize the built-in default model with each recipe and compare it with full precision.

The default model is the t2i-dit reference pipeline shipped with fxquant: a PixArt transformer trained on real
Fashion-MNIST images, conditioned on MiniLM caption embeddings. The demo runs the quality harness on a few
prompts (same noise for full precision and quantized) and prints and writes the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .quality import evaluate, format_table

DEMO_MODEL = "t2i-dit"
DEMO_RECIPES = ("w8a8", "w8a8-static")


def run_demo(recipes=DEMO_RECIPES, out_dir: str | Path = "fxquant-demo", samples: int = 20, calibration: int = 16,
             seed: int = 0, echo=print) -> dict[str, Any]:
    """Quantize the default model with each recipe; print the comparison table, write demo.json and grids."""
    out = Path(out_dir)
    report = evaluate(DEMO_MODEL, list(recipes), samples=samples, seed=seed, out_dir=out, calibration=calibration,
                      echo=echo)
    (out / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    echo("\n" + format_table([report]))
    echo(f"\nwritten: {out / 'demo.json'}, image grids {out}/{DEMO_MODEL}-<recipe>.png (full precision over quantized)")
    return report

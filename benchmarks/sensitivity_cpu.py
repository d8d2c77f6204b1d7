"""How long sensitivity probing takes on this CPU (2 threads) for the t2i reference model, and what it chose.

    python benchmarks/sensitivity_cpu.py --out benchmarks/results/sensitivity-cpu.json

Quantizes the t2i-dit reference denoiser through its pipeline (32 calibration prompts, 20 steps, guidance 3) with
viditq-w4a8-mp (block x layer group x timestep group probes) and mixdq-w4a8-mp (per-layer probes); records the
probing + integer-programming seconds (plan.sensitivity_seconds), the number of probed units, the resulting
bits and the per-group damage table. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter
from pathlib import Path

import torch

import fxquant
from fxquant.quality import calibration_prompts
from fxquant.reference.pipeline import REFERENCE_MODELS, load_reference_pipeline


def probe(recipe: str) -> dict:
    pipe = load_reference_pipeline("t2i-dit")
    steps, guidance = REFERENCE_MODELS["t2i-dit"]
    start = time.perf_counter()
    fxquant.quantize_pipeline(pipe, recipe, calibration_prompts(), num_inference_steps=steps, batch_size=16,
                              guidance_scale=guidance)
    plan = pipe.transformer.plan
    layers = [layer for layer in plan.quantized_layers() if layer.sensitivity]
    result = {"recipe": recipe, "sensitivity_seconds": plan.sensitivity_seconds,
              "quantize_seconds": time.perf_counter() - start, "probed_layers": len(layers),
              "probes": sum(len(layer.sensitivity) for layer in layers),
              "quantized_weight_bits": plan.quantized_average_weight_bits,
              "bits_by_group": {group: dict(Counter(l.weight_bits for l in layers if l.group == group))
                                for group in sorted({l.group for l in layers})},
              "layers": {l.fqn: {"bits": l.weight_bits, "group_bits": l.group_weight_bits,
                                 "metric": l.sensitivity_metric, "damage": l.sensitivity} for l in layers}}
    print(f"{recipe}: sensitivity {plan.sensitivity_seconds:.0f} s, bits {result['bits_by_group']}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["viditq-w4a8-mp", "mixdq-w4a8-mp"])
    parser.add_argument("--out", default="benchmarks/results/sensitivity-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = [probe(recipe) for recipe in args.recipes]
    report = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
              "threads": 2, "torch": torch.__version__, "model": "t2i-dit", "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

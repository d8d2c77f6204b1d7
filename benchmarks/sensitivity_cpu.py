"""How long sensitivity probing takes on this CPU (2 threads) on a reference model, what it chose, and the bytes.

    python benchmarks/sensitivity_cpu.py --out benchmarks/results/sensitivity-cpu.json
    python benchmarks/sensitivity_cpu.py --model fewstep-unet --recipes mixdq-w4a8-mp \
        --out benchmarks/results/sensitivity-cpu-fewstep-unet.json

Quantizes the reference denoiser (t2i-dit by default) through its pipeline (32 calibration prompts, its steps and
guidance) with viditq-w4a8-mp (block x layer group x timestep group probes) and mixdq-w4a8-mp (per-layer probes);
records the probing + integer-programming seconds (plan.sensitivity_seconds), the resulting bits, the per-layer
damage table and the bytes of the quantized layers against bf16. Timings are reported, never asserted.
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


def probe(model: str, recipe: str) -> dict:
    pipe = load_reference_pipeline(model)
    steps, guidance = REFERENCE_MODELS[model]
    start = time.perf_counter()
    fxquant.quantize_pipeline(pipe, recipe, calibration_prompts(), num_inference_steps=steps, batch_size=16,
                              guidance_scale=guidance)
    qmodel = pipe.denoiser
    plan = qmodel.plan
    stored, bf16 = qmodel.quantized_weight_bytes()
    layers = [layer for layer in plan.quantized_layers() if layer.sensitivity]
    result = {"recipe": recipe, "sensitivity_seconds": plan.sensitivity_seconds,
              "quantize_seconds": time.perf_counter() - start, "probed_layers": len(layers),
              "probes": sum(len(layer.sensitivity) for layer in layers),
              "quantized_weight_bits": plan.quantized_average_weight_bits,
              "quantized_layer_bytes": stored, "same_layers_bf16_bytes": bf16, "bytes_vs_bf16": stored / bf16,
              "bits_by_group": {group: dict(Counter(l.weight_bits for l in layers if l.group == group))
                                for group in sorted({l.group for l in layers})},
              "layers": {l.fqn: {"bits": l.weight_bits, "group_bits": l.group_weight_bits,
                                 "metric": l.sensitivity_metric, "damage": l.sensitivity} for l in layers}}
    print(f"{model} {recipe}: sensitivity {plan.sensitivity_seconds:.0f} s, bits {result['bits_by_group']}, "
          f"bytes {stored / bf16:.3f}x bf16", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="t2i-dit", choices=sorted(REFERENCE_MODELS))
    parser.add_argument("--recipes", nargs="+", default=["viditq-w4a8-mp", "mixdq-w4a8-mp"])
    parser.add_argument("--out", default="benchmarks/results/sensitivity-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = [probe(args.model, recipe) for recipe in args.recipes]
    report = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
              "threads": 2, "torch": torch.__version__, "model": args.model, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

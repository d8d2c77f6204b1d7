"""W8A8 accuracy and storage on tiny random-init configs of the seven diffusers families (CPU).

    python benchmarks/families.py [--out benchmarks/results/families-cpu.json]

For each family and recipe: relative L2 error of the output against full precision on held-out inputs (and at a
second resolution / batch), quantized / total weighted layers, and bytes of the quantized layers against bf16.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fxquant  # noqa: E402
from families import FAMILIES  # noqa: E402
from fxquant.metrics import relative_l2  # noqa: E402


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/families-cpu.json")
    args = parser.parse_args()
    rows = []
    for name, family in FAMILIES.items():
        for recipe in ("w8a8", "w8a8-static"):
            model = family.build()
            reference = copy.deepcopy(model)
            start = time.perf_counter()
            qmodel = fxquant.quantize(model, recipe, [family.inputs(seed=s) for s in range(2)])
            seconds = time.perf_counter() - start
            held_out = family.inputs(seed=7)
            second = family.inputs(batch=3, size=family.second_size, seed=11)
            stored, bf16 = qmodel.quantized_weight_bytes()
            rows.append({
                "family": name, "model_class": type(reference).__name__, "recipe": recipe,
                "rel_l2": relative_l2(_out(qmodel, held_out), _out(reference, held_out)),
                "rel_l2_second_resolution": relative_l2(_out(qmodel, second), _out(reference, second)),
                "quantized_layers": len(qmodel.plan.quantized_layers()),
                "weighted_layers": len(qmodel.plan.weighted_layers()),
                "quantized_bytes_over_bf16": stored / bf16, "quantize_seconds": seconds,
            })
            print(f"{name:10s} {recipe:12s} rel L2 {rows[-1]['rel_l2']:.4f}", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "machine": platform.machine(),
              "note": "tiny random-init configs from tests/families.py; bytes ratio of tiny widths includes "
                      "per-channel scale overhead", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| family | recipe | rel. L2 vs fp | rel. L2, 2nd resolution | quantized layers |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model_class']} | {r['recipe']} | {r['rel_l2']:.4f} | {r['rel_l2_second_resolution']:.4f} | "
              f"{r['quantized_layers']}/{r['weighted_layers']} |")


if __name__ == "__main__":
    main()

"""GPU check of the default compile path on the tiny families: nested blocks, plain and under CUDA graphs, with and
without timestep-group plans; compiled output against the eager quantized model's, call by call.

    python benchmarks/nested_default_probe.py --out probe.json

Cases: PixArt with R (session 19's fastest recipe; also under mode="max-autotune") and R + timestep_groups=[500] (calls alternating t = 100 / 900,
so each call picks the other group's scales), the UNet with R + static_conv_activations, viditq-w4a8-mp (weight
bits per timestep group) nested, flat and under mode="reduce-overhead". Also counts CUDA-graph skips and graph
breaks. Needs CUDA; the JSON is rewritten after every case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from families import FAMILIES, inputs_at_timesteps  # noqa: E402

import fxquant  # noqa: E402
from fxquant.metrics import relative_l2  # noqa: E402

R = ("w8a8-fp8:static_hidden_activations=true,keep_condition_layers=false,attention=fp8-static,"
     "static_attention_outputs=true")
DEPTH = {"pixart": dict(num_layers=4), "unet": {}}
GROUP_TIMESTEPS = [100, 900]
CASES = [  # (family, recipe, timestep groups exercised, torch.compile mode, flat graph)
    ("pixart", R, False, "reduce-overhead", False),
    ("pixart", R, False, "max-autotune", False),
    ("pixart", R + ",timestep_groups=[500]", True, None, False),
    ("pixart", R + ",timestep_groups=[500]", True, "reduce-overhead", False),
    ("unet", R + ",static_conv_activations=true", False, "reduce-overhead", False),
    ("pixart", "viditq-w4a8-mp:sensitivity_calls=2", True, None, False),
    ("pixart", "viditq-w4a8-mp:sensitivity_calls=2", True, None, True),
    ("pixart", "viditq-w4a8-mp:sensitivity_calls=2", True, "reduce-overhead", False),
]


def _cuda(inputs: dict) -> dict:
    return {k: (v.to("cuda", torch.bfloat16) if v.is_floating_point() else v.to("cuda")) if torch.is_tensor(v) else v
            for k, v in inputs.items()}


def _at(inputs: dict, t: int) -> dict:
    return {**inputs, "timestep": torch.full_like(inputs["timestep"], t)}


def probe(name: str, recipe: str, groups: bool, mode: str | None, flat: bool) -> dict:
    """{seconds: compile + calls, rel_l2_vs_eager per call, groups_differ, cudagraph_skips, graph_breaks}."""
    family = FAMILIES[name]
    calibration = inputs_at_timesteps(family, GROUP_TIMESTEPS * 2) if groups else \
        [family.inputs(batch=2, seed=seed) for seed in range(2)]
    qmodel = fxquant.quantize(family.build(**DEPTH[name]).to("cuda", torch.bfloat16), recipe,
                              [_cuda(call) for call in calibration])
    if flat:
        qmodel.nest_blocks(False)
    base = _cuda(family.inputs(batch=2, seed=5))
    calls = [_at(base, t) for t in GROUP_TIMESTEPS * 2] if groups else [base] * 3
    with torch.no_grad():
        eager = [qmodel(**call, return_dict=False)[0].float() for call in calls]
    torch._dynamo.reset()
    counters.clear()
    start = time.time()
    compiled = torch.compile(qmodel, backend="fxquant", mode=mode)
    with torch.no_grad():  # clone: CUDA-graph trees reuse their output buffers
        outputs = [compiled(**call, return_dict=False)[0].float().clone() for call in calls]
    return {"seconds": time.time() - start,
            "rel_l2_vs_eager": [relative_l2(out, ref) for out, ref in zip(outputs, eager)],
            "groups_differ": relative_l2(eager[0], eager[1]) if groups else None,
            "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0),
            "graph_breaks": sum(counters["graph_break"].values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", nargs="+", type=int, default=range(len(CASES)), help="indices into CASES")
    args = parser.parse_args()
    results = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    for name, recipe, groups, mode, flat in (CASES[i] for i in args.cases):
        key = f"{name} {recipe} mode {mode}{' flat' if flat else ''}"
        try:
            results[key] = probe(name, recipe, groups, mode, flat)
        except Exception as err:  # a failing case is a result
            traceback.print_exc()
            results[key] = f"{type(err).__name__}: {err}"[:800]
        print(key, results[key], flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

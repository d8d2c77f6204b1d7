"""How far the CUDA lowering of a quantized model moves its output from eager, measured on the CPU.

    TRITON_INTERPRET=1 python benchmarks/lowered_vs_eager_cpu.py --out benchmarks/results/lowered-vs-eager-cpu.json

For each tiny family (tests/families.py) and recipe: the repeated blocks are compiled with a backend that applies the
fxquant rewrites and `lower_to_inductor` (the functions Inductor would trace: fxquant's Triton kernels, run here in
the interpreter) and runs the graph as it is; the output is compared with the eager quantized model's (relative L2,
same inputs). Per-layer rows compare each quantized conv lowered alone against its eager module on the input the
model gave it, which separates a layer's own error from the whole model's amplification of small differences.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from families import FAMILIES  # noqa: E402

import fxquant  # noqa: E402
from fxquant.backends.triton import backend  # noqa: E402
from fxquant.metrics import relative_l2  # noqa: E402
from fxquant.model import repeated_blocks  # noqa: E402
from fxquant.modules import QuantConv2d  # noqa: E402

CASES = [("unet", "w8a8"), ("unet", "w8a8:static_conv_activations=true"), ("unet", "w8a8-fp8"),
         ("unet", "w8a8-fp8:static_conv_activations=true"), ("pixart", "w8a8"), ("pixart", "w8a8-fp8"),
         ("pixart", "w8a8-fp8:static_hidden_activations=true,attention=fp8-static,static_attention_outputs=true")]


def lowering_backend(gm, example_inputs):
    """The fxquant backend's rewrites, then its CUDA lowering, run as plain Python (no Inductor)."""
    backend.fxquant_backend(gm, example_inputs)
    backend.lower_to_inductor(gm, fuse_quantize=False, inline_kernels=True)
    return gm.forward


def lowered(module: torch.nn.Module, *args, **kwargs):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(module, backend=lowering_backend)(*args, **kwargs)


def case(name: str, recipe: str) -> dict:
    """{model: lowered vs eager rel. L2, conv_layers: {fqn: the same per quantized conv}}."""
    family = FAMILIES[name]
    qmodel = fxquant.quantize(family.build(), recipe, [family.inputs(batch=2, seed=seed) for seed in range(2)])
    inputs = family.inputs(batch=2, seed=4)
    conv_calls = {}

    def record(fqn: str):
        def hook(module, args, out) -> None:
            conv_calls.setdefault(fqn, (module, args[0], out))
        return hook

    hooks = [module.register_forward_hook(record(fqn))
             for fqn, module in qmodel.model.named_modules() if isinstance(module, QuantConv2d)]
    with torch.no_grad():
        eager = qmodel(**inputs, return_dict=False)[0]
    for hook in hooks:
        hook.remove()
    conv_layers = {fqn: relative_l2(lowered(module, x), out) for fqn, (module, x, out) in conv_calls.items()}
    torch._dynamo.reset()
    qmodel.nest_blocks(False)  # each block compiled alone, as compile_blocks does
    for fqn in repeated_blocks(qmodel.model):
        qmodel.model.get_submodule(fqn).compile(backend=lowering_backend)
    with torch.no_grad():
        out = qmodel(**inputs, return_dict=False)[0]
    return {"model": relative_l2(out, eager), "conv_layers_max": max(conv_layers.values(), default=None),
            "conv_layers": conv_layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (fxquant's kernels run in Triton's interpreter on the CPU)")
    results = {"torch": torch.__version__, "cases": {}}
    for name, recipe in CASES:
        row = case(name, recipe)
        results["cases"][f"{name} {recipe}"] = row
        print(name, recipe, {key: value for key, value in row.items() if key != "conv_layers"}, flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

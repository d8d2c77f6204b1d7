"""What Inductor would get from the compile backend, counted on the CPU (no GPU): fxquant's kernels and every other op.

    python benchmarks/traced_graph_census.py --family pixart --recipe w8a8-fp8 --out census.json

A tiny family (tests/families.py) is quantized with the recipe and compiled flat with a backend that applies the
fxquant rewrites and the CUDA lowering (`lower_to_inductor`), then traces the result the way Inductor's AOT step does
(aten graph, traced Triton launches as `triton_kernel_wrapper_functional`; Triton's TTIR analysis compiles for an
sm_90 target through tests/backends/inductor_access.py's stand-in driver). In place of Inductor a census: launches
per kernel and the other aten ops, with the source line of each op that computes (a copy, a pointwise or reduction
pass Inductor would run as kernels of its own). The traced graphs are not run (their outputs are zeros of the right
shapes), so a model split by graph breaks is still counted whole.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch
import triton
from functorch.compile import aot_module_simplified
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "backends"))
from families import FAMILIES  # noqa: E402
from inductor_access import Sm90Driver  # noqa: E402

import fxquant  # noqa: E402
from fxquant.backends.triton import backend  # noqa: E402

# ops that only relabel memory (or make an output buffer): not work Inductor schedules as kernels of their own
LAYOUT_OPS = {"aten.view.default", "aten._unsafe_view.default", "aten.transpose.int", "aten.permute.default",
              "aten.select.int", "aten.slice.Tensor", "aten.unsqueeze.default", "aten.squeeze.dim",
              "aten.expand.default", "aten.split.Tensor", "aten.t.default", "aten.view.dtype", "aten.detach.default",
              "aten.empty.memory_format", "aten.new_empty.default", "<built-in function getitem>"}


def census(family: str, recipe: str) -> dict:
    """{"kernels": {name: launches}, "specializations": {name: distinct constexpr sets (each one Triton compile)},
    "ops": {aten op: count}, "computing_ops": [(op, source line)]}."""
    kernels, ops, computing = collections.Counter(), collections.Counter(), []
    specializations = collections.defaultdict(set)

    def count(gm: torch.fx.GraphModule, example_inputs):
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if "triton_kernel_wrapper" in str(node.target):
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                kernels[kernel.fn.__name__] += 1
                arguments = {**kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"]),
                             **node.kwargs["kwargs"]}  # (after AOT the constexprs are among the kwargs)
                jit = kernel if hasattr(kernel, "constexprs") else kernel.fn  # (an autotuner wraps the kernel)
                constexpr_names = {jit.arg_names[index] for index in jit.constexprs}
                specializations[kernel.fn.__name__].add(tuple(sorted(
                    (name, repr(value)) for name, value in arguments.items() if name in constexpr_names)))
                continue
            ops[str(node.target)] += 1
            if str(node.target) not in LAYOUT_OPS:
                frames = [line.strip() for line in (node.meta.get("stack_trace") or "").splitlines()
                          if line.strip().startswith("File")]
                computing.append((str(node.target), frames[-1] if frames else ""))
        outputs = [value.meta["val"] if isinstance(value, torch.fx.Node) else value
                   for value in next(n for n in gm.graph.nodes if n.op == "output").args[0]]

        def zeros(args):
            return [torch.zeros(v.shape, dtype=v.dtype).as_strided(v.shape, v.stride())
                    if isinstance(v, torch.Tensor) else v for v in outputs]
        zeros._boxed_call = True
        return zeros

    def census_backend(gm: torch.fx.GraphModule, example_inputs):
        backend.fxquant_backend(gm, example_inputs)  # the rewrites (the CPU stops before lowering)
        backend.lower_to_inductor(gm, fuse_quantize=False, inline_kernels=True)
        return aot_module_simplified(gm, example_inputs, fw_compiler=count)

    spec = FAMILIES[family]
    qmodel = fxquant.quantize(spec.build(), recipe, [spec.inputs(batch=2, seed=seed) for seed in range(2)])
    qmodel.nest_blocks(False)
    torch._dynamo.reset()
    triton.runtime.driver.set_active(Sm90Driver())
    with torch.no_grad():
        torch.compile(qmodel, backend=census_backend)(**spec.inputs(batch=2, seed=4))
    return {"family": family, "recipe": recipe, "kernels": dict(kernels.most_common()),
            "specializations": {name: len(sets) for name, sets in specializations.items()},
            "ops": dict(ops.most_common()), "computing_ops": [f"{op} | {where}" for op, where in computing]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="pixart", choices=sorted(FAMILIES))
    parser.add_argument("--recipe", default="w8a8-fp8")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the census traces the GPU launches, which the interpreter runs instead")
    result = census(args.family, args.recipe)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps({key: result[key] for key in ("kernels", "specializations", "ops")}, indent=1))


if __name__ == "__main__":
    main()

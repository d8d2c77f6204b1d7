"""`torch.compile(qmodel, backend="fxquant")`, registered through the torch_dynamo_backends entry point.

Dynamo hands over the graph of the quantized model, in which every quantized layer is a chain of fxquant ops.
On CUDA the graph goes to Inductor (which keeps fxquant ops as opaque calls and fuses everything around them); on
the CPU the reference ops run as traced, with no Inductor compile. `compile_counter` counts graphs compiled, so
tests can check that a model compiles once and never again per step.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx

compile_counter: Counter = Counter()


def _on_cuda(example_inputs) -> bool:
    return any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)


def fxquant_backend(gm: fx.GraphModule, example_inputs, **kwargs):
    """Dynamo backend: graph module + example inputs -> a callable."""
    compile_counter["graphs"] += 1
    fxquant_nodes = sum(
        1 for node in gm.graph.nodes if node.op == "call_function" and "fxquant" in str(node.target)
    )
    compile_counter["fxquant_ops"] += fxquant_nodes
    if _on_cuda(example_inputs):
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
    return gm.forward

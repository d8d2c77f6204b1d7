"""One run of torch's Triton access analysis per kernel specialization, not per traced launch.

For every `wrap_triton` launch in a graph torch works out which pointer arguments the kernel writes (Inductor copies
those before launching) by compiling the kernel to TTIR and walking the IR: in AOT's metadata and tracing passes,
Inductor's lowering and its post-grad passes, so several times per launch at ~25-50 ms each. A 28-block DiT compiled
whole traces several hundred launches of a dozen or two distinct specializations. torch's TTIR generation replaces
every tensor argument by an empty tensor of its dtype and every symbolic size by 2, so the answer depends only on the
kernel, the tensors' dtypes and the other arguments' values: memoized on exactly that key, it is unchanged.

`memoize_access_analysis()` wraps torch's entry points (`identify_accessed_tensors` from torch 2.12,
`identify_mutated_tensors` before) once per process; arguments it cannot key (a TMA descriptor, an unknown type)
go to torch's analysis unmemoized. Dynamo wraps every launch given num_warps / num_stages (all of fxquant's traced
launches) in an autotuner of its own, so a kernel is keyed by its JIT function and configs, not by its identity.
"""

from __future__ import annotations

import functools

import sympy
import torch

_ENTRY_POINTS = ("identify_accessed_tensors", "identify_mutated_tensors")
_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)
_PLAIN = (type(None), bool, int, float, str, torch.dtype)


def _argument_key(value):
    """What torch's TTIR generation keeps of one kernel argument; raises for what is not keyed."""
    from torch._inductor.ir import IRNode

    if isinstance(value, torch.Tensor):
        return "tensor", value.dtype
    if isinstance(value, IRNode):  # (Inductor's lowering; the class too, as torch tells TensorBoxes from other nodes)
        return type(value).__name__, value.get_dtype()
    if isinstance(value, _SYMBOLIC):
        return ("symbolic",)
    if isinstance(value, _PLAIN):
        return type(value).__name__, value
    raise TypeError(type(value))


def analysis_key(kernel, kwargs: dict, *args, **options) -> tuple | None:
    """(kernel, its arguments as the analysis sees them) for the analysis' arguments (kernel, kwargs,
    tma_descriptor_metadata), or None where that cannot be keyed exactly."""
    tma_descriptor_metadata = args[0] if args else options.get("tma_descriptor_metadata")
    if tma_descriptor_metadata or len(args) > 1 or set(options) - {"tma_descriptor_metadata"}:
        return None
    try:
        arguments = tuple(sorted((name, _argument_key(value)) for name, value in kwargs.items()))
        return _kernel_key(kernel), arguments
    except Exception:  # (an argument or config that cannot be keyed, e.g. an IR node without a dtype: unmemoized)
        return None


def _kernel_key(kernel) -> tuple:
    """A JIT function by identity; an autotuner (Dynamo wraps each launch that passes num_warps / num_stages in a new
    one-config autotuner) by the function it tunes and its configs."""
    if not hasattr(kernel, "configs"):
        return (id(kernel),)
    configs = tuple(tuple(sorted(config.all_kwargs().items())) for config in kernel.configs)
    hash(configs)  # (TypeError for an unhashable value)
    return (*_kernel_key(kernel.fn), configs)


def _memoized(analyse):
    results: dict = {}  # key -> (kernel, result): the kernel is kept alive, so no id in the key is reused

    @functools.wraps(analyse)
    def memoized(kernel, kwargs, *args, **options):
        key = analysis_key(kernel, kwargs, *args, **options)
        if key is None:
            return analyse(kernel, kwargs, *args, **options)
        if key not in results:
            results[key] = kernel, analyse(kernel, kwargs, *args, **options)
        result = results[key][1]
        return list(result) if isinstance(result, list) else result  # (callers may extend a list of names)

    memoized.fxquant_results = results
    return memoized


def memoize_access_analysis() -> None:
    """Wrap torch's Triton access analysis with the memo (idempotent; callers look it up in its module per call)."""
    from torch._higher_order_ops import triton_kernel_wrap

    for name in _ENTRY_POINTS:
        analyse = getattr(triton_kernel_wrap, name, None)
        if analyse is not None and not hasattr(analyse, "fxquant_results"):
            setattr(triton_kernel_wrap, name, _memoized(analyse))

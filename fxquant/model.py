"""PreparedModel and QuantizedModel: modules callable exactly like the model they wrap.

Both forward every call to the wrapped model and every unknown attribute too (`.config`, `.dtype`, ...), so a
diffusers pipeline accepts them in place of its transformer / unet.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import attention, runtime_class
from .capture import bind_arguments, capture
from .errors import CalibrationError
from .modules import QUANT_MODULES
from .plan import QuantPlan
from .state import QuantState
from .timestep import TimestepGroup, group_index, timestep_scale

MAX_BLOCK_VARIANTS = 256  # distinct subgraphs torch may cache per nested block class


class _Wrapper(nn.Module):
    """Holds `self.model` and answers attribute look-ups the wrapper does not know from it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)


class PreparedModel(_Wrapper):
    """The model with observers attached. Call it like the model to calibrate; then `fxquant.convert(it)`.

    The graph is captured on the first call (or at prepare time when example inputs were given); observers are
    attached to the layers the plan quantizes. Calibration runs in full precision: outputs are the model's own.
    """

    def __init__(self, model: nn.Module, state: QuantState, prepare_passes):
        super().__init__(model)
        self._state = state
        self._prepare_passes = prepare_passes
        self._converted = False

    @property
    def plan(self) -> QuantPlan | None:
        return self._state.plan

    def capture_and_prepare(self, kwargs: dict[str, Any]) -> None:
        """Capture the graph from one call's inputs and run the prepare passes."""
        self._state.captured = capture(self.model, kwargs)
        self._prepare_passes(self._state)

    def forward(self, *args, **kwargs):
        if self._state.rendering:  # a sensitivity probe generating samples: the model as it is, nothing recorded
            with torch.no_grad():
                return self.model(*args, **kwargs)
        if self._converted:
            raise CalibrationError(
                "This prepared model has been converted; its layers now hold quantized weights. Use the QuantizedModel "
                "that fxquant.convert returned."
            )
        if self._state.captured is None:
            self.capture_and_prepare(bind_arguments(self.model, args, kwargs))
        plan = self._state.plan
        if plan.timestep_boundaries:
            t = _timestep_argument(plan, args, kwargs)
            if plan.calibration_calls == 0:
                plan.timestep_scale = timestep_scale(t)
            boundaries = torch.tensor(plan.timestep_boundaries)
            self._state.timestep_group = int(group_index(t, boundaries, plan.timestep_scale))
        config = self._state.config
        if config.mixed_precision and len(self._state.recorded_calls) < config.sensitivity_calls:
            inputs = torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, (args, kwargs))
            self._state.recorded_calls.append((*inputs, self._state.timestep_group))
        with torch.no_grad():
            out = self.model(*args, **kwargs)
        self._state.plan.calibration_calls += 1
        return out


class QuantizedModel(_Wrapper):
    """The converted model: its quantized layers hold packed int8 / int4 / int2 / fp8 weights and run fxquant ops;
    attention layers the plan quantizes run fxquant::quantized_attention (fxquant.attention).

    `plan` holds every decision. Call it like the original model; `torch.compile(qmodel, backend="fxquant")`
    compiles everything around fxquant's ops (Triton kernels on CUDA, reference ops on the CPU), with the repeated
    blocks as nested regions (`nest_blocks`, on from the start where the model has repeated blocks).
    """

    def __init__(self, model: nn.Module, plan: QuantPlan):
        super().__init__(model)
        self.plan = plan
        attention.install(model, plan)
        self._timestep = TimestepGroup() if plan.timestep_boundaries else None
        if self._timestep is not None:
            device = next(model.buffers()).device
            self.register_buffer("timestep_boundaries", torch.tensor(plan.timestep_boundaries, device=device))
            self.register_buffer("timestep_index", torch.zeros(1, dtype=torch.long, device=device), persistent=False)
            for module in model.modules():
                if isinstance(module, QUANT_MODULES) or hasattr(module, attention.OPERAND_SCALES):
                    module._timestep = self._timestep
        if repeated_blocks(model):
            set_nested_blocks(model, True)

    def forward(self, *args, **kwargs):
        if self._timestep is not None:  # the group's static scales / weight planes are picked on the device; the
            # index lives in a buffer, which nested blocks can take in (a tensor made outside them has no source)
            t = _timestep_argument(self.plan, args, kwargs)
            self.timestep_index.copy_(group_index(t, self.timestep_boundaries, self.plan.timestep_scale))
            self._timestep.index = self.timestep_index  # (each call: .to() replaces the buffer)
        return self.model(*args, **kwargs)

    def compile_blocks(self, **compile_kwargs) -> list[str]:
        """Regional compilation: `torch.compile(block, backend="fxquant", **compile_kwargs)` in place for every block
        of the model's repeated blocks (`repeated_blocks`); the rest of the model runs eagerly. Identical blocks share
        one compiled graph, so a 28-block DiT compiles about one block's worth instead of 28 (blocks that differ,
        e.g. in their bit-widths, compile once per variant: torch._dynamo's recompile limit is raised to the number
        of blocks). Undoes `nest_blocks`. Returns the names of the compiled blocks."""
        if "backend" in compile_kwargs:
            raise ValueError("compile_blocks always compiles with backend=\"fxquant\"; pass only torch.compile's "
                             "other arguments (mode, options, dynamic, fullgraph)")
        set_nested_blocks(self.model, False)
        return compile_repeated_blocks(self.model, backend="fxquant", **compile_kwargs)

    def nest_blocks(self, nested: bool = True) -> list[str]:
        """Hierarchical compilation of the whole model, on from the start where the model has repeated blocks: makes
        the forward of every repeated block (`repeated_blocks`) a torch.compiler.nested_compile_region, so that
        `torch.compile(qmodel, backend="fxquant")` traces one graph in which identical blocks call one shared
        subgraph; the backend rewrites it and Inductor compiles it once (PixArt-alpha 1024 on an H100: first call 37 s
        instead of 137-200 s flat). Eager calls and torch.export (ONNX) are unchanged; nested=False undoes it (a flat
        whole-model graph). Returns the blocks' names. A block's arguments that alias each other and its outputs that
        are views or inputs are copied (`_unaliased_inputs`, `_unaliased`): torch's nested regions refuse aliasing,
        and Inductor miscompiles regions that return views."""
        return set_nested_blocks(self.model, nested)

    def quantized_weight_bytes(self) -> tuple[int, int]:
        """(bytes of the quantized layers as stored: packed weights, scales, biases; the same layers in bf16)."""
        stored = bf16 = 0
        for layer in self.plan.quantized_layers():
            module = self.model.get_submodule(layer.fqn)
            stored += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
            bias = getattr(module, "bias", None)
            bf16 += 2 * (layer.num_params + (bias.numel() if bias is not None else 0))
        return stored, bf16


def repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the members of the outermost nn.ModuleLists whose two or more members share one class (a DiT's
    transformer blocks; a UNet's resnets and attention blocks inside its differing down / up blocks)."""
    names = []

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            path = f"{prefix}{child_name}"
            if isinstance(child, nn.ModuleList) and len(child) > 1 and len({type(m) for m in child}) == 1:
                names.extend(f"{path}.{index}" for index in range(len(child)))
            else:
                visit(child, f"{path}.")

    visit(model, "")
    return names


def _nested_members(cls: type) -> dict:
    """The nested-region subclass of a repeated block's class (runtime_class kind "nested", `nest_blocks`): its
    forward is cls's as a torch.compiler.nested_compile_region, allowed one cached subgraph per block variant where
    torch lets the limit be set (mixed-precision blocks differ). Under torch.compile its tensor arguments go in
    `_unaliased_inputs` and its outputs come out `_unaliased`; eager calls and torch.export run cls's forward as it
    is."""
    limit = inspect.signature(torch.compiler.nested_compile_region).parameters.get("max_reuse_entries")
    options = {"max_reuse_entries": MAX_BLOCK_VARIANTS} if limit is not None else {}
    base_forward = cls.forward

    def region(self, *args, **kwargs):
        return _unaliased(base_forward(self, *args, **kwargs), (args, kwargs))

    region = torch.compiler.nested_compile_region(region, **options)

    @functools.wraps(base_forward)
    def forward(self, *args, **kwargs):
        if not torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return base_forward(self, *args, **kwargs)
        args, kwargs = _unaliased_inputs(args, kwargs)
        return region(self, *args, **kwargs)

    return {"forward": forward}


def _unaliased_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """(args, kwargs) of a nested region's call with every tensor that shares its storage with an earlier one (a
    view of the same base, the base itself, the same tensor twice) copied: invoke_subgraph refuses inputs aliasing
    each other (CogVideoX's first block gets the text and video token ranges of one tensor). A lone view stays."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    roots = []
    for index, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            root = leaf if leaf._base is None else leaf._base
            if _is_one_of(root, roots):
                leaves[index] = leaf.clone()
            else:
                roots.append(root)
    return pytree.tree_unflatten(leaves, spec)


def _is_one_of(tensor: torch.Tensor, tensors: list[torch.Tensor]) -> bool:
    """Whether tensor is (by identity) one of tensors; written as a loop of `is` tests, which Dynamo traces."""
    found = False
    for other in tensors:
        found = found or tensor is other
    return found


def _unaliased(outputs, inputs):
    """A nested region's outputs (any pytree: a tensor, a tuple, a diffusers output) with every tensor that is one
    of the inputs (any pytree) or a view copied: invoke_subgraph refuses outputs aliasing each other or an input,
    and Inductor (torch 2.11 on CUDA, 2.13 on the CPU) compiles a region returning a view of its own intermediate into
    reads of garbage (Flux's single blocks return the text and image token ranges of one tensor: 140 % off on an H100;
    a three-line region returning `x[:, 3:]` reproduces it on the CPU). The copy is `value * 1`, not a clone:
    Inductor drops a clone whose strides equal its source's as a no-op (`remove_noop_ops`), which gave the view back
    whenever the slice was dense (a token range at batch 1, a batch range); bool outputs, which no diffusers block
    returns, keep a clone. The copies cost one pass over those outputs (Flux: both streams of each single block)."""
    given = [leaf for leaf in pytree.tree_leaves(inputs) if isinstance(leaf, torch.Tensor)]

    def unaliased(value: torch.Tensor) -> torch.Tensor:
        if value._base is None and not _is_one_of(value, given):
            return value
        return value * 1 if value.dtype != torch.bool else value.clone()

    return pytree.tree_map_only(torch.Tensor, unaliased, outputs)


runtime_class.register("nested", _nested_members)


def set_nested_blocks(model: nn.Module, nested: bool) -> list[str]:
    """Swap the nested-region subclass in (nested) or out as the class of every block of `repeated_blocks(model)`;
    returns their names (ValueError if there are none)."""
    names = repeated_blocks(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no repeated blocks (an nn.ModuleList of two or more modules of "
                         "one class); compile the whole model: torch.compile(qmodel, backend=\"fxquant\")")
    for name in names:
        block = model.get_submodule(name)
        base = runtime_class.base_class(block, "nested")
        block.__class__ = runtime_class.subclass("nested", base) if nested else base
    return names


def compile_repeated_blocks(model: nn.Module, **compile_kwargs) -> list[str]:
    """`torch.compile(block, **compile_kwargs)` in place for every block of `repeated_blocks(model)`, with
    torch._dynamo's recompile limit raised to their number (blocks that differ compile once per variant); returns
    their names. Any model: QuantizedModel.compile_blocks uses it, and so do the benchmarks for bf16 and torchao.
    Static shapes unless compile_kwargs say `dynamic`: a UNet's blocks of one class at several widths and
    resolutions get a graph per shape, each with the tile configs tuned for its sizes, instead of Dynamo's automatic
    switch to one symbolic graph on the second shape."""
    names = repeated_blocks(model)
    dynamo_config = torch._dynamo.config
    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, len(names))
    for name in names:
        model.get_submodule(name).compile(**{"dynamic": False, **compile_kwargs})
    return names


def _timestep_argument(plan: QuantPlan, args: tuple, kwargs: dict[str, Any]):
    """The call's timestep, by the argument name or position the plan recorded."""
    if plan.timestep_argument in kwargs:
        return kwargs[plan.timestep_argument]
    if plan.timestep_position is not None and plan.timestep_position < len(args):
        return args[plan.timestep_position]
    raise CalibrationError(
        f"This model was quantized with timestep groups, but the call passes no {plan.timestep_argument!r}."
    )

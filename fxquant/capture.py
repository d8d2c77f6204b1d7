"""Capture: a model and one call's inputs -> an FX graph with input roles and module FQNs.

torch.export(strict=False) traces the model (torch.fx.symbolic_trace fails on every diffusers model). Each user
input placeholder gets a role from its argument name: "latent" (hidden_states / sample), "timestep" (timestep),
"condition" (everything else: text embeddings, pooled projections, ids, guidance, added_cond_kwargs ...).
Each linear / conv2d node is tied to the FQN of the module owning its weight, each attention node to the FQN of
its attention module. The graph is fxquant's analysis IR: passes annotate it; execution goes through the model's
own modules, replaced by FQN (so the converted model runs at any resolution and batch size).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .errors import CaptureError

LATENT_INPUT_NAMES = ("hidden_states", "sample", "latents", "x")
TIMESTEP_INPUT_NAMES = ("timestep", "timesteps", "t")

LINEAR_OPS = (torch.ops.aten.linear.default,)
CONV_OPS = (torch.ops.aten.conv2d.default,)
ATTENTION_OPS = (torch.ops.aten.scaled_dot_product_attention.default,)


def input_role(argument_name: str) -> str:
    """Role of a forward argument by its name: latent, timestep or condition."""
    if argument_name in LATENT_INPUT_NAMES:
        return "latent"
    if argument_name in TIMESTEP_INPUT_NAMES:
        return "timestep"
    return "condition"


def node_op_kind(node: fx.Node) -> str | None:
    """'linear' | 'conv2d' | 'sdpa' for the nodes fxquant may quantize, else None."""
    if node.op != "call_function":
        return None
    if node.target in LINEAR_OPS:
        return "linear"
    if node.target in CONV_OPS:
        return "conv2d"
    if node.target in ATTENTION_OPS:
        return "sdpa"
    return None


@dataclass
class CapturedGraph:
    """The exported graph plus what passes need to read it.

    graph_module: the FX graph (placeholders for parameters, buffers and user inputs);
    input_roles: user-input placeholder name -> role; param_names: parameter placeholder name -> parameter FQN.
    """

    graph_module: fx.GraphModule
    input_roles: dict[str, str]
    param_names: dict[str, str]
    argument_roles: dict[str, str] = field(default_factory=dict)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def module_fqn(self, node: fx.Node) -> str | None:
        """FQN of the module a linear / conv2d / sdpa node belongs to (None for weights that are not parameters)."""
        kind = node_op_kind(node)
        if kind in ("linear", "conv2d"):
            weight = node.args[1]
            if not isinstance(weight, fx.Node) or weight.name not in self.param_names:
                return None
            return self.param_names[weight.name].rsplit(".", 1)[0]
        if kind == "sdpa":
            stack = node.meta.get("nn_module_stack") or {}
            return list(stack.values())[-1][0] if stack else None
        return None


def bind_arguments(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional and keyword arguments of one call -> keyword arguments by forward's parameter names."""
    if not args:
        return dict(kwargs)
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    except TypeError as err:
        raise CaptureError(f"{type(model).__name__}.forward does not accept these arguments: {err}") from err
    return dict(bound.arguments)


def capture(model: torch.nn.Module, kwargs: dict[str, Any]) -> CapturedGraph:
    """Export `model(**kwargs)` to an FX graph. Raises CaptureError naming the model and the fix."""
    try:
        with torch.no_grad():
            exported = torch.export.export(model, (), kwargs=kwargs, strict=False)
    except Exception as err:  # torch.export raises many types; all mean "cannot capture"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CaptureError(
            f"torch.export(strict=False) could not capture {type(model).__name__}: {type(err).__name__}: "
            f"{first_line}\nfxquant needs a forward that torch.export can trace: Python control flow on tensor "
            "values (e.g. `if x.sum() > 0:` or `.item()` in a branch) cannot be captured. Rewrite it with "
            "torch.where / torch.cond, or move it out of forward."
        ) from err
    signature = exported.graph_signature
    param_names = dict(signature.inputs_to_parameters)
    argument_roles = {name: input_role(name) for name, value in kwargs.items() if _has_tensor(value)}
    input_roles = {}
    for placeholder in signature.user_inputs:
        if not isinstance(placeholder, str):
            continue
        owner = next((name for name in argument_roles if placeholder == name or placeholder.startswith(name + "_")),
                     None)
        input_roles[placeholder] = argument_roles.get(owner, "condition")
    if "latent" not in input_roles.values():
        raise CaptureError(
            f"{type(model).__name__}: no latent input found among {sorted(argument_roles)}; fxquant expects the "
            f"noisy latent as one of {LATENT_INPUT_NAMES}."
        )
    return CapturedGraph(exported.graph_module, input_roles, param_names, argument_roles)


def _has_tensor(value: Any) -> bool:
    leaves = torch.utils._pytree.tree_leaves(value)
    return any(isinstance(leaf, torch.Tensor) for leaf in leaves)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's class, config and parameter shapes: what a checkpoint must match."""
    config = getattr(model, "config", None)
    description = {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": {k: v for k, v in dict(config).items() if not k.startswith("_")} if config is not None else None,
        "parameters": [[name, list(p.shape)] for name, p in model.named_parameters()],
    }
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

"""annotate: give every node a role and every linear / conv2d / attention node a layer group; create the plan.

Reads: the captured graph, its input roles, the model's modules (sizes), the config (keep rules).
Writes: node.meta["fxquant_reach"] (input roles reaching the node), node.meta["fxquant_fqn"],
node.meta["fxquant_role"], node.meta["fxquant_group"] on linear / conv2d / sdpa nodes; a new QuantPlan with one
LayerPlan per module FQN (graph execution order), quantized or kept in full precision with the reason; the plan's
timestep fields (boundaries from the config, name and position of the forward argument carrying the timestep).

Role, by graph reachability from the inputs: "latent" if the latent input reaches the node's activation input,
"timestep" if only the timestep does, else "condition". Activation mode: the config's, or static per tensor for a
linear reading a GELU / SiLU of another linear (config.static_hidden_activations) or an attention's output
(config.static_attention_outputs), and for every convolution with config.static_conv_activations. Number format:
fp8 (config.fp8) for linears and for convolutions with static activations and 8-bit weights (no mixed precision),
else int.
Group, by graph structure: a linear whose output reaches an attention node's query / key / value without passing
another linear, or that the attention output reaches first, belongs to that attention. The attention is
cross-attention when no latent-path linear feeds its key, temporal-attention when its module name says
"temporal" or "temp_", else self-attention. Other latent-path linears are "mlp", other condition / timestep-path
linears "embedding", convolutions "conv".
"""

from __future__ import annotations

import inspect
import operator
import re
from collections import deque

import torch
from torch import fx, nn

from fxquant.capture import TIMESTEP_INPUT_NAMES, model_fingerprint, node_op_kind
from fxquant.config import config_to_dict
from fxquant.errors import CaptureError
from fxquant.plan import LayerPlan, QuantPlan
from fxquant.quantizer import packable
from fxquant.state import QuantState

from .base import PassResult, QuantPass

aten = torch.ops.aten
_TEMPORAL_NAME = re.compile(r"temporal|temp_")
_SEARCH_LIMIT = 64  # nodes visited per structural search; attention projections are a few reshapes away


def _reachability(graph: fx.Graph, input_roles: dict[str, str]) -> None:
    for node in graph.nodes:
        if node.op == "placeholder":
            reach = {input_roles[node.name]} if node.name in input_roles else set()
        else:
            reach = set()
            for source in node.all_input_nodes:
                reach |= source.meta["fxquant_reach"]
        node.meta["fxquant_reach"] = frozenset(reach)


def _role(node: fx.Node) -> str:
    reach = node.args[0].meta["fxquant_reach"] if isinstance(node.args[0], fx.Node) else frozenset()
    if "latent" in reach:
        return "latent"
    if reach == {"timestep"}:
        return "timestep"
    return "condition"


def _first_compute_nodes(start: fx.Node) -> tuple[list[fx.Node], set[fx.Node]]:
    """The linear / conv2d / attention nodes `start`'s output reaches before passing any other such node, and the
    nodes visited on the way (reshapes, norms, rotary embeddings ...)."""
    found, seen, queue = [], {start}, deque(start.users)
    while queue and len(seen) < _SEARCH_LIMIT:
        node = queue.popleft()
        if node in seen:
            continue
        seen.add(node)
        if node_op_kind(node):
            found.append(node)
        else:
            queue.extend(node.users)
    return found, seen


def _attention_slots(start: fx.Node) -> list[tuple[fx.Node, int]]:
    """(attention node, argument slot 0=query 1=key 2=value) that a linear's output feeds."""
    found, seen = _first_compute_nodes(start)
    return [(node, slot) for node in found if node_op_kind(node) == "sdpa" for slot in range(3)
            if node.args[slot] in seen]


_PASS_THROUGH = {aten.dropout.default, aten.view.default, aten.reshape.default, aten.clone.default,
                 aten.contiguous.default}
_HIDDEN_ACTIVATIONS = {aten.gelu.default, aten.silu.default}


def _through_pass_through(node):
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _PASS_THROUGH:
        node = node.args[0]
    return node


def _reads_hidden_activation(linear: fx.Node) -> bool:
    """The linear's input is a GELU / SiLU of another linear's output, or a GEGLU of its two halves (a * gelu(g),
    a, g = chunk(2)), through dropout and views: a feed-forward's second linear."""
    activation = _through_pass_through(linear.args[0])
    if not (isinstance(activation, fx.Node) and activation.op == "call_function"):
        return False
    if activation.target in _HIDDEN_ACTIVATIONS:
        return node_op_kind(_through_pass_through(activation.args[0])) == "linear"
    if activation.target != aten.mul.Tensor:
        return False
    halves = {}  # chunk index -> (chunk node, whether a GELU reads it)
    for factor in activation.args:
        gelu = isinstance(factor, fx.Node) and factor.target == aten.gelu.default
        half = factor.args[0] if gelu else factor
        chunk = half.args[0] if isinstance(half, fx.Node) and half.target == operator.getitem else None
        if isinstance(chunk, fx.Node) and chunk.target == aten.chunk.default and tuple(chunk.args[1:]) == (2, -1):
            halves[half.args[1]] = (chunk, gelu)
    return (set(halves) == {0, 1} and halves[0][0] is halves[1][0] and halves[1][1] and not halves[0][1]
            and node_op_kind(_through_pass_through(halves[0][0].args[0])) == "linear")


def _output_projections(attention: fx.Node) -> list[fx.Node]:
    """The linears the attention output reaches first."""
    return [node for node in _first_compute_nodes(attention)[0] if node_op_kind(node) == "linear"]


def _attention_groups(compute_nodes: list[fx.Node], fqn_of: dict[fx.Node, str]) -> dict[fx.Node, str]:
    """Attention node and each linear attached to it -> self-attention / cross-attention / temporal-attention."""
    slots: dict[fx.Node, list[tuple[fx.Node, int]]] = {}
    for node in compute_nodes:
        if node_op_kind(node) == "linear":
            for attention, slot in _attention_slots(node):
                slots.setdefault(attention, []).append((node, slot))
    groups: dict[fx.Node, str] = {}
    for attention in (n for n in compute_nodes if node_op_kind(n) == "sdpa"):
        key_roles = {linear.meta["fxquant_role"] for linear, slot in slots.get(attention, []) if slot == 1}
        if _TEMPORAL_NAME.search(fqn_of.get(attention, "")):
            group = "temporal-attention"
        elif key_roles and "latent" not in key_roles:
            group = "cross-attention"
        else:
            group = "self-attention"
        groups[attention] = group
        attached = [linear for linear, _ in slots.get(attention, [])] + _output_projections(attention)
        for linear in attached:
            groups.setdefault(linear, group)
    return groups


def _conv_unsupported(module: nn.Module) -> str | None:
    if module.groups != 1:
        return f"grouped convolution (groups={module.groups}) has no int8 kernel"
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        return "convolution padding mode has no int8 kernel"
    return None


class AnnotatePass(QuantPass):
    name = "annotate"

    def requires(self, state):
        assert state.captured is not None, "annotate needs a captured graph"

    def call(self, state: QuantState) -> PassResult:
        graph, config, model = state.graph, state.config, state.model
        _reachability(graph, state.captured.input_roles)
        compute = [n for n in graph.nodes if node_op_kind(n) and state.captured.module_fqn(n)]
        fqn_of = {n: state.captured.module_fqn(n) for n in compute}
        for node in compute:
            node.meta["fxquant_fqn"] = fqn_of[node]
            node.meta["fxquant_role"] = _role(node) if node_op_kind(node) != "sdpa" else "latent"
        attention_group = _attention_groups(compute, fqn_of)
        for node in compute:
            kind = node_op_kind(node)
            if node in attention_group:
                group = attention_group[node]
            elif kind == "conv2d":
                group = "conv"
            else:
                group = "mlp" if node.meta["fxquant_role"] == "latent" else "embedding"
            node.meta["fxquant_group"] = group

        plan = QuantPlan(
            model_class=f"{type(model).__module__}.{type(model).__qualname__}",
            model_fingerprint=model_fingerprint(model),
            recipe=config.name,
            config=config_to_dict(config),
            input_roles=dict(state.captured.argument_roles),
        )
        latent_weighted = [n for n in compute if node_op_kind(n) != "sdpa" and n.meta["fxquant_role"] == "latent"]
        io_reason = {}
        if latent_weighted and config.keep_io_layers:
            io_reason[fqn_of[latent_weighted[-1]]] = "last latent-path layer (output projection), keep_io_layers"
            io_reason[fqn_of[latent_weighted[0]]] = "first latent-path layer (input embedding), keep_io_layers"
        static_inputs = set()
        if config.static_attention_outputs:
            static_inputs.update(linear for attention in compute if node_op_kind(attention) == "sdpa"
                                 for linear in _output_projections(attention))
        if config.static_hidden_activations:
            static_inputs.update(node for node in compute if node_op_kind(node) == "linear"
                                 and _reads_hidden_activation(node))
        if config.static_conv_activations:
            static_inputs.update(node for node in compute if node_op_kind(node) == "conv2d")
        for node in compute:
            fqn = fqn_of[node]
            if fqn in plan.layers:  # a module called twice: one plan entry, latent if any call is
                if node.meta["fxquant_role"] == "latent":
                    plan.layers[fqn].role = "latent"
                continue
            plan.layers[fqn] = self._layer_plan(node, fqn, model.get_submodule(fqn), config, io_reason,
                                                node in attention_group, node in static_inputs)
        self._timestep_fields(plan, state)
        state.plan = plan
        return PassResult(modified=True)

    @staticmethod
    def _timestep_fields(plan: QuantPlan, state: QuantState) -> None:
        """Timestep groups of the config, and where the forward receives the timestep (name and position)."""
        plan.timestep_boundaries = list(state.config.timestep_groups)
        plan.timestep_argument = next((n for n, r in state.captured.argument_roles.items() if r == "timestep"), None)
        if plan.timestep_boundaries and plan.timestep_argument is None:
            raise CaptureError(f"timestep_groups need a timestep input; {plan.model_class} received none of "
                               f"{TIMESTEP_INPUT_NAMES} in the captured call.")
        names = list(inspect.signature(state.model.forward).parameters)
        plan.timestep_position = names.index(plan.timestep_argument) if plan.timestep_argument in names else None

    @staticmethod
    def _layer_plan(node, fqn, module, config, io_reason, in_attention, static_input) -> LayerPlan:
        kind = node_op_kind(node)
        role = node.meta["fxquant_role"]
        layer = LayerPlan(fqn=fqn, op=kind, group=node.meta["fxquant_group"], role=role)
        if kind != "sdpa":
            layer.num_params = module.weight.numel()
            layer.in_features = module.weight.shape[1]
            layer.out_features = module.weight.shape[0]
            layer.weight_bits, layer.weight_granularity = config.weight_bits, config.weight_granularity
            if config.weight_granularity == "per_group":  # (runs so where LayerPlan.inputs_per_scale says)
                layer.weight_group_size = config.weight_group_size
            # fp8 convolutions need static activations (the kernel's codes have one scale) and 8-bit weights, which
            # mixed precision may change
            layer.number_format = "fp8" if config.fp8 and (kind == "linear" or (
                static_input and config.weight_bits == 8 and not config.mixed_precision)) else "int"
            layer.act_bits, layer.act_mode = config.act_bits, config.act_mode
            if static_input:
                layer.act_mode = "static_per_tensor"
        user_reason = config.keep_reason(fqn)
        if user_reason is not None:
            layer.keep(f"recipe rule: {user_reason}")
        elif kind == "sdpa":
            if config.attention is None:
                layer.keep("attention matmuls are not quantized by this recipe (attention=None)")
            else:
                layer.attention_format = config.attention
        elif role != "latent" and not in_attention and config.keep_condition_layers:
            layer.keep(f"condition-only layer ({role} path, outside attention), keep_condition_layers")
        elif fqn in io_reason:
            layer.keep(io_reason[fqn])
        elif kind == "linear" and not isinstance(module, nn.Linear):
            layer.keep(f"module type {type(module).__name__} is not nn.Linear")
        elif not packable(layer.num_params // layer.out_features, layer.weight_bits):
            layer.keep(f"int{layer.weight_bits} weights need an input width (per output channel) divisible by "
                       f"{8 // layer.weight_bits} to pack")
        elif kind == "conv2d":
            if not isinstance(module, nn.Conv2d):
                layer.keep(f"module type {type(module).__name__} is not nn.Conv2d")
            elif (reason := _conv_unsupported(module)) is not None:
                layer.keep(reason)
        return layer

    def ensures(self, state):
        for node in state.graph.nodes:
            if "fxquant_fqn" in node.meta:
                assert node.meta["fxquant_fqn"] in state.plan.layers, f"node {node.name} has no plan entry"


"""`torch.compile(qmodel, backend="fxquant")`, registered through the torch_dynamo_backends entry point.

Dynamo hands over the graph of the quantized model, in which every quantized layer is a chain of fxquant ops.
The backend rewrites it with patterns, then compiles:
- every device: identical quantizations of one input (q / k / v projections of the same hidden states) run once;
  a per-token quantization whose input is made by a LayerNorm / RMSNorm (+ affine), adaLN modulation
  (x * (1 + scale) + shift), GELU / SiLU or GEGLU becomes one `fused_quantize_per_token` with that prologue (the
  float rows between them never reach memory), and one of two such chains concatenated along tokens (CogVideoX's
  text and video tokens) one `fused_quantize_concat`;
  `unpack_int4` / `unpack_int2` -> `int8_linear` becomes one `packed_int8_linear` (4- / 2-bit weights are unpacked
  inside the GEMM's K loop; the int8 codes never reach memory), and, after the fusions below, an fp8 GEMM whose
  weights are unpacked integer codes (`unpack_fp8_codes`, `w4a8-fp8`) reads the packed codes (`packed_fp8_linear`,
  or the fused op with them); `residual + gate * linear(...)` (a transformer
  block's gated residual) becomes one `linear_residual` (applied in the GEMM's epilogue; a linear whose output is
  cut along tokens into two parts with their own gates and residuals, CogVideoX's text and video rows, one
  `linear_residual_parts` under the option fxquant.fuse_residual_parts); a static per-tensor
  quantization of a GELU / SiLU / GEGLU of a linear's output (a feed-forward's hidden activations) becomes one
  `linear_activation_quantize` (the GEMM's epilogue writes the next linear's codes; a static quantization of a
  concatenation is split over its parts first, so each can fuse), a static fp8 quantization of
  a quantized attention's output (the output projection's input) one `quantized_attention_codes` (also when a joint
  attention's output is cut into two token ranges for two projections: two scales split at the boundary), and a
  static-fp8
  attention whose q / k / v come from fp8 linears (joint ones concatenated; q / k maybe normalised per head and
  rotated, as Flux's and CogVideoX's) one `attention_fp8_codes` on operands the GEMMs' epilogues write in the
  kernel's layout (`linear_attention_operand`, the head norms and the rotary embedding applied there);
  adaLN-single's chunked modulation table (PixArt's `scale_shift_table[None] + timestep`, each `1 + scale` folded in)
  whose every chunk goes to those ops becomes one `modulation_table` (one kernel writes all six vectors); with the
  option `fxquant.gluon_attention` (by default under CUDA graphs), each `attention_fp8_codes` becomes
  `gluon_attention_fp8_codes` (the Gluon kernel that keeps its MMAs in flight across the softmax, on Hopper at the
  head dims where it was measured faster; an opaque op call);
- CUDA: the quantize, GEMM, attention and conv ops become calls of fxquant's Triton kernels
  traced through `wrap_triton`, which Inductor launches from its own generated code (no Python dispatch per op; the
  attention kernel's tile is autotuned per shape before tracing, GEMM tiles are fixed rules; torch's analysis of
  which arguments a traced kernel writes runs once per kernel specialization, `access_analysis`); static per-tensor
  quantization (pointwise: a conv's channels-last input codes, the attention operands not made by a GEMM) and, with
  the option `fxquant.fuse_quantize`, per-token quantization go to Inductor as plain PyTorch, fused into the ops
  producing their input (norm, adaLN modulate, GELU, the balancing multiply); so does the unpacking of a
  mixed-precision layer's nested weight planes, fused into their per-timestep-group recombination.
  Inductor compiles the rest (`mode="max-autotune"` / `"reduce-overhead"` honoured; with N-d tiling where a
  quantized attention's fp8 values are concatenated from two streams, unless the options say otherwise).
- CPU: the reference ops run as traced, with no Inductor compile.
`compile_counter` counts graphs compiled and rewrites, so tests can check that a model compiles once and never
again per step.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx

from ...ops import attention_operand_reference, quantize_per_token_reference, rotate_pairs, varies_per_sample
from ...quantizer import (quantize_asymmetric, quantize_fp8, quantize_fp8_with_scale, scale_groups, unpack_bits,
                          unpack_fp8_layer_e4m3, unpack_int4)
from .access_analysis import memoize_access_analysis

compile_counter: Counter = Counter()
fxq = torch.ops.fxquant

_UNPACK_BITS = {fxq.unpack_int4.default: 4, fxq.unpack_int2.default: 2}


def _is_fxquant(node: fx.Node) -> bool:
    return node.op == "call_function" and "fxquant" in str(node.target)


def _target(node: fx.Node):
    """The OpOverload a call_function node calls (Dynamo may record the packet instead of `.default`)."""
    target = node.target
    return target.default if isinstance(target, torch._ops.OpOverloadPacket) else target


def _node_args(node: fx.Node, op: torch._ops.OpOverload) -> list:
    """The node's arguments in schema order, keyword arguments and defaults filled in."""
    args = list(node.args)
    for argument in op._schema.arguments[len(args):]:
        args.append(node.kwargs.get(argument.name, argument.default_value))
    return args


def _replace(gm: fx.GraphModule, node: fx.Node, op: torch._ops.OpOverload, args: tuple) -> None:
    """Put a call of `op` with `args` in place of `node`; it takes over node's meta (its example value, which later
    rewrites match on)."""
    with gm.graph.inserting_before(node):
        replacement = gm.graph.call_function(op, args)
    replacement.meta.update(node.meta)
    node.replace_all_uses_with(replacement)
    gm.graph.erase_node(node)


def _cleaned(gm: fx.GraphModule, count: int) -> int:
    """Drop what a rewrite left dead, check and recompile the graph; returns count."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return count


_QUANTIZE_OPS = (fxq.quantize_per_token.default, fxq.quantize_per_token_fp8.default, fxq.quantize_per_tensor.default,
                 fxq.quantize_per_tensor_fp8.default, fxq.fused_quantize_per_token.default)
_VIEWS = {"reshape", "view", "contiguous", torch.reshape}


def _canonical(value):
    """A hashable stand-in for a node argument: reshapes / views of the same value with the same sizes are equal
    (each QuantLinear flattens its input itself)."""
    if isinstance(value, fx.Node) and value.target in _VIEWS and value.op in ("call_method", "call_function"):
        return ("view", _canonical(value.args[0]), tuple(_canonical(a) for a in value.args[1:]),
                tuple(sorted((k, _canonical(v)) for k, v in value.kwargs.items())))
    if isinstance(value, (list, tuple)):
        return tuple(_canonical(item) for item in value)
    return value


def deduplicate_quantization(gm: fx.GraphModule) -> int:
    """Merge quantize nodes with the same op and (canonical) arguments into the first; returns how many."""
    seen: dict[tuple, fx.Node] = {}
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or _target(node) not in _QUANTIZE_OPS:
            continue
        key = (_target(node), _canonical(_node_args(node, _target(node))))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            gm.graph.erase_node(node)
            removed += 1
        else:
            seen[key] = node
    return _cleaned(gm, removed)


def fuse_packed_weights(gm: fx.GraphModule) -> int:
    """Rewrite unpack_int4 / unpack_int2 -> int8_linear into packed_int8_linear; returns how many."""
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or _target(node) != fxq.int8_linear.default:
            continue
        x_q, x_scale, x_zero, w_q, w_scale, w_sum, bias, out_dtype = _node_args(node, fxq.int8_linear.default)
        if not (isinstance(w_q, fx.Node) and w_q.op == "call_function" and _target(w_q) in _UNPACK_BITS):
            continue
        _replace(gm, node, fxq.packed_int8_linear.default,
                 (x_q, x_scale, x_zero, w_q.args[0], _UNPACK_BITS[_target(w_q)], w_scale, w_sum, bias, out_dtype))
        fused += 1
    return _cleaned(gm, fused)  # the unpack nodes left without users go too


_FUSED_LINEARS = (fxq.linear_residual.default, fxq.linear_residual_parts.default,
                  fxq.linear_activation_quantize.default)  # a linear's (x_q, x_scale, x_zero, w, weight_bits, ...)


def _packed_e4m3_source(w) -> tuple | None:
    """(packed codes node, bits) when w is an fp8 layer's unpacked integer codes (unpack_fp8_codes), else None."""
    if isinstance(w, fx.Node) and w.op == "call_function" and _target(w) == fxq.unpack_fp8_codes.default:
        return tuple(_node_args(w, fxq.unpack_fp8_codes.default))
    return None


def fuse_packed_e4m3_weights(gm: fx.GraphModule) -> int:
    """Rewrite fp8 GEMMs on e4m3 copies of unpacked integer codes to read the packed codes: fp8_linear into
    packed_fp8_linear, linear_residual / linear_residual_parts / linear_activation_quantize /
    linear_attention_operand (where every part's weights have the same bits) with the packed weights and their bits;
    returns how many. Runs after the fusions that match fp8_linear."""
    fused = 0
    for node in list(gm.graph.nodes):
        op = _target(node) if node.op == "call_function" else None
        if op == fxq.fp8_linear.default:
            x_q, x_scale, w, w_scale, bias, out_dtype = _node_args(node, op)
            source = _packed_e4m3_source(w)
            if source:
                _replace(gm, node, fxq.packed_fp8_linear.default, (x_q, x_scale, *source, w_scale, bias, out_dtype))
                fused += 1
        elif op in _FUSED_LINEARS:
            args = _node_args(node, op)  # (x_q, x_scale, x_zero, w, weight_bits, ...)
            source = _packed_e4m3_source(args[3])
            if source:
                _replace(gm, node, op, (*args[:3], *source, *args[5:]))
                fused += 1
        elif op == fxq.linear_attention_operand.default:
            args = _node_args(node, op)  # (x_q, x_scale, w_q, ..., rope, weight_bits): lists of parts
            sources = [_packed_e4m3_source(w) for w in args[2]]
            if all(sources) and len({bits for _, bits in sources}) == 1:
                _replace(gm, node, op, (*args[:2], [packed for packed, _ in sources], *args[3:-1], sources[0][1]))
                fused += len(sources)
    return _cleaned(gm, fused)


_ADD, _MUL = {operator.add, torch.add}, {operator.mul, torch.mul}
_GELU, _SILU = {F.gelu, torch._C._nn.gelu}, {F.silu}
_LAYER_NORM, _RMS_NORM = {F.layer_norm, torch.layer_norm}, {F.rms_norm, torch.rms_norm}
_ROW_VIEWS = {"reshape", "view", "contiguous"}
_TOKEN_QUANTIZE_FP8 = {fxq.quantize_per_token.default: False, fxq.quantize_per_token_fp8.default: True}


def _call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _binary(node, targets) -> bool:
    """node calls one of targets with exactly two positional arguments and no keywords (`a + b`, `a * b`)."""
    return _call(node, targets) and len(node.args) == 2 and not node.kwargs


def _call_or_method(node, functions: set, method: str) -> bool:
    """node calls one of functions, or the tensor method of that name (`torch.chunk(x, 2)` / `x.chunk(2)`)."""
    return _call(node, functions) or isinstance(node, fx.Node) and node.op == "call_method" and node.target == method


def _arg(node: fx.Node, index: int, name: str, default):
    """A call's argument by position or keyword."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _value(node):
    """The example tensor Dynamo recorded for a node (None for constants and untensored nodes)."""
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _grouped(w_scale) -> bool:
    """Whether a linear's weight-scale argument holds group-wise scales (quantizer.scale_groups)."""
    value = _value(w_scale)
    return value is not None and scale_groups(value) > 0


def _only_use(node) -> bool:
    """The node feeds exactly one other node (so fusing that one leaves it dead)."""
    return isinstance(node, fx.Node) and len(node.users) == 1


def _with_example_value(node: fx.Node) -> fx.Node:
    """node, with the example value its call gives on its arguments' example values (fake tensors), which later
    rewrites and the attention tuning read."""
    args = fx.node.map_arg(node.args, lambda arg: arg.meta["example_value"])
    node.meta["example_value"] = node.target(*args)
    return node


def _through_row_views(node, shared: bool = False):
    """Step back over single-use reshapes / views that keep the last dim and over eval-mode dropout (shared: node
    itself may have several uses)."""
    while shared or _only_use(node):
        shared = False
        if node.op == "call_method" and node.target in _ROW_VIEWS or _call(node, {torch.reshape}):
            source = node.args[0]
        elif _call(node, {F.dropout}) and (_arg(node, 1, "p", 0.5) == 0 or not _arg(node, 2, "training", True)):
            source = node.args[0]
        else:
            return node
        if _value(source) is None or _value(node) is None or _value(node).shape[-1] != _value(source).shape[-1]:
            return node
        node = source
    return node


def _gelu_kind(node: fx.Node, gated: bool) -> str:
    tanh = _arg(node, 1, "approximate", "none") == "tanh"
    return ("geglu" if gated else "gelu") + ("_tanh" if tanh else "")


def _chunk_halves(hidden, gate):
    """The tensor y when hidden, gate = y.chunk(2, dim=-1) (each half used once), else None."""
    if not (_call(hidden, {operator.getitem}) and _call(gate, {operator.getitem}) and _only_use(hidden)
            and _only_use(gate) and hidden.args[0] is gate.args[0] and (hidden.args[1], gate.args[1]) == (0, 1)):
        return None
    chunk = hidden.args[0]
    is_chunk = _call_or_method(chunk, {torch.chunk}, "chunk")
    source = chunk.args[0] if is_chunk else None
    if not (is_chunk and len(chunk.users) == 2 and _arg(chunk, 1, "chunks", None) == 2 and _value(source) is not None
            and _arg(chunk, 2, "dim", 0) in (-1, _value(source).dim() - 1)):
        return None
    return source


def _activation(node):
    """(input, activation name) when node is GELU / SiLU of its input or GEGLU (a * gelu(g), a, g = y.chunk(2)),
    else None."""
    if not _only_use(node):
        return None
    if _call(node, _GELU):
        return node.args[0], _gelu_kind(node, gated=False)
    if _call(node, _SILU) and not _arg(node, 1, "inplace", False):
        return node.args[0], "silu"
    if _call(node, _MUL) and len(node.args) == 2:
        for hidden, gelu in (node.args, node.args[::-1]):
            if _call(gelu, _GELU) and _only_use(gelu):
                source = _chunk_halves(hidden, gelu.args[0])
                if source is not None:
                    return source, _gelu_kind(gelu, gated=True)
    return None


def _per_sample(operand, shape) -> bool:
    """A floating-point operand that ops.varies_per_sample allows against shape."""
    value = _value(operand)
    return value is not None and value.is_floating_point() and varies_per_sample(value.shape, shape)


def _modulation(node, combine):
    """(full-shaped input, per-sample operand) when node is `combine` (add / mul) of the two, else None."""
    if not (_binary(node, combine) and _only_use(node)):
        return None
    shape = _value(node).shape if _value(node) is not None else None
    for full, operand in (node.args, node.args[::-1]):
        if _value(full) is not None and _value(full).shape == shape and _per_sample(operand, shape):
            return full, operand
    return None


_NO_PROLOGUE = {"weight": None, "bias": None, "mul": None, "add": None, "norm": "none", "eps": 0.0}


def _norm_prologue(node) -> dict:
    """Match (norm(x) * weight + bias) * mul + add backwards from node: the prologue's x and the parts found."""
    parts = dict(_NO_PROLOGUE, x=node)
    for name, combine in (("add", _ADD), ("mul", _MUL)):
        found = _modulation(node, combine)
        if found:
            node, parts[name] = found
    found = _norm_call(node) if _only_use(node) else None
    if found:
        x, norm, weight, bias, eps = found
        parts.update(x=x, norm=norm, weight=weight, bias=bias,
                     eps=torch.finfo(_value(node).dtype).eps if eps is None else float(eps))
    else:
        parts["x"] = node
    return parts


def _norm_call(node) -> tuple | None:
    """(x, "layer" | "rms", weight, bias, eps or None: the dtype's) when node is torch's LayerNorm / RMSNorm function
    over its input's last dim, or diffusers' RMSNorm written out (`_decomposed_rms_norm`); else None."""
    value = _value(node)
    decomposed = _decomposed_rms_norm(node)
    if decomposed:
        return decomposed[0], "rms", decomposed[1], None, decomposed[2]
    if value is None or not _call(node, _LAYER_NORM | _RMS_NORM) or \
            list(_arg(node, 1, "normalized_shape", ())) != [value.shape[-1]]:
        return None
    layer = _call(node, _LAYER_NORM)
    eps = _arg(node, 4 if layer else 3, "eps", 1e-5 if layer else None)
    return node.args[0], "layer" if layer else "rms", _arg(node, 2, "weight", None), \
        _arg(node, 3, "bias", None) if layer else None, eps


def _decomposed_rms_norm(node) -> tuple | None:
    """(x, weight or None, eps) when node is diffusers' RMSNorm written out, x * rsqrt(x.float().pow(2).mean(-1,
    keepdim=True) + eps), cast, then times a 1-D weight if it has one, and x has no uses but these two; else None."""
    candidates = [(_uncast(node), None)]
    if _call(node, {operator.mul}) and len(node.args) == 2:
        candidates += [(_uncast(scaled), weight) for scaled, weight in (node.args, node.args[::-1])
                       if _value(weight) is not None and _value(weight).dim() == 1]
    for scaled, weight in candidates:
        if not (_call(scaled, {operator.mul}) and len(scaled.args) == 2):
            continue
        for x, inverse in (scaled.args, scaled.args[::-1]):
            shifted = inverse.args[0] if _call_or_method(inverse, {torch.rsqrt}, "rsqrt") else None
            if not (_call(shifted, {operator.add}) and len(shifted.args) == 2):
                continue
            variance, eps = shifted.args if isinstance(shifted.args[1], float) else shifted.args[::-1]
            squared = variance.args[0] if _call_or_method(variance, {torch.mean}, "mean") and _arg(
                variance, 1, "dim", None) in (-1, [-1], (-1,)) and _arg(variance, 2, "keepdim", False) else None
            if (isinstance(eps, float) and _call_or_method(squared, {torch.pow, operator.pow}, "pow")
                    and squared.args[1:] == (2,) and _uncast(squared.args[0]) is x and len(x.users) == 2):
                return x, weight, eps
    return None


def _concat_prologue(node) -> tuple | None:
    """fused_quantize_concat's leading arguments (head, tail, weight, bias, head_mul, head_add, tail_mul, tail_add,
    norm, eps) when node is torch.cat([head, tail], dim=1) of [B, T, C] tensors, each [norm (+ affine)] ->
    [modulation] with the same norm, else None."""
    value = _value(node)
    if not (_call(node, {torch.cat}) and _only_use(node) and value is not None and value.dim() == 3
            and _arg(node, 1, "dim", 0) in (1, -2) and len(_arg(node, 0, "tensors", ())) == 2):
        return None
    head, tail = (_norm_prologue(part) for part in _arg(node, 0, "tensors", ()))
    if any(head[key] is not tail[key] and head[key] != tail[key] for key in ("weight", "bias", "norm", "eps")):
        return None
    return (head["x"], tail["x"], head["weight"], head["bias"], head["mul"], head["add"], tail["mul"], tail["add"],
            head["norm"], head["eps"])


def _folded_affine(gm: fx.GraphModule, before: fx.Node, weight, bias, mul, add) -> tuple:
    """(mul', add') for a prologue `(x_hat * weight + bias) * mul + add` = `x_hat * mul' + add'`, with mul' = weight *
    mul and add' = bias * mul + add computed in the graph (on the per-sample vectors, in their dtype) in front of
    `before`: the kernel then reads two vectors per row instead of four. Absent terms drop out."""
    def call(op, *args):
        with gm.graph.inserting_before(before):
            return _with_example_value(gm.graph.call_function(op, args))

    shift = bias if mul is None or bias is None else call(operator.mul, bias, mul)
    return (weight if mul is None else mul if weight is None else call(operator.mul, weight, mul),
            add if shift is None else shift if add is None else call(operator.add, shift, add))


def _foldable(weight, bias, *modulations) -> bool:
    """A norm's affine that `_folded_affine` can fold into the modulation (modulations: (mul, add) per part): there is
    one, some part's modulation multiplies, and every operand has an example value."""
    muls = modulations[0::2]  # (mul, add) pairs
    return (weight is not None or bias is not None) and any(mul is not None for mul in muls) and all(
        _value(t) is not None for t in (weight, bias, *modulations) if t is not None)


def fuse_quantize_prologues(gm: fx.GraphModule) -> int:
    """Rewrite [norm (+ affine)] -> [modulation] -> [activation] -> quantize_per_token(_fp8) chains, and GEGLU ->
    quantize, into fused_quantize_per_token nodes, and a concatenation of two [norm] -> [modulation] parts along
    tokens -> quantize into a fused_quantize_concat node; returns how many. Every node folded in must have no other
    use."""
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or _target(node) not in _TOKEN_QUANTIZE_FP8:
            continue
        top = _through_row_views(node.args[0])
        concat = _concat_prologue(top)
        if concat:
            head, tail, weight, bias, head_mul, head_add, tail_mul, tail_add, norm, eps = concat
            if _foldable(weight, bias, head_mul, head_add, tail_mul, tail_add):
                head_mul, head_add = _folded_affine(gm, node, weight, bias, head_mul, head_add)
                tail_mul, tail_add = _folded_affine(gm, node, weight, bias, tail_mul, tail_add)
                weight = bias = None
            _replace(gm, node, fxq.fused_quantize_concat.default, (
                head, tail, weight, bias, head_mul, head_add, tail_mul, tail_add, norm, eps, "none",
                _TOKEN_QUANTIZE_FP8[_target(node)]))
            fused += 1
            continue
        activation = _activation(top)
        if activation and activation[1].startswith("geglu"):  # takes nothing in front (it reads a GEMM's output)
            parts = dict(_NO_PROLOGUE, x=activation[0])
        else:
            parts = _norm_prologue(activation[0] if activation else top)
        if not activation and parts["norm"] == "none" and parts["mul"] is None and parts["add"] is None:
            continue
        if _foldable(parts["weight"], parts["bias"], parts["mul"], parts["add"]):
            parts["mul"], parts["add"] = _folded_affine(gm, node, parts["weight"], parts["bias"], parts["mul"],
                                                        parts["add"])
            parts["weight"] = parts["bias"] = None
        _replace(gm, node, fxq.fused_quantize_per_token.default, (
            parts["x"], parts["weight"], parts["bias"], parts["mul"], parts["add"], parts["norm"], parts["eps"],
            activation[1] if activation else "none", _TOKEN_QUANTIZE_FP8[_target(node)]))
        fused += 1
    return _cleaned(gm, fused)


_LINEARS = (fxq.int8_linear.default, fxq.packed_int8_linear.default, fxq.fp8_linear.default)


def _linear_residual_args(node) -> tuple | None:
    """linear_residual's leading arguments (x_q, x_scale, x_zero, w, weight_bits, w_scale, w_sum, bias) for a node
    of an fxquant linear op, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and _target(node) in _LINEARS):
        return None
    args = _node_args(node, _target(node))
    if _target(node) == fxq.fp8_linear.default:
        x_q, x_scale, w_q, w_scale, bias, _ = args
        return x_q, x_scale, None, w_q, 8, w_scale, None, bias
    if _target(node) == fxq.int8_linear.default:
        return (*args[:4], 8, *args[4:7])
    return tuple(args[:8])


def _through_output_views(node, shared: bool = False):
    """Step back over single-use row views, eval dropout and x / 1.0 or x * 1.0 (diffusers' attention processors
    divide by `rescale_output_factor`, 1.0 by default; shared: node itself may have several uses)."""
    while True:
        node, shared = _through_row_views(node, shared), False
        if not (_only_use(node) and _call(node, _MUL | {operator.truediv}) and len(node.args) == 2
                and isinstance(node.args[1], (int, float)) and node.args[1] == 1):
            return node
        node = node.args[0]


def fuse_residual_epilogues(gm: fx.GraphModule) -> int:
    """Rewrite `residual + [gate *] linear(...)` (an fxquant linear seen through row views, its output used only
    there; gate per sample) into linear_residual nodes; returns how many."""
    fused = 0
    for node in list(gm.graph.nodes):
        if not (_binary(node, _ADD) and _value(node) is not None):
            continue
        for branch, residual in (node.args, node.args[::-1]):
            if _value(residual) is None or (_value(residual).shape, _value(residual).dtype) != (
                    _value(node).shape, _value(node).dtype):
                continue
            gated = _modulation(branch, _MUL)
            gate = gated[1] if gated else None
            linear = _through_output_views(gated[0] if gated else branch)
            linear_args = _linear_residual_args(linear) if _only_use(linear) else None
            if linear_args is None:
                continue
            _replace(gm, node, fxq.linear_residual.default, (*linear_args, gate, residual))  # the next block's
            fused += 1  # residual add matches through the replacement's example value
            break
    return _cleaned(gm, fused)


def _residual_part(part: fx.Node) -> tuple | None:
    """(add node, gate or None, residual) when a token part's only use is `residual + [gate *] part` (gate per
    sample, residual shaped and typed like the sum), else None."""
    use = next(iter(part.users)) if _only_use(part) else None
    gated = _modulation(use, _MUL) if use is not None else None
    if gated and gated[0] is not part:
        return None
    add = next(iter(use.users)) if gated and _only_use(use) else use
    if not (_binary(add, _ADD) and _value(add) is not None):
        return None
    branch = use if gated else part
    residual = add.args[1] if add.args[0] is branch else add.args[0]
    if _value(residual) is None or (_value(residual).shape, _value(residual).dtype) != (
            _value(add).shape, _value(add).dtype):
        return None
    return add, gated[1] if gated else None, residual


def fuse_residual_part_epilogues(gm: fx.GraphModule) -> int:
    """Rewrite an fxquant linear whose [B, T, N] output (through row views) is cut along tokens into two parts,
    each used only in `residual + [gate *] part` (CogVideoX: text and video rows after the attention's output
    projection and after the feed-forward), into one linear_residual_parts node; returns how many."""
    order = {node: position for position, node in enumerate(gm.graph.nodes)}
    fused = 0
    for x in list(gm.graph.nodes):
        ranges = sorted(_token_ranges(x) or [], key=lambda part: part[0])
        if len(ranges) != 2 or (ranges[0][0], ranges[0][1], ranges[1][1]) != (0, ranges[1][0], _value(x).shape[1]):
            continue
        linear_args = _linear_residual_args(_through_output_views(x, shared=True))
        parts = [_residual_part(part) for _, _, part in ranges]
        if linear_args is None or None in parts or (parts[0][1] is None) != (parts[1][1] is None):
            continue
        first_add = min(parts[0][0], parts[1][0], key=order.get)
        if any(order.get(operand, -1) > order[first_add] for _, *operands in parts for operand in operands):
            continue  # a gate or residual made after the first sum
        with gm.graph.inserting_before(first_add):
            both = _with_example_value(gm.graph.call_function(fxq.linear_residual_parts.default, (
                *linear_args, *parts[0][1:], *parts[1][1:])))
            for index, (add, _, _) in enumerate(parts):
                add.replace_all_uses_with(_with_example_value(gm.graph.call_function(operator.getitem, (both, index))))
                gm.graph.erase_node(add)
        fused += 1
    return _cleaned(gm, fused)


_STATIC_QUANTIZE = (fxq.quantize_per_tensor.default, fxq.quantize_per_tensor_fp8.default)


def _row_view(node) -> bool:
    """node reshapes / views its input keeping the last dim (a QuantLinear flattening its input to rows)."""
    return (isinstance(node, fx.Node) and (node.op == "call_method" and node.target in _ROW_VIEWS
                                           or _call(node, {torch.reshape}))
            and _value(node) is not None and _value(node.args[0]) is not None
            and _value(node).shape[-1] == _value(node.args[0]).shape[-1])


def _rows(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """A new node viewing node's value as rows [-1, C] (how a QuantLinear quantizes its input, so that the epilogue
    rewrites match the part's quantization)."""
    return _with_example_value(gm.graph.call_function(torch.reshape, (node, (-1, _value(node).shape[-1]))))


def distribute_static_quantization(gm: fx.GraphModule) -> int:
    """Rewrite `quantize(row views(cat([a, b, ...], dim=-1)))` (a static per-tensor fp8 / int8 quantization, which
    commutes with concatenation) into `row views(cat([quantize(a as rows), quantize(b as rows), ...]))`, so that each
    part's
    quantization can fuse into what makes it (Flux's single blocks: the attention writing its output's codes, the MLP
    GEMM's GELU epilogue writing the rest; only 8-bit codes are then concatenated). Returns how many."""
    distributed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or _target(node) not in _STATIC_QUANTIZE:
            continue
        op = _target(node)
        args = _node_args(node, op)
        chain, joined = [], args[0]
        while _row_view(joined) and _only_use(joined):
            chain.append(joined)
            joined = joined.args[0]
        parts = _arg(joined, 0, "tensors", ()) if _call(joined, {torch.cat}) and _only_use(joined) else ()
        if len(parts) < 2 or _value(joined) is None or _arg(joined, 1, "dim", 0) not in (-1, _value(joined).dim() - 1):
            continue
        with gm.graph.inserting_before(node):  # after the scale, which may be chosen per timestep group late
            codes = [_with_example_value(gm.graph.call_function(torch.reshape, (_with_example_value(
                gm.graph.call_function(op, (_rows(gm, part), *args[1:]))), tuple(_value(part).shape))))
                for part in parts]
            joined_codes = _with_example_value(gm.graph.call_function(torch.cat, (codes, -1)))
        _replay_views(gm, node, joined_codes, chain)
        distributed += 1
    return _cleaned(gm, distributed)


def fuse_activation_epilogues(gm: fx.GraphModule) -> int:
    """Rewrite `quantize_per_tensor(_fp8)(act(linear(...)))` (a GELU / SiLU, or a GEGLU of the linear's two halves,
    seen through row views and eval dropout, of an fxquant linear whose output is used only there; 8-bit static
    quantization; a GEGLU's linear with per-channel weight scales: the gated kernel unpacks packed weights first)
    into linear_activation_quantize nodes; returns how many."""
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or _target(node) not in _STATIC_QUANTIZE:
            continue
        args = _node_args(node, _target(node))
        fp8 = _target(node) == fxq.quantize_per_tensor_fp8.default
        activation = _activation(_through_row_views(args[0]))
        if (not fp8 and args[3] != 8) or activation is None:
            continue
        linear = _through_row_views(activation[0])
        linear_args = _linear_residual_args(linear) if _only_use(linear) else None
        if linear_args is None or _value(linear) is None or _value(node) is None:
            continue
        gated = activation[1].startswith("geglu")
        width = _value(node).shape[-1] * (2 if gated else 1)
        if tuple(_value(linear).shape) != (*_value(node).shape[:-1], width) or (gated and _grouped(linear_args[5])):
            continue
        _replace(gm, node, fxq.linear_activation_quantize.default,
                 (*linear_args, activation[1], args[1], None if fp8 else args[2]))
        fused += 1
    return _cleaned(gm, fused)


_ATTENTION_OPS = (fxq.quantized_attention.default, fxq.quantized_attention_codes.default)
_HEAD_VIEWS = {"reshape", "view", "transpose", "permute", "contiguous", "flatten", "unflatten"}
# the same as functions (how Dynamo records tensor methods inside a torch function mode, e.g. quantized attention's)
_HEAD_VIEW_FUNCTIONS = {getattr(torch.Tensor, name) for name in _HEAD_VIEWS} | {torch.reshape, torch.transpose,
                                                                                torch.permute, torch.flatten}


def _is_head_view(node) -> bool:
    """node reshapes / transposes its input (as a method, or as a function inside a torch function mode)."""
    return isinstance(node, fx.Node) and (node.op == "call_method" and node.target in _HEAD_VIEWS
                                          or _call(node, _HEAD_VIEW_FUNCTIONS))


def _replay_views(gm: fx.GraphModule, node: fx.Node, source: fx.Node, chain: list) -> None:
    """Put source in place of node: the views of chain (outermost first, single-use, between source's stand-in and
    node's input) move in front of node and read source instead, no-op casts dropped (they would cast codes); node's
    uses take the outermost view, and node goes."""
    for view in reversed(chain):  # innermost first
        if view.op == "call_method" and view.target == "to":
            view.replace_all_uses_with(source)
            gm.graph.erase_node(view)
            continue
        node.prepend(view)
        view.args = (source, *view.args[1:])
        source = view
    node.replace_all_uses_with(source)
    gm.graph.erase_node(node)


def _no_op_cast(node) -> bool:
    """node is `x.to(dtype)` of a tensor already of that dtype."""
    return (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "to" and not node.kwargs
            and len(node.args) == 2 and _value(node) is not None and _value(node.args[0]) is not None
            and _value(node).dtype == _value(node.args[0]).dtype)


def _token_range(node) -> tuple[int, int] | None:
    """(a, b) when node is `x[:, a:b]` of a [B, N, C] x with integer bounds (a range of tokens: SD3's joint attention
    cuts its output so), else None."""
    index = node.args[1] if _call(node, {operator.getitem}) else None
    value = _value(node.args[0]) if index is not None else None
    if not (value is not None and value.dim() == 3 and isinstance(index, tuple) and len(index) == 2
            and index[0] == slice(None) and isinstance(index[1], slice) and index[1].step is None):
        return None
    start, stop = index[1].start or 0, value.shape[1] if index[1].stop is None else index[1].stop
    return (start, stop) if isinstance(start, int) and isinstance(stop, int) else None


def _attention_through_views(node) -> tuple | None:
    """(quantized_attention node, the single-use views between it and node, outermost first) when node is the
    attention's output seen through reshapes / transposes / no-op dtype casts / a token slice, else None."""
    chain = []
    while _only_use(node):
        if node.op == "call_function" and _target(node) == fxq.quantized_attention.default:
            return node, chain
        if not (_no_op_cast(node) or _is_head_view(node) or _token_range(node)):
            return None
        chain.append(node)
        node = node.args[0]
    return None


def fuse_attention_output_quantization(gm: fx.GraphModule) -> int:
    """Rewrite `quantize_per_tensor_fp8(views(quantized_attention(...)))` (the output projection's static input,
    recipe option static_attention_outputs) into views of one quantized_attention_codes node: the attention kernel
    writes the fp8 codes. No-op dtype casts on the way go (they would cast the codes). Returns how many."""
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or _target(node) != fxq.quantize_per_tensor_fp8.default:
            continue
        x, out_scale = _node_args(node, fxq.quantize_per_tensor_fp8.default)
        found = _attention_through_views(x)
        if found is None:
            continue
        attention, chain = found
        with gm.graph.inserting_before(node):  # after the scale, which may be chosen per timestep group late
            codes = gm.graph.call_function(fxq.quantized_attention_codes.default,
                                           (*_node_args(attention, fxq.quantized_attention.default), out_scale))
        codes.meta.update(attention.meta)
        _replay_views(gm, node, codes, chain)
        gm.graph.erase_node(attention)
        fused += 1
    return _cleaned(gm, fused)


def _head_projection(operand, tokens_first: bool = False, shared: bool = False) -> tuple | None:
    """(fp8_linear node, heads, tokens) when operand is the single-use output [B * N, H * D] of an fp8 linear seen
    through views as its heads: [B, H, N, D] with operand[b, h, n, d] = out[b * N + n, h * D + d], or, tokens_first,
    [B, N, H, D] (the same values, heads not yet moved out); else None. shared: operand itself may have several uses
    (all inside the norm / rotation being fused, which reads it twice)."""
    value, node = _value(operand), operand
    while _is_head_view(node) and (_only_use(node) or shared and node is operand):
        node = node.args[0]
    if not (node.op == "call_function" and _target(node) == fxq.fp8_linear.default and _only_use(node)
            and value is not None and value.dim() == 4 and _value(node) is not None
            and all(isinstance(size, int) for size in value.shape)):
        return None
    batch, heads, tokens, head_dim = value.shape
    strides = (tokens * heads * head_dim, head_dim, heads * head_dim, 1)
    if tokens_first:
        heads, tokens = tokens, heads
        strides = (strides[0], heads * head_dim, head_dim, 1)
    if tuple(value.stride()) != strides or value.storage_offset() != 0 or tuple(_value(node).shape) != (
            batch * tokens, heads * head_dim):
        return None
    return node, heads, tokens


def _uncast(node):
    """node without a trailing `.float()` / `.to(dtype)`."""
    if isinstance(node, fx.Node) and node.op == "call_method" and (
            node.target == "float" and len(node.args) == 1
            or node.target == "to" and len(node.args) == 2 and isinstance(node.args[1], torch.dtype)) \
            and not node.kwargs:
        return node.args[0]
    return node


def _evaluated(node, env: dict, budget: list):
    """node's value computed from env's (node -> value) through at most budget[0] call nodes; KeyError if it needs
    anything else (a placeholder, an attribute, a longer chain)."""
    if not isinstance(node, fx.Node) or node in env:
        return env[node] if isinstance(node, fx.Node) else node
    if node.op not in ("call_function", "call_method") or budget[0] == 0:
        raise KeyError(node.name)
    budget[0] -= 1
    args = fx.node.map_arg(node.args, lambda arg: _evaluated(arg, env, budget))
    kwargs = fx.node.map_arg(node.kwargs, lambda arg: _evaluated(arg, env, budget))
    env[node] = node.target(*args, **kwargs) if node.op == "call_function" else \
        getattr(args[0], node.target)(*args[1:], **kwargs)
    return env[node]


def _rotates_pairs(node, x) -> bool:
    """Whether node computes rotate_pairs(x) (fxquant.ops) from x alone, in at most 12 ops: evaluated on a probe."""
    if _value(x) is None:
        return False
    probe = torch.arange(_value(x).numel(), dtype=torch.float32).reshape(_value(x).shape)
    expected = rotate_pairs(probe)
    try:
        return torch.equal(_evaluated(node, {x: probe}, [12]).float(), expected)
    except (KeyError, RuntimeError, TypeError, ValueError, AttributeError, IndexError):
        return False


def _rope_table(node, value) -> bool:
    """Whether node is a rotary table broadcasting over value [B, N, H, D] as [N, D]: shaped [1, N, 1, D]."""
    table = _value(node)
    return table is not None and tuple(table.shape) == (1, value.shape[1], 1, value.shape[3])


def _rotary(node) -> tuple | None:
    """(x, cos, sin) when node is diffusers' apply_rotary_emb (use_real, channel pairs interleaved) of x [B, N, H, D]:
    (x.float() * cos + rotate_pairs(x).float() * sin), maybe cast, with cos / sin [1, N, 1, D]; else None."""
    node, value = _uncast(node), _value(node)
    if not (_call(node, {operator.add}) and len(node.args) == 2 and all(_call(a, {operator.mul}) for a in node.args)
            and value is not None and value.dim() == 4):
        return None
    for first, second in (node.args, node.args[::-1]):
        for x, cos in (first.args, first.args[::-1]):
            for rotated, sin in (second.args, second.args[::-1]):
                if _rope_table(cos, value) and _rope_table(sin, value) and _rotates_pairs(_uncast(rotated), _uncast(x)):
                    return _uncast(x), cos, sin
    return None


def _head_norm(node) -> tuple | None:
    """(input, "rms" | "layer", weight, bias, eps) when node is an RMSNorm with a weight (torch's, or diffusers'
    written out: `_decomposed_rms_norm`), or a LayerNorm with a weight and a bias, over the last dim, a power-of-two
    head dim (the GEMM epilogue's tile holds whole heads); else None."""
    found = _norm_call(node)
    if not found or _value(node) is None:
        return None
    _, norm, weight, bias, eps = found
    head_dim = _value(node).shape[-1]
    if weight is None or eps is None or (bias is None) == (norm == "layer") or head_dim & (head_dim - 1):
        return None
    return found


def _head_projections(operand) -> tuple | None:
    """([(fp8_linear node, heads, tokens), ...], norm, [norm weight or None per part], [norm bias ...], eps,
    [cos, sin] or []) when operand, an attention's [B, H, N, D] argument, is one head projection
    (`_head_projection`) or the single-use concatenation along tokens of several (SD3 / Flux joint attention's image
    and text parts: cat along N of [B, H, N_p, D] views, or cat along N of [B, N_p, H, D] views with the heads moved
    out after it); each part maybe normalised per head (`_head_norm`: Flux's RMSNorms, CogVideoX's LayerNorms) and
    a tokens-first concatenation maybe rotated (Flux's `_rotary`). Else None."""
    value, node = _value(operand), operand
    while _is_head_view(node) and _only_use(node):
        node = node.args[0]
    rotary = _rotary(node) if _only_use(node) else None
    rope, inner = ([rotary[1], rotary[2]], rotary[0]) if rotary else ([], node)
    if rotary and not (_value(inner) is not None and tuple(_value(inner).stride()) == tuple(_value(node).stride())):
        return None
    if not (_call(inner, {torch.cat}) and (rotary or _only_use(inner)) and value is not None
            and _value(inner) is not None and _value(inner).dim() == 4):
        norm = _head_norm(inner) if rotary or inner is operand else None  # (a heads-first norm is the operand)
        single = _head_projection(norm[0] if norm else inner if rotary else operand, tokens_first=bool(rotary),
                                  shared=bool(norm or rotary))
        norms = [norm[1:] if norm else None]
    else:
        joint = _value(inner)
        dim = _arg(inner, 1, "dim", 0) % 4
        moved = (joint.shape[0], joint.shape[2], joint.shape[1], joint.shape[3])  # [B, N, H, D] -> [B, H, N, D]
        batch, heads, tokens, head_dim = value.shape
        layouts = {2: (inner is operand, False),  # cat along N of [B, H, N_p, D]
                   1: (tuple(value.shape) == moved and tuple(value.stride()) == (  # cat of [B, N_p, H, D], then moved
                       tokens * heads * head_dim, head_dim, heads * head_dim, 1), True)}
        matches, tokens_first = layouts.get(dim, (False, False))
        if not matches or (rope and not tokens_first):
            return None
        found = [_head_norm(part) if _only_use(part) else None for part in _arg(inner, 0, "tensors", ())]
        parts = [_head_projection(norm[0] if norm else part, tokens_first, shared=bool(norm))
                 for part, norm in zip(_arg(inner, 0, "tensors", ()), found)]
        single, norms = (parts if parts and all(parts) else None), [norm[1:] if norm else None for norm in found]
    kinds = {(norm[0], norm[3]) for norm in norms if norm}  # one kind and eps for all parts
    if not single or len(kinds) > 1:
        return None
    kind, eps = next(iter(kinds), ("none", 0.0))
    return ((single if isinstance(single, list) else [single]), kind, [norm[1] if norm else None for norm in norms],
            [norm[2] if norm else None for norm in norms], eps, rope)


def fuse_attention_operands(gm: fx.GraphModule) -> int:
    """Rewrite a static-fp8 quantized attention (operand_scales given) that takes an operand straight from fp8
    linears with per-channel weight scales (`_head_projections`: q / k / v projections, joint ones concatenated)
    into attention_fp8_codes on
    laid-out operands: those linears become one linear_attention_operand per operand (the GEMMs' epilogues write the
    fp8 codes in the attention kernel's layout), the other operands attention_operand_fp8 (plain PyTorch for
    Inductor). Returns how many linears were fused."""
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or _target(node) not in _ATTENTION_OPS:
            continue
        args = _node_args(node, _target(node))
        (q, k, v, scale, _, operand_scales), (out_scale, out_split) = args[:6], (args[6:] or [None, 0])
        projections = [_head_projections(x) for x in (q, k, v)] if operand_scales is not None else []
        projections = [None if projection and any(_grouped(_node_args(linear, fxq.fp8_linear.default)[3])
                                                  for linear, _, _ in projection[0]) else projection
                       for projection in projections]  # (V's transposed product has no group-wise K loop)
        if not any(projections):
            continue
        with gm.graph.inserting_before(node):
            operands = []
            for index, (x, projection) in enumerate(zip((q, k, v), projections)):
                operand_scale = _with_example_value(gm.graph.call_function(torch.select, (operand_scales, 0, index)))
                if projection is None:
                    call = (fxq.attention_operand_fp8.default, (x, operand_scale, index == 2))
                else:
                    parts, norm, norm_weight, norm_bias, eps, rope = projection
                    linears = [_node_args(linear, fxq.fp8_linear.default)[:5] for linear, _, _ in parts]
                    tables = [_with_example_value(gm.graph.call_function(torch.reshape, (
                        table, (sum(part[2] for part in parts), _value(x).shape[-1])))) for table in rope]
                    call = (fxq.linear_attention_operand.default, (
                        *map(list, zip(*linears)), operand_scale, parts[0][1], [part[2] for part in parts],
                        index == 2, norm, norm_weight, norm_bias, eps, tables))
                operands.append(_with_example_value(gm.graph.call_function(*call)))
            codes = gm.graph.call_function(fxq.attention_fp8_codes.default, (
                *operands, _value(q).shape[-1], scale, operand_scales, _value(q).dtype, out_scale, out_split))
        codes.meta.update(node.meta)
        node.replace_all_uses_with(codes)
        gm.graph.erase_node(node)
        fused += sum(len(projection[0]) for projection in projections if projection)
    return _cleaned(gm, fused)


def _plus_one_of(node) -> bool:
    """node is `1 + x` or `x + 1`."""
    return _binary(node, _ADD) and 1 in [arg for arg in node.args if isinstance(arg, (int, float))]


def _chunk_parts(node) -> list[fx.Node] | None:
    """The getitem nodes of node's only use when that is `node.chunk(G, dim=1)` of a [B, G, C] value taken apart
    whole (every use an integer getitem), else None."""
    value, users = _value(node), list(node.users)
    if value is None or value.dim() != 3 or len(users) != 1:
        return None
    chunk = users[0]
    if not (_call_or_method(chunk, {torch.chunk}, "chunk") and chunk.args[1:2] == (value.shape[1],)
            and _arg(chunk, 2, "dim", 0) in (1, -2)):
        return None
    parts = list(chunk.users)
    return parts if all(_call(part, {operator.getitem}) and isinstance(part.args[1], int) for part in parts) else None


def fuse_modulation_tables(gm: fx.GraphModule) -> int:
    """Rewrite `(table + embedding).chunk(G, dim=1)` (adaLN-single: PixArt's per-block modulation) whose every part
    goes to fxquant ops, directly or as `1 + part`, into one modulation_table node with those 1s folded in; returns
    how many. Inductor then writes the G vectors with one kernel and hands the fused kernels views of its buffer,
    where it computed each part (and each `1 + part`) in a kernel of its own, re-adding its slice of the sum."""
    fused = 0
    for node in list(gm.graph.nodes):
        if not (_binary(node, _ADD) and all(_value(arg) is not None for arg in node.args)):
            continue
        parts = _chunk_parts(node)
        if not parts:
            continue
        plus_one, folded = [], []
        for part in parts:
            uses = list(part.users)
            if len(uses) == 1 and _plus_one_of(uses[0]) and uses[0].users and all(
                    _is_fxquant(use) for use in uses[0].users):
                plus_one.append(part.args[1])
                folded.append((uses[0], part))
            elif not (uses and all(_is_fxquant(use) for use in uses)):
                break
        else:
            with gm.graph.inserting_before(node):
                table = _with_example_value(gm.graph.call_function(fxq.modulation_table.default,
                                                                   (*node.args, sorted(plus_one))))
            node.replace_all_uses_with(table)
            gm.graph.erase_node(node)
            for one_plus, part in folded:
                one_plus.replace_all_uses_with(part)
                gm.graph.erase_node(one_plus)
            fused += 1
    return _cleaned(gm, fused)


def _token_ranges(node) -> list[tuple[int, int, fx.Node]] | None:
    """[(start, stop, slice node), ...] when every use of node ([B, N, C]) takes a range of its tokens (dim 1):
    `x[:, a:b]` (SD3's joint attention) or the parts of `x.split_with_sizes(sizes, dim=1)` (Flux's) or of
    `x.split(sizes, dim=1)` (CogVideoX's); else None."""
    value = _value(node)
    users = list(node.users)
    if value is None or value.dim() != 3:
        return None
    split = users[0] if len(users) == 1 else None
    if split is not None and (split.op == "call_method" and split.target in ("split", "split_with_sizes") or _call(
            split, {torch.split, torch.Tensor.split, torch.Tensor.split_with_sizes})) and _arg(split, 2, "dim", 0) in (
            1, -2):
        sizes = _arg(split, 1, "split_sizes", split.kwargs.get("split_size"))
        sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [None]  # (one int: equal pieces, not matched)
        parts = list(split.users)
        if not all(isinstance(size, int) for size in sizes) or not all(
                _call(part, {operator.getitem}) and isinstance(part.args[1], int) for part in parts):
            return None
        starts = [sum(sizes[:index]) for index in range(len(sizes))]
        return [(starts[part.args[1]], starts[part.args[1]] + sizes[part.args[1]], part) for part in parts]
    ranges = [(*_token_range(user), user) for user in users if _token_range(user)]
    return ranges if len(ranges) == len(users) else None


_SELECTIONS = {"index_select", "reshape", "view", "to", "float", "contiguous", "squeeze", "unsqueeze"}
_SELECTION_FUNCTIONS = {operator.getitem, torch.index_select, torch.reshape, torch.select}


def _hoist(node, before: fx.Node, position: dict) -> bool:
    """Move node, and what it needs, in front of `before` (position: each node's place in the graph) when it comes
    after it; only selections and views move (how a static scale is picked from its buffer, per timestep group).
    Returns whether node is now in front of before."""
    if not isinstance(node, fx.Node) or position[node] < position[before]:
        return True
    selection = node.op == "call_method" and node.target in _SELECTIONS or _call(node, _SELECTION_FUNCTIONS)
    if not (selection and all(_hoist(arg, before, position) for arg in node.all_input_nodes)):
        return False
    before.prepend(node)
    position[node] = position[before] - 0.5
    return True


def fuse_split_attention_output_quantization(gm: fx.GraphModule) -> int:
    """Rewrite a quantized attention whose output, through views, is cut into two token ranges, each quantized
    statically for its own output projection (SD3 / Flux joint attention: image and text streams; recipe option
    static_attention_outputs), into one quantized_attention_codes with the two scales split at the boundary: the
    attention kernel writes both projections' codes. The scales' selection moves in front of the attention. Returns
    how many."""
    fused = 0
    for attention in [n for n in gm.graph.nodes if n.op == "call_function"
                      and _target(n) == fxq.quantized_attention.default]:
        chain, node = [], attention
        while len(node.users) == 1 and (_is_head_view(next(iter(node.users))) or _no_op_cast(next(iter(node.users)))):
            node = next(iter(node.users))
            chain.append(node)
        ranges = _token_ranges(node)
        quantizations = []
        for start, stop, part in sorted(ranges or [], key=lambda found: found[0]):
            quantize = part
            while len(quantize.users) == 1 and _row_view(next(iter(quantize.users))):
                quantize = next(iter(quantize.users))
            quantize = next(iter(quantize.users)) if len(quantize.users) == 1 else None
            if quantize is None or _target(quantize) != fxq.quantize_per_tensor_fp8.default:
                break
            quantizations.append((start, stop, quantize))
        if len(quantizations) != 2 or quantizations[0][:2] != (0, quantizations[1][0]) or (
                quantizations[1][1] != _value(node).shape[1]):
            continue
        position = {n: index for index, n in enumerate(gm.graph.nodes)}
        after = attention.next
        scales = [_node_args(quantize, fxq.quantize_per_tensor_fp8.default)[1] for _, _, quantize in quantizations]
        if not all(_hoist(scale, after, position) for scale in scales):
            continue
        with gm.graph.inserting_before(after):
            both = gm.graph.call_function(torch.cat, ([gm.graph.call_function(torch.reshape, (scale, (-1,)))
                                                       for scale in scales],))
            codes = gm.graph.call_function(fxq.quantized_attention_codes.default, (
                *_node_args(attention, fxq.quantized_attention.default), both, quantizations[0][1]))
        codes.meta.update(attention.meta)
        attention.replace_all_uses_with(codes)
        gm.graph.erase_node(attention)
        for view in chain:  # a cast of the codes would change them: the no-op casts go
            if view.op == "call_method" and view.target == "to":
                view.replace_all_uses_with(view.args[0])
                gm.graph.erase_node(view)
        for _, _, quantize in quantizations:  # the rows it quantized are codes now
            quantize.replace_all_uses_with(_node_args(quantize, fxq.quantize_per_tensor_fp8.default)[0])
            gm.graph.erase_node(quantize)
        fused += 1
    return _cleaned(gm, fused)


# The launchers import Triton lazily: the backend also serves CPU-only installs, where Triton may be absent.
def _triton_int8_linear(x_q, x_scale, x_zero, w_q, w_scale, w_sum, bias, out_dtype):
    from .gemm import quantized_gemm

    return quantized_gemm(x_q, x_scale, x_zero, w_q, w_scale, w_sum, bias, out_dtype, traced=True)


def _triton_packed_int8_linear(x_q, x_scale, x_zero, w_packed, weight_bits, w_scale, w_sum, bias, out_dtype):
    from .gemm import quantized_gemm

    return quantized_gemm(x_q, x_scale, x_zero, w_packed, w_scale, w_sum, bias, out_dtype, weight_bits, traced=True)


def _triton_fp8_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    from .gemm import quantized_gemm

    return quantized_gemm(x_q, x_scale, None, w_q, w_scale, None, bias, out_dtype, traced=True)


def _triton_packed_fp8_linear(x_q, x_scale, w_packed, weight_bits, w_scale, bias, out_dtype):
    from .gemm import quantized_gemm

    return quantized_gemm(x_q, x_scale, None, w_packed, w_scale, None, bias, out_dtype, weight_bits, traced=True)


def _triton_linear_residual(x_q, x_scale, x_zero, w, weight_bits, w_scale, w_sum, bias, gate, residual):
    from .gemm import quantized_gemm

    return quantized_gemm(x_q, x_scale, x_zero, w, w_scale, w_sum, bias, residual.dtype, weight_bits, traced=True,
                          gate=gate, residual=residual)


def _triton_linear_residual_parts(x_q, x_scale, x_zero, w, weight_bits, w_scale, w_sum, bias, head_gate,
                                  head_residual, tail_gate, tail_residual):
    from .gemm import quantized_gemm

    return quantized_gemm(x_q, x_scale, x_zero, w, w_scale, w_sum, bias, head_residual.dtype, weight_bits,
                          traced=True, gate=head_gate, residual=head_residual, tail=(tail_gate, tail_residual))


def _triton_linear_activation_quantize(x_q, x_scale, x_zero, w, weight_bits, w_scale, w_sum, bias, activation,
                                       out_scale, out_zero):
    from .gemm import quantized_gemm

    return quantized_gemm(x_q, x_scale, x_zero, w, w_scale, w_sum, bias, torch.float32, weight_bits, traced=True,
                          activation=activation, out_scale=out_scale, out_zero=out_zero)


def _triton_quantized_attention(q, k, v, scale, pv_fp8, operand_scales):
    from .attention import quantized_attention

    return quantized_attention(q, k, v, scale, pv_fp8, operand_scales, traced=True)


def _triton_quantized_attention_codes(q, k, v, scale, pv_fp8, operand_scales, out_scale, out_split):
    from .attention import quantized_attention

    return quantized_attention(q, k, v, scale, pv_fp8, operand_scales, traced=True, out_scale=out_scale,
                               out_split=out_split)


def _triton_linear_attention_operand(x_q, x_scale, w_q, w_scale, bias, scale, heads, tokens, keys_major, norm,
                                     norm_weight, norm_bias, norm_eps, rope, weight_bits):
    from .gemm import attention_operand_gemm

    return attention_operand_gemm(x_q, x_scale, w_q, w_scale, bias, scale, heads, tokens, keys_major, norm,
                                  norm_weight, norm_bias, norm_eps, rope, weight_bits, traced=True)


def _triton_attention_fp8_codes(q, k, v, head_dim, scale, operand_scales, out_dtype, out_scale, out_split):
    from .attention import attention_fp8_codes

    return attention_fp8_codes(q, k, v, head_dim, scale, operand_scales, out_dtype, out_scale, out_split,
                               traced=True)


def _triton_int8_conv2d(x, act_scale, act_zero, w_q, w_scale, w_sum, bias, stride, padding, dilation):
    from .conv import quantized_conv2d

    return quantized_conv2d(x, act_scale, act_zero, w_q, w_scale, w_sum, bias, stride, padding, dilation, traced=True)


def _triton_fp8_conv2d(x, act_scale, w_q, w_scale, bias, stride, padding, dilation):
    from .conv import quantized_conv2d

    return quantized_conv2d(x, act_scale, None, w_q, w_scale, None, bias, stride, padding, dilation, traced=True)


def _triton_fused_quantize_per_token(x, weight, bias, mul, add, norm, eps, activation, fp8):
    from .quantize import fused_quantize_per_token

    return fused_quantize_per_token(x, weight, bias, mul, add, norm, eps, activation, fp8, traced=True)


def _triton_fused_quantize_concat(head, tail, weight, bias, head_mul, head_add, tail_mul, tail_add, norm, eps,
                                  activation, fp8):
    from .quantize import fused_quantize_per_token

    return fused_quantize_per_token(head, weight, bias, head_mul, head_add, norm, eps, activation, fp8, traced=True,
                                    tail=tail, tail_mul=tail_mul, tail_add=tail_add)


def _triton_modulation_table(table, embedding, plus_one):
    from .quantize import modulation_table

    return modulation_table(table, embedding, plus_one, traced=True)


def _triton_quantize_per_token(x):
    from .quantize import quantize_per_token

    return quantize_per_token(x, traced=True)


def _triton_quantize_per_token_fp8(x):
    from .quantize import quantize_per_token_fp8

    return quantize_per_token_fp8(x, traced=True)


# CUDA: fxquant op -> the function Inductor traces in its place
_QUANTIZE_BODIES = {  # plain PyTorch, which Inductor fuses into the ops producing the input
    fxq.quantize_per_token.default: quantize_per_token_reference,
    fxq.quantize_per_token_fp8.default: quantize_fp8,
}


def _unpack_int2(packed: torch.Tensor) -> torch.Tensor:
    return unpack_bits(packed, 2)


_UNPACK_BODIES = {  # unpacking left after fuse_packed_weights (the nested weight planes of a mixed-precision layer,
    # recombined per timestep group): plain PyTorch, which Inductor fuses into the recombination
    fxq.unpack_int4.default: unpack_int4,
    fxq.unpack_int2.default: _unpack_int2,
    fxq.unpack_fp8_codes.default: unpack_fp8_layer_e4m3,  # (joint) attention operand weights of mixed bits
}
_KERNELS = {  # fxquant's Triton kernels, launched from Inductor's generated code
    fxq.quantize_per_token.default: _triton_quantize_per_token,
    fxq.quantize_per_token_fp8.default: _triton_quantize_per_token_fp8,
    fxq.int8_linear.default: _triton_int8_linear,
    fxq.packed_int8_linear.default: _triton_packed_int8_linear,
    fxq.fp8_linear.default: _triton_fp8_linear,
    fxq.packed_fp8_linear.default: _triton_packed_fp8_linear,
    fxq.linear_residual.default: _triton_linear_residual,
    fxq.linear_residual_parts.default: _triton_linear_residual_parts,
    fxq.linear_activation_quantize.default: _triton_linear_activation_quantize,
    fxq.quantized_attention.default: _triton_quantized_attention,
    fxq.quantized_attention_codes.default: _triton_quantized_attention_codes,
    fxq.linear_attention_operand.default: _triton_linear_attention_operand,
    fxq.attention_fp8_codes.default: _triton_attention_fp8_codes,
    fxq.int8_conv2d.default: _triton_int8_conv2d,
    fxq.fp8_conv2d.default: _triton_fp8_conv2d,
    fxq.fused_quantize_per_token.default: _triton_fused_quantize_per_token,
    fxq.fused_quantize_concat.default: _triton_fused_quantize_concat,
    fxq.modulation_table.default: _triton_modulation_table,
}


def use_gluon_attention(gm: fx.GraphModule) -> int:
    """Point every attention_fp8_codes node at gluon_attention_fp8_codes (same arguments and result), which stays an
    opaque op call (Gluon kernels take TMA descriptors made on the host per call); returns how many."""
    nodes = [node for node in gm.graph.nodes
             if node.op == "call_function" and _target(node) == fxq.attention_fp8_codes.default]
    for node in nodes:
        node.target = fxq.gluon_attention_fp8_codes.default
    gm.recompile()
    return len(nodes)


_ON_CODES = (fxq.attention_fp8_codes.default, fxq.gluon_attention_fp8_codes.default)  # laid-out fp8 operands


def lower_to_inductor(gm: fx.GraphModule, fuse_quantize: bool = False, inline_kernels: bool = True) -> int:
    """Point every fxquant op that has a CUDA rewrite at it (arguments in schema order); returns how many.
    Static per-tensor quantization, attention operand layouts and unpacking (pointwise) always go to Inductor as
    plain PyTorch."""
    rewrites = {fxq.quantize_per_tensor.default: quantize_asymmetric,
                fxq.quantize_per_tensor_fp8.default: quantize_fp8_with_scale,
                fxq.attention_operand_fp8.default: attention_operand_reference, **_UNPACK_BODIES,
                **(_KERNELS if inline_kernels else {}),
                **(_QUANTIZE_BODIES if fuse_quantize else {})}
    lowered = 0
    for node in gm.graph.nodes:
        op = _target(node) if node.op == "call_function" else None
        if op in rewrites:
            node.args, node.kwargs = tuple(_node_args(node, op)), {}
            node.target = rewrites[op]
            lowered += 1
    gm.recompile()
    return lowered


def tune_attention(gm: fx.GraphModule) -> int:
    """Autotune the attention kernel for every quantized_attention shape in the graph (real launches on random
    operands, before Inductor traces the graph); returns how many attention nodes were seen. (gluon_attention_fp8_codes
    nodes are opaque calls: their Triton fallback autotunes at its first launch.)"""
    from .attention import tune

    seen = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or _target(node) not in (*_ATTENTION_OPS, fxq.attention_fp8_codes.default):
            continue
        args = _node_args(node, _target(node))
        q_value, k_value = args[0].meta["example_value"], args[1].meta["example_value"]
        if _target(node) == fxq.attention_fp8_codes.default:  # laid-out fp8 operands, static scales
            head_dim, pv_fp8, static, dtype = args[3], True, True, args[6]
        else:
            head_dim, pv_fp8, static, dtype = q_value.shape[3], args[4], args[5] is not None, q_value.dtype
        sizes = (*q_value.shape[:3], k_value.shape[2], head_dim)
        if all(isinstance(size, int) for size in sizes):  # dynamic shapes keep the fixed tile config
            tune(*sizes, pv_fp8, static, dtype)
        seen += 1
    return seen


def concatenates_fp8_values(gm: fx.GraphModule) -> bool:
    """Whether a quantized attention with fp8 P V takes values concatenated from two streams (SD3 / Flux joint
    attention). Inductor then fuses the concatenation into the fp8 V operand's transpose and, without N-d tiling,
    reads it uncoalesced: 103 us per SD3-medium block against 16 us with `triton.prefer_nd_tiling`
    (gpu-bench-h100/v-operand-inductor-tiling.json; SD3 end to end 1.299x -> 1.369x bf16 compile)."""
    for node in gm.graph.nodes:
        attention = node.op == "call_function" and _target(node) in (*_ATTENTION_OPS, *_ON_CODES)
        args = _node_args(node, _target(node)) if attention else None
        if args and (_target(node) in _ON_CODES or args[4]):  # fp8 P V
            values = args[2]
            if _call(values, {fxq.attention_operand_fp8.default}):
                values = values.args[0]
            while _is_head_view(values):
                values = values.args[0]
            if _call(values, {torch.cat}):
                return True
    return False


def _on_cuda(example_inputs) -> bool:
    return any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)


BACKEND_OPTIONS = {
    "fxquant.inline_kernels": "trace fxquant's Triton kernels into Inductor's graph (default True without CUDA graphs; "
                              "with them, mode='reduce-overhead' / 'max-autotune' or triton.cudagraphs, False: opaque "
                              "op calls, as fast inside a graph and compiled in about half the time)",
    "fxquant.fuse_prologues": "fuse the norm / modulation / activation producing a per-token quantization's input "
                              "into it (True)",
    "fxquant.fuse_residuals": "apply a per-sample gate and the residual add after a quantized linear in its GEMM's "
                              "epilogue (True)",
    "fxquant.fuse_residual_parts": "the same per token part where the linear's output is cut in two (CogVideoX's text "
                                   "and video rows; False: measured 0.87-0.95x the GEMM + Inductor's pass on an H200)",
    "fxquant.fuse_activations": "apply a GELU / SiLU and a static per-tensor quantization after a quantized linear "
                                "in its GEMM's epilogue (True)",
    "fxquant.fuse_modulation_tables": "compute adaLN-single's modulation vectors (PixArt's scale_shift_table + the "
                                       "timestep embedding, chunked) in one op when fxquant's kernels take every "
                                       "chunk (True)",
    "fxquant.fuse_attention_outputs": "have a quantized attention write its output projection's fp8 codes when that "
                                      "projection takes static activations (True)",
    "fxquant.fuse_attention_operands": "have the fp8 q / k / v projections of a static-fp8 quantized attention write "
                                       "its operands' codes in the kernel's layout from their GEMM epilogues (True)",
    "fxquant.gluon_attention": "run static fp8 attentions on operands the GEMM epilogues wrote by the Gluon kernel "
                               "that keeps its MMAs in flight across the softmax (Hopper, head dims 64 and 128), "
                               "else by the Triton kernel (default: only under CUDA graphs; measured on an H100 as "
                               "CUDA-graph replays, CogVideoX-2B 1.46x bf16 compile against 1.39x, the Flux stack "
                               "1.438x against 1.422x, SD3 1.472x against 1.462x; plain calls are slower, SD3 34.1 ms "
                               "against 31.6: the op takes 160-330 us of host time per call, where Inductor launches "
                               "the traced Triton kernel from its own code)",
    "fxquant.fuse_quantize": "hand per-token quantization to Inductor as plain PyTorch, fused with the ops producing "
                             "its input (False: fxquant's one-pass quantize kernel, measured faster on Hopper)",
}


_ARITHMETIC_METHODS = {"add": operator.add, "__add__": operator.add, "mul": operator.mul, "__mul__": operator.mul,
                       "div": operator.truediv, "__truediv__": operator.truediv}


def normalize_arithmetic(gm: fx.GraphModule) -> int:
    """Rewrite tensor-method arithmetic (`x.div(c)`, `x.__mul__(g)`: how Dynamo records operators inside a torch
    function mode such as fxquant's attention mode) as the operator calls the pattern rewrites match; returns how
    many."""
    rewritten = 0
    for node in gm.graph.nodes:
        if node.op == "call_method" and node.target in _ARITHMETIC_METHODS and len(node.args) == 2 and not node.kwargs:
            node.op, node.target = "call_function", _ARITHMETIC_METHODS[node.target]
            rewritten += 1
    gm.recompile()
    return rewritten


def graph_modules(gm: fx.GraphModule) -> list[tuple[fx.GraphModule, int]]:
    """(graph module, how many times one run of gm runs it): gm itself, then each subgraph its invoke_subgraph calls
    run (`QuantizedModel.nest_blocks`: one per distinct repeated block), each once, nested ones too."""
    times: dict[fx.GraphModule, int] = {}

    def visit(graph: fx.GraphModule) -> None:
        times[graph] = times.get(graph, 0) + 1
        for node in graph.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.higher_order.invoke_subgraph:
                visit(getattr(graph, node.args[0].target))

    visit(gm)
    return list(times.items())


def fxquant_backend(gm: fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    """Dynamo backend: graph module + example inputs (+ torch.compile's mode / options) -> a callable.

    options: Inductor's, plus BACKEND_OPTIONS (e.g. `options={"fxquant.inline_kernels": False}`)."""
    ours, config_patches = split_options(mode, options)
    unknown = set(ours) - set(BACKEND_OPTIONS)
    if unknown:
        raise ValueError(f"Unknown fxquant backend options {sorted(unknown)}; known: {BACKEND_OPTIONS}")
    compile_counter["graphs"] += 1
    graphs = graph_modules(gm)

    def apply(counter: str, rewrite, *args) -> None:  # to gm and each nested region, counted per call of it
        compile_counter[counter] += sum(times * rewrite(graph, *args) for graph, times in graphs)

    apply("fxquant_ops", lambda graph: sum(1 for node in graph.graph.nodes if _is_fxquant(node)))
    apply("attention_ops", lambda graph: sum(1 for node in graph.graph.nodes if _is_fxquant(node) and
                                             _target(node) == fxq.quantized_attention.default))
    apply("normalized_arithmetic", normalize_arithmetic)
    apply("shared_quantizations", deduplicate_quantization)
    apply("packed_linears", fuse_packed_weights)
    if ours.get("fxquant.fuse_prologues", True):
        apply("fused_prologues", fuse_quantize_prologues)
        apply("shared_quantizations", deduplicate_quantization)  # one prologue for several linears (SD3's adaLN)
    if ours.get("fxquant.fuse_residuals", True):
        apply("fused_residuals", fuse_residual_epilogues)
    if ours.get("fxquant.fuse_residual_parts", False):
        apply("fused_residual_parts", fuse_residual_part_epilogues)
    apply("distributed_quantizations", distribute_static_quantization)
    if ours.get("fxquant.fuse_activations", True):
        apply("fused_activations", fuse_activation_epilogues)
    if ours.get("fxquant.fuse_attention_outputs", True):
        apply("fused_attention_outputs", fuse_attention_output_quantization)
        apply("fused_split_attention_outputs", fuse_split_attention_output_quantization)
    if ours.get("fxquant.fuse_attention_operands", True):
        apply("fused_attention_operands", fuse_attention_operands)
    apply("packed_linears", fuse_packed_e4m3_weights)
    if ours.get("fxquant.fuse_modulation_tables", True):
        apply("modulation_tables", fuse_modulation_tables)
    if gluon_attention(ours, config_patches):
        apply("gluon_attentions", use_gluon_attention)
    if not _on_cuda(example_inputs):
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    if any(concatenates_fp8_values(graph) for graph, _ in graphs):
        config_patches = {"triton.prefer_nd_tiling": True, **config_patches}
    inline = inline_kernels(ours, config_patches)
    if inline:
        apply("tuned_attention", tune_attention)
        memoize_access_analysis()
    apply("lowered_ops", lower_to_inductor, ours.get("fxquant.fuse_quantize", False), inline)
    return compile_fx(gm, example_inputs, config_patches=config_patches)


def split_options(mode: str | None, options: dict | None) -> tuple[dict, dict]:
    """torch.compile's mode and options -> (fxquant's options as booleans, Inductor's config patches: the mode's
    settings overridden by the other options)."""
    options = dict(options or {})
    ours = {key: bool(options.pop(key)) for key in list(options) if key.startswith("fxquant.")}
    if mode:
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode), **options}
    return ours, options


def gluon_attention(ours: dict, config_patches: dict) -> bool:
    """Whether static fp8 attentions go to the Gluon kernel's op: the `fxquant.gluon_attention` option if given, else
    only under CUDA graphs (Inductor's `triton.cudagraphs`), where it was measured faster; its plain calls were slower
    (BACKEND_OPTIONS says by how much)."""
    return ours.get("fxquant.gluon_attention", config_patches.get("triton.cudagraphs", False))


def inline_kernels(ours: dict, config_patches: dict) -> bool:
    """Whether to trace fxquant's kernels into Inductor's graph: the `fxquant.inline_kernels` option if given, else
    only without CUDA graphs (Inductor's `triton.cudagraphs`, on in modes "reduce-overhead" and "max-autotune").
    Inside a CUDA graph opaque op calls replay as fast as traced kernels (PixArt-alpha 1024 on an H100: 27.72 ms,
    1.133x bf16 compile, both ways) and compile in about half the time (first call 70-88 s vs 137-200 s); outside one,
    each costs a Python dispatch (plain calls 116 ms vs 28 ms)."""
    return ours.get("fxquant.inline_kernels", not config_patches.get("triton.cudagraphs", False))

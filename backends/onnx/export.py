"""`fxquant.export_onnx`: a QuantizedModel -> an ONNX graph that ONNX Runtime runs on integer kernels.

torch.onnx's dynamo exporter captures the quantized model (the QuantizedModel wrapper included, so a timestep-group
index is computed from the timestep input inside the graph) and translates each fxquant op with
`translations.translation_table`; the plan's scales, zero points and packed weights go in unchanged as initializers.
The integer products' right operands (weight codes, attention's K^T) stay int8, or become uint8 codes + 128 with zero
point 128 where ORT's u8 x s8 kernels saturate (`weight_codes`, `saturating_u8s8`). The result is checked with
onnx.checker (full check) and saved, with external data beside it when the weights exceed 1 GB (protobuf caps a file
at 2 GB).
"""

from __future__ import annotations

import inspect
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxscript import ir

from ...errors import FxquantError
from ...model import QuantizedModel
from ...modules import QuantLinear, combined_weight_sums
from .translations import ACT_FORMS, translation_table

PROTOBUF_LIMIT = 2 * 1024**3
OUTPUT_NAME = "sample"


def _check_exportable(qmodel: QuantizedModel) -> None:
    if not isinstance(qmodel, QuantizedModel):
        raise FxquantError(f"export_onnx expects a fxquant.QuantizedModel, got {type(qmodel).__name__}.")
    fp8 = [layer.fqn for layer in qmodel.plan.quantized_layers() if layer.number_format == "fp8"]
    if fp8:
        raise FxquantError(f"export_onnx: {len(fp8)} layers run in fp8 (e.g. {fp8[0]!r}); ONNX Runtime's CPU "
                           "provider has no fp8 matmul. Export an int8 recipe (w8a8, w4a8, ...).")
    fp8_attention = [layer for layer in qmodel.plan.quantized_attention() if layer.attention_format != "int8"]
    if fp8_attention:
        raise FxquantError(f"export_onnx: this plan runs attention in fp8 (recipe attention="
                           f"{fp8_attention[0].attention_format!r}), which ONNX Runtime's CPU provider cannot run; "
                           "quantize with attention='int8' (integer Q K^T) or attention=None to export.")
    float_types = {t.dtype for t in list(qmodel.parameters()) + list(qmodel.buffers())}
    if float_types & {torch.float16, torch.bfloat16}:
        raise FxquantError(f"export_onnx needs a float32 model on the CPU (ORT's integer kernels take float32 "
                           f"activations); this one holds {sorted(map(str, float_types))}. Quantize the float32 model.")


def _uniform_cast_types(program) -> None:
    """Give every Cast output the type its `to` attribute says: the fxquant translations carry activations as uint8
    (ORT's fast u8 x s8 path) where the torch op declares int8, and the exporter copies the declared types."""
    for node in program.model.graph:
        if node.op_type == "Cast":
            node.outputs[0].dtype = ir.DataType(node.attributes["to"].value)


def _constant(value: np.ndarray) -> ir.Node:
    return ir.Node("", "Constant", [], [ir.AttrTensor("value", ir.tensor(value))])


def _cast(value: ir.Value, dtype: ir.DataType) -> ir.Node:
    node = ir.Node("", "Cast", [value], [ir.AttrInt64("to", dtype)])
    node.outputs[0].dtype, node.outputs[0].shape = dtype, value.shape
    return node


def _unsigned_right_operands(program) -> None:
    """Every MatMulInteger / ConvInteger whose right operand is int8 (weight codes; attention's K^T) gets it as uint8
    codes + 128 with zero point 128 (their symmetric codes have none): ORT's u8 x u8 kernels, exact where its u8 x s8
    ones saturate. On weights ORT folds the shift into the initializer; on K^T it is an elementwise pass per call."""
    graph = program.model.graph
    for node in list(graph):
        if node.op_type not in ("MatMulInteger", "ConvInteger") or node.inputs[1].dtype != ir.DataType.INT8:
            continue
        assert len(node.inputs) < 4 or node.inputs[3] is None, f"{node.name}: int8 codes with a zero point"
        wide = _cast(node.inputs[1], ir.DataType.INT32)
        shift = _constant(np.array(128, np.int32))
        shifted = ir.Node("", "Add", [wide.outputs[0], shift.outputs[0]])
        unsigned = _cast(shifted.outputs[0], ir.DataType.UINT8)
        zero = _constant(np.array(128, np.uint8))
        graph.insert_before(node, [wide, shift, shifted, unsigned, zero])
        node.resize_inputs(4)
        node.replace_input_with(1, unsigned.outputs[0])
        node.replace_input_with(3, zero.outputs[0])


class _PositionalInputs(torch.nn.Module):
    """Calls the module with the example's tensors given positionally and its other kwargs fixed: torch.export's
    dynamic shapes cannot describe QuantizedModel.forward(*args, **kwargs)'s keywords."""

    def __init__(self, module: torch.nn.Module, names: list[str], constants: dict[str, Any]):
        super().__init__()
        self.module = module
        self.names = names
        self.constants = constants

    def forward(self, *tensors):
        return self.module(**dict(zip(self.names, tensors)), **self.constants)


def _split_inputs(model: torch.nn.Module, example_kwargs: dict[str, Any]) -> tuple[dict, dict]:
    """(tensor kwargs, other kwargs), with return_dict=False when forward takes it (the graph returns a tensor)."""
    tensors = {k: v for k, v in example_kwargs.items() if isinstance(v, torch.Tensor)}
    constants = {k: v for k, v in example_kwargs.items() if k not in tensors}
    if "return_dict" in inspect.signature(model.forward).parameters:
        constants["return_dict"] = False
    return tensors, constants


WEIGHT_CODES = ("auto", "int8", "uint8")


def saturating_u8s8(cpuinfo: str | None = None) -> bool:
    """Whether ONNX Runtime's u8 x s8 integer GEMM can saturate on this CPU: x86 without VNNI, whose AVX2 / AVX-512
    kernels add pairs of u8 x s8 products in int16 (vpmaddubsw). Measured on an AVX2 EPYC: a MatMulInteger of
    random full-range codes 9.8 % off exact, and fxquant's tiny PixArt 3.9 % off torch; u8 x u8 exact. cpuinfo:
    /proc/cpuinfo's text (read when None; an x86 CPU whose flags cannot be read counts as saturating)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpuinfo.split())


def export_onnx(qmodel: QuantizedModel, path: str | Path, example_kwargs: dict[str, Any],
                act_form: str = "per_token", dynamic_batch: bool = True, weight_codes: str = "auto") -> Path:
    """Export `qmodel` called with `example_kwargs` to `path` (.onnx); returns the path.

    act_form: "per_token" (fxquant's per-token activations, exact), "per_token_symmetric" (one scale per token, zero
    point fixed: no correction term, faster) or "per_tensor" (ORT's DynamicQuantizeLinear); the two faster forms
    change the numbers at a measured cost; see fxquant.backends.onnx.translations. dynamic_batch: the first dimension of
    the first tensor input (the latent) and of every tensor input of the same size is symbolic (CFG doubling, other
    batch sizes; give an example whose batch differs from other leading sizes); other dimensions are fixed.
    Graph inputs are the tensor kwargs by name; the single output is named "sample".
    weight_codes: the integer products' right operands (weight codes, K^T) as "int8" (ORT's u8 x s8 kernels, VNNI's
    fast path), "uint8" (codes + 128 with zero point 128: u8 x u8 kernels, exact on every CPU, slower with VNNI) or
    "auto": uint8 where ORT's u8 x s8 kernels saturate on this CPU (`saturating_u8s8`), else int8.
    """
    _check_exportable(qmodel)
    if act_form not in ACT_FORMS:
        raise FxquantError(f"act_form must be one of {ACT_FORMS}, got {act_form!r}.")
    if weight_codes not in WEIGHT_CODES:
        raise FxquantError(f"weight_codes must be one of {WEIGHT_CODES}, got {weight_codes!r}.")
    if weight_codes == "auto":
        weight_codes = "uint8" if saturating_u8s8() else "int8"
    columns = zero_point_columns(qmodel) if act_form == "per_token" else {}
    return _export(qmodel, qmodel.model, path, example_kwargs, translation_table(act_form, columns), dynamic_batch,
                   {"fxquant_act_form": act_form, "fxquant_weight_codes": weight_codes,
                    "fxquant_zero_point_columns": json.dumps(sorted(
                        ([list(key) if isinstance(key, tuple) else key, count] for key, count in columns.items()),
                        key=str)),
                    "fxquant_plan": qmodel.plan.to_json()}, unsigned_weights=weight_codes == "uint8")


def zero_point_columns(qmodel: QuantizedModel) -> dict[tuple[int, int] | str, int]:
    """Extra GEMM columns that carry per-token zero points into ORT's integer GEMM (translations'
    `_augmented_product`): enough int8 weight rows to sum to -w_sum. Keyed per layer by the name its stored weight
    codes get in the exported graph (`weight_placeholder`: that layer's own sums), and per (N, K) weight shape for
    weights the graph computes (nested mixed-precision planes: every timestep group's sums) or whose name the exporter
    spells differently: the largest of every per-token integer linear of that shape (static-activation linears have
    one zero point, which MatMulInteger takes). Counts above K / 4 are left out (those layers keep the float
    correction term)."""
    largest: dict[tuple[int, int], int] = {}
    columns: dict[tuple[int, int] | str, int] = {}
    for fqn, module in qmodel.model.named_modules():
        if (isinstance(module, QuantLinear) and module.weight_sum is not None and not module.inputs_per_scale
                and module.act_scale is None):
            sums = module.weight_sum if module.weight_sum.dim() == 1 else combined_weight_sums(
                module.weight_sum, module.plane_multipliers)  # nested planes: every timestep group's codes
            shape, layer_largest = (module.out_features, module.in_features), int(sums.abs().max())
            largest[shape] = max(largest.get(shape, 0), layer_largest)
            if module.weight_sum.dim() == 1:
                columns[weight_placeholder(fqn)] = _columns_for(layer_largest, module.in_features)
    columns.update({shape: _columns_for(value, shape[1]) for shape, value in largest.items()})
    return {key: count for key, count in columns.items() if count}


def _columns_for(largest_sum: int, in_features: int) -> int:
    """int8 rows (127 each) that sum to the largest |w_sum|; 0 when more than K / 4 would be needed."""
    count = -(-largest_sum // 127)
    return count if count <= in_features // 4 else 0


def weight_placeholder(fqn: str) -> str:
    """The graph input name torch.export gives the stored weight codes of the QuantLinear at `fqn` (module path
    under the QuantizedModel the export wraps): "b_" + the buffer's path with dots as underscores."""
    return "b_module_model_" + f"{fqn}.weight_q".replace(".", "_")


def export_float_onnx(model: torch.nn.Module, path: str | Path, example_kwargs: dict[str, Any],
                      dynamic_batch: bool = True) -> Path:
    """The full-precision model exported the same way (the fp32 ONNX Runtime baseline of benchmarks)."""
    return _export(model, model, path, example_kwargs, translation_table(), dynamic_batch, {})


def _export(module: torch.nn.Module, model: torch.nn.Module, path: str | Path, example_kwargs: dict[str, Any],
            translations: dict, dynamic_batch: bool, metadata: dict[str, str], unsigned_weights: bool = False) -> Path:
    """torch.onnx (dynamo) export of module(**example_kwargs) with fxquant's translations; `model` is the wrapped
    diffusers model (its forward's signature decides return_dict); unsigned_weights: `_unsigned_right_operands`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, constants = _split_inputs(model, example_kwargs)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        size = next(iter(tensors.values())).shape[0]  # the latent's batch: inputs sharing it are batched
        dynamic_shapes = {"tensors": tuple({0: batch} if t.dim() and t.shape[0] == size else None
                                           for t in tensors.values())}
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                _PositionalInputs(module, list(tensors), constants).eval(), tuple(tensors.values()), dynamo=True,
                optimize=False, custom_translation_table=translations, dynamic_shapes=dynamic_shapes,
                input_names=list(tensors), output_names=[OUTPUT_NAME], verbose=False)
    except torch.onnx.errors.OnnxExporterError as err:
        if not dynamic_batch:
            raise
        raise FxquantError("torch.export could not keep the batch dimension symbolic for this model (some "
                           "diffusers attention-mask paths reshape by it); export with dynamic_batch=False, "
                           "one graph per batch size (OrtDenoiser does this).") from err
    _uniform_cast_types(program)
    program.optimize()
    if unsigned_weights:
        _unsigned_right_operands(program)
    program.model.metadata_props.update({**metadata, "fxquant_inputs": json.dumps(list(tensors))})
    large = sum(t.numel() * t.element_size() for t in module.buffers()) + \
        sum(t.numel() * t.element_size() for t in module.parameters()) > PROTOBUF_LIMIT // 2
    program.save(str(path), external_data=large)
    onnx.checker.check_model(str(path), full_check=True)
    return path

"""Running an exported graph with ONNX Runtime: sessions, the integer-op census, and a denoiser for pipelines.

`OrtDenoiser` stands in for a pipeline's transformer / unet: a diffusers pipeline calls it like the model (keyword
tensors, return_dict) and every call runs in an ORT session; attribute look-ups (`config`, `dtype`, `plan`) go to
the QuantizedModel it was exported from.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ...capture import bind_arguments
from ...errors import FxquantError
from ...model import _Wrapper

# ORT operators that compute a quantized layer's product on integers (standard and com.microsoft fused forms)
INTEGER_OPS = frozenset({"MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm",
                         "QLinearMatMul", "QLinearConv", "DynamicQuantizeLSTM", "QAttention"})


def session(path: str | Path, threads: int = 2, optimized_path: str | Path | None = None,
            spin: bool = True, profile_prefix: str | Path | None = None) -> ort.InferenceSession:
    """An ORT CPU session with `threads` intra-op threads (all graph optimisations on); optionally saves the
    optimised graph to `optimized_path`. spin=False stops its threads from busy-waiting between runs (needed when
    several sessions or torch share the cores, as in a benchmark). profile_prefix: ORT's profiler records every run
    (`end_profiling()` writes the JSON trace and returns its path)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def optimized_op_counts(path: str | Path) -> Counter:
    """Operator types of the graph ORT actually runs (after its optimisations), counted."""
    with tempfile.TemporaryDirectory() as directory:
        optimized = Path(directory) / "optimized.onnx"
        session(path, optimized_path=optimized)
        return Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)


def integer_op_count(path: str | Path) -> int:
    """How many integer matmul / conv operators the optimised graph holds."""
    return sum(count for op_type, count in optimized_op_counts(path).items() if op_type in INTEGER_OPS)


def graph_metadata(path: str | Path) -> dict[str, str]:
    """The fxquant metadata export_onnx stored in the model (act form, plan JSON, input names)."""
    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props if prop.key.startswith("fxquant_")}


class OrtDenoiser(_Wrapper):
    """A pipeline's denoiser running on ONNX Runtime: `pipe.transformer = OrtDenoiser(qmodel, "onnx/")`.

    Each distinct set of input shapes gets its own graph with static shapes, exported from `qmodel` on its first
    call into `directory` (torch.export cannot keep the batch symbolic through every diffusers attention-mask
    path); later calls of the same shapes reuse its session. Calls take the model's arguments (positional or by
    keyword); non-tensor arguments were constants in the export. Outputs come back as CPU tensors. Attribute
    look-ups (`config`, `dtype`, `plan`) go to `qmodel`.
    """

    def __init__(self, qmodel: torch.nn.Module, directory: str | Path, act_form: str = "per_token",
                 threads: int = 2):
        super().__init__(qmodel)
        self.directory = Path(directory)
        self.act_form = act_form
        self.threads = threads
        self.sessions: dict[tuple, ort.InferenceSession] = {}

    def _session_for(self, kwargs: dict[str, Any]) -> ort.InferenceSession:
        shapes = tuple((name, tuple(v.shape), str(v.dtype)) for name, v in kwargs.items()
                       if isinstance(v, torch.Tensor))
        if shapes not in self.sessions:
            from .export import export_onnx

            path = self.directory / f"denoiser-{len(self.sessions)}.onnx"
            export_onnx(self.model, path, kwargs, act_form=self.act_form, dynamic_batch=False)
            self.sessions[shapes] = session(path, self.threads)
        return self.sessions[shapes]

    def forward(self, *args, **kwargs):
        kwargs = bind_arguments(self.model.model, args, kwargs)
        return_dict = kwargs.pop("return_dict", True)
        ort_session = self._session_for(kwargs)
        feed = {i.name: _as_numpy(kwargs[i.name]) for i in ort_session.get_inputs()}
        out = torch.from_numpy(ort_session.run(None, feed)[0])
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def _as_numpy(value: torch.Tensor) -> np.ndarray:
    return value.detach().cpu().contiguous().numpy()


class _FirstCallRecorded(Exception):
    """Stops a pipeline run once its first denoiser call has been recorded."""


def first_denoiser_call(pipe, denoiser_name: str, **call_kwargs) -> dict[str, Any]:
    """The arguments (by name) of the first denoiser call of `pipe(**call_kwargs)`, which is stopped right there:
    export_onnx's example inputs, shaped as the pipeline calls its denoiser (CFG batch included)."""
    denoiser = getattr(pipe, denoiser_name)
    model = denoiser.model if isinstance(denoiser, _Wrapper) else denoiser
    calls: list = []

    def record(_module, args, kwargs):
        calls.append(bind_arguments(model, args, kwargs))
        raise _FirstCallRecorded

    handle = denoiser.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe(**call_kwargs)
    except _FirstCallRecorded:
        return calls[0]
    finally:
        handle.remove()
    raise FxquantError(f"The pipeline never called its {denoiser_name}; cannot record example inputs.")

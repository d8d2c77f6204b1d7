"""QDQ-style ONNX export of quantized models and their ONNX Runtime runner (integer kernels on the CPU)."""

from .export import export_float_onnx, export_onnx
from .runner import (INTEGER_OPS, OrtDenoiser, first_denoiser_call, graph_metadata, integer_op_count,
                     optimized_op_counts, session)

__all__ = ["export_onnx", "export_float_onnx", "OrtDenoiser", "first_denoiser_call", "graph_metadata", "INTEGER_OPS", "integer_op_count",
           "optimized_op_counts", "session"]

"""fxquant: post-training quantization of diffusion models as a torch.fx compiler plugin.

    qmodel = fxquant.quantize(model, "w8a8", calibration)
    fxquant.save(qmodel, "out/"); qmodel = fxquant.load("out/")
    fast = torch.compile(qmodel, backend="fxquant")
"""

from . import ops  # noqa: F401  (registers the fxquant custom ops)
from .api import convert, export_onnx, inspect_passes, prepare, quantize, quantize_pipeline
from .checkpoint import load, save
from .config import (RECIPES, MixdqW4A8MPConfig, MixdqW8A8Config, QuantConfig, SmoothQuantW8A8Config,
                     ViditqW4A8Config, ViditqW4A8MPConfig, ViditqW8A8Config, W4A8DynamicConfig, W4A8Fp8Config,
                     W8A8DynamicConfig, W8A8Fp8Config, W8A8StaticConfig, get_config)
from .errors import CalibrationError, CaptureError, CheckpointError, FxquantError, RecipeError
from .model import PreparedModel, QuantizedModel
from .plan import LayerPlan, QuantPlan

__version__ = "0.1.0"


def _register_cuda_kernels() -> None:
    """Use the Triton kernels for fxquant ops on CUDA when both are available."""
    import torch

    if not torch.cuda.is_available():
        return
    try:
        from .backends.triton import cuda_ops  # noqa: F401
    except ImportError:  # no triton: the reference ops run on CUDA too
        pass


_register_cuda_kernels()

__all__ = [
    "prepare", "convert", "quantize", "quantize_pipeline", "inspect_passes", "save", "load", "export_onnx",
    "QuantConfig", "W8A8DynamicConfig", "W8A8StaticConfig", "SmoothQuantW8A8Config", "ViditqW8A8Config",
    "W4A8DynamicConfig", "ViditqW4A8Config", "W8A8Fp8Config", "W4A8Fp8Config", "ViditqW4A8MPConfig", "MixdqW8A8Config",
    "MixdqW4A8MPConfig", "RECIPES", "get_config",
    "QuantPlan", "LayerPlan", "PreparedModel", "QuantizedModel",
    "FxquantError", "CaptureError", "RecipeError", "CalibrationError", "CheckpointError",
]

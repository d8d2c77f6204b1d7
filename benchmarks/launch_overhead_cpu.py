"""The Python work of an eager kernel launch, on the CPU: fxquant's launchers with the Triton launch itself stubbed out.

    python benchmarks/launch_overhead_cpu.py

Prints microseconds per call (mean of 3000) of the GEMM launcher (plain, and with a gated residual), of
`fixed_config` alone and of the fused-quantize launcher (LayerNorm + adaLN prologue), at PixArt's shapes. What an
eager model (or a graph of opaque fxquant ops) pays per linear before the GPU sees the kernel; CUDA-graph replays
pay none of it. Triton's own launch cost comes on top and needs a GPU.
"""

from __future__ import annotations

import time

import torch

import fxquant  # noqa: F401  (registers the ops)
from fxquant.backends.triton import gemm, quantize


class _NoLaunch:  # kernel[grid](*args, **kwargs) that does nothing
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _microseconds(call, repeats: int = 3000) -> float:
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    gemm._gemm_kernel = _NoLaunch()
    quantize.launcher = lambda kernel, traced: _NoLaunch()
    m, k, n = 8192, 1152, 1152
    x_q = torch.zeros(m, k, dtype=torch.float8_e4m3fn)
    x_scale, w_q, w_scale = torch.rand(m, 1), torch.zeros(n, k, dtype=torch.float8_e4m3fn), torch.rand(n)
    bias = torch.zeros(n, dtype=torch.bfloat16)
    residual, gate = torch.zeros(2, m // 2, n, dtype=torch.bfloat16), torch.ones(2, 1, n, dtype=torch.bfloat16)
    x, table = torch.zeros(2, m // 2, k, dtype=torch.bfloat16), torch.ones(2, 1, k, dtype=torch.bfloat16)
    rows = {
        "gemm": lambda: gemm.quantized_gemm(x_q, x_scale, None, w_q, w_scale, None, bias, torch.bfloat16),
        "gemm_gated_residual": lambda: gemm.quantized_gemm(x_q, x_scale, None, w_q, w_scale, None, bias,
                                                           torch.bfloat16, gate=gate, residual=residual),
        "fixed_config": lambda: gemm.fixed_config(m, n, k, False),
        "fused_quantize_layernorm_adaln": lambda: quantize.fused_quantize_per_token(
            x, None, None, table, table, "layer", 1e-6, "none", True),
    }
    for name, call in rows.items():
        print(f"{name}: {_microseconds(call):.1f} us")


if __name__ == "__main__":
    main()

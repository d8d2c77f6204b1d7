"""Which pointer arguments torch's Triton-kernel analysis thinks fxquant's kernels write (run as a script, without
TRITON_INTERPRET: the analysis compiles each kernel to TTIR for an sm_90 target, no GPU needed). Prints JSON
{"written": {case: sorted written argument names}, "memoized": the same through fxquant's memo of the analysis,
"generations": TTIR compiles under the memo}. Inductor copies every argument it thinks written before launching a
traced kernel, so a read-only operand reported here would cost a full copy per call."""

import json

import torch
import triton
from triton.backends.compiler import GPUTarget

import fxquant.backends.triton.attention as attention
import fxquant.backends.triton.conv as conv
import fxquant.backends.triton.gemm as gemm
import fxquant.backends.triton.quantize as quantize
from fxquant.backends.triton.access_analysis import memoize_access_analysis


class Sm90Driver:  # what the TTIR generation asks the active driver for (traced_graph_census.py uses it too)
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def written_arguments(kernel, kwargs: dict) -> list[str]:
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    if hasattr(wrap, "identify_accessed_tensors"):  # torch >= 2.12
        writes = wrap.identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes
        return sorted(dep.name for dep in writes)
    return sorted(wrap.identify_mutated_tensors(kernel, kwargs, {}))


def main() -> None:
    triton.runtime.driver.set_active(Sm90Driver())
    launches = []

    def recording_wrap_triton(kernel):
        class Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    names = kernel.arg_names
                    launches.append((kernel, {**dict(zip(names, args)), **kwargs}))
                return launch
        return Grid()

    for module in (quantize, gemm, attention, conv):
        module.wrap_triton = recording_wrap_triton
    x = torch.randn(2, 64, 96, dtype=torch.bfloat16)
    table = torch.randn(2, 6, 96, dtype=torch.bfloat16)
    cases = {
        "quantize_int8": lambda: quantize.quantize_per_token(x, traced=True),
        "quantize_norm_adaln_fp8": lambda: quantize.fused_quantize_per_token(
            x, mul=table[:, 1:2], add=table[:, 0:1], norm="layer", eps=1e-6, fp8=True, traced=True),
        "quantize_geglu": lambda: quantize.fused_quantize_per_token(x, activation="geglu", traced=True),
        "quantize_concat_fp8": lambda: quantize.fused_quantize_per_token(
            x, mul=table[:, 1:2], add=table[:, 0:1], norm="layer", eps=1e-5, fp8=True, traced=True, tail=x[:, :16],
            tail_mul=table[:, 4:5], tail_add=table[:, 3:4]),
        "gemm_int8": lambda: gemm.quantized_gemm(
            torch.zeros(64, 96, dtype=torch.int8), torch.ones(64), torch.zeros(64, dtype=torch.int32),
            torch.zeros(32, 96, dtype=torch.int8), torch.ones(32), torch.zeros(32, dtype=torch.int32), torch.ones(32),
            torch.bfloat16, traced=True),
        "gemm_w4a8_fp8": lambda: gemm.quantized_gemm(  # packed codes unpacked in the K loop (inline PTX)
            torch.zeros(16, 96, dtype=torch.float8_e4m3fn), torch.ones(16), None,
            torch.zeros(32, 48, dtype=torch.uint8), torch.ones(32), None, torch.ones(32), torch.bfloat16, 4, traced=True),
        "gemm_fp8_gate_residual": lambda: gemm.quantized_gemm(
            torch.zeros(128, 96, dtype=torch.float8_e4m3fn), torch.ones(128), None,
            torch.zeros(96, 96, dtype=torch.float8_e4m3fn), torch.ones(96), None, None, torch.bfloat16, traced=True,
            gate=table[:, 2:3], residual=x),
        "gemm_fp8_fill_tiles": lambda: gemm.quantized_gemm(  # the last wave's rows in smaller tiles: two tile sites
            torch.zeros(128, 96, dtype=torch.float8_e4m3fn), torch.ones(128), None,
            torch.zeros(96, 96, dtype=torch.float8_e4m3fn), torch.ones(96), None, None, torch.bfloat16, traced=True,
            gate=table[:, 2:3], residual=x, config={**gemm.fixed_config(128, 96, 96, False), "FILL_M": 64,
                                                    "FILL_N": 64}),
        "gemm_fp8_gate_per_tile": lambda: gemm.quantized_gemm(
            torch.zeros(128, 96, dtype=torch.float8_e4m3fn), torch.ones(128), None,
            torch.zeros(96, 96, dtype=torch.float8_e4m3fn), torch.ones(96), None, None, torch.bfloat16, traced=True,
            gate=table[:, 2:3], residual=x, gate_per_tile=True),
        "gemm_fp8_residual_parts": lambda: gemm.quantized_gemm(
            torch.zeros(128, 96, dtype=torch.float8_e4m3fn), torch.ones(128), None,
            torch.zeros(96, 96, dtype=torch.float8_e4m3fn), torch.ones(96), None, None, torch.bfloat16, traced=True,
            gate=table[:, 2:3], residual=x[:, :16], tail=(table[:, 5:6], x[:, 16:])),
        "gemm_fp8_gelu_quantize": lambda: gemm.quantized_gemm(
            torch.zeros(128, 96, dtype=torch.float8_e4m3fn), torch.ones(128), None,
            torch.zeros(96, 96, dtype=torch.float8_e4m3fn), torch.ones(96), None, None, torch.bfloat16, traced=True,
            activation="gelu_tanh", out_scale=torch.ones(1)),
        "gemm_fp8_attention_operand": lambda: gemm.attention_operand_gemm(
            [torch.zeros(128, 96, dtype=torch.float8_e4m3fn)], [torch.ones(128)],
            [torch.zeros(96, 96, dtype=torch.float8_e4m3fn)], [torch.ones(96)], [torch.ones(96)], torch.ones(1), 2,
            [64], True, traced=True),
        "attention_fp8_laid_out": lambda: attention.attention_fp8_codes(
            *(torch.zeros(1, 2, 64, 96, dtype=torch.float8_e4m3fn) for _ in range(2)),
            torch.zeros(1, 2, 96, 64, dtype=torch.float8_e4m3fn), 72, 0.1, torch.ones(3), torch.bfloat16, traced=True),
        "conv_int8": lambda: conv.quantized_conv2d(
            torch.randn(1, 32, 8, 8, dtype=torch.bfloat16), torch.ones(1), torch.zeros(1, dtype=torch.int32),
            torch.zeros(16, 32, 3, 3, dtype=torch.int8), torch.ones(16), torch.zeros(16, dtype=torch.int32),
            torch.ones(16, dtype=torch.bfloat16), [1, 1], [1, 1], [1, 1], traced=True),
        "conv_int8_per_patch": lambda: conv.quantized_conv2d(
            torch.randn(1, 32, 8, 8, dtype=torch.bfloat16), None, None, torch.zeros(16, 32, 3, 3, dtype=torch.int8),
            torch.ones(16), torch.zeros(16, dtype=torch.int32), None, [1, 1], [1, 1], [1, 1], traced=True),
        "conv_fp8": lambda: conv.quantized_conv2d(
            torch.randn(1, 32, 8, 8, dtype=torch.bfloat16), torch.ones(1), None,
            torch.zeros(16, 32, 3, 3, dtype=torch.float8_e4m3fn), torch.ones(16), None,
            torch.ones(16, dtype=torch.bfloat16), [1, 1], [1, 1], [1, 1], traced=True),
        "attention_fp8": lambda: attention.quantized_attention(
            *(torch.randn(1, 2, 64, 72, dtype=torch.bfloat16) for _ in range(3)), 0.1, True, traced=True),
    }
    analysed = {}
    for name, launch in cases.items():
        launches.clear()
        launch()
        (kernel, kwargs), = launches
        analysed[name] = kernel, {key: value for key, value in kwargs.items() if key not in ("num_warps", "num_stages")}
    written = {name: written_arguments(kernel, kwargs) for name, (kernel, kwargs) in analysed.items()}
    print(json.dumps({"written": written, **memoized_report(analysed)}))


def _launch_autotuner(kernel):
    """What Dynamo makes of a launch that passes num_warps / num_stages: a new one-config autotuner."""
    return triton.autotune(configs=[triton.Config({}, num_warps=4, num_stages=3)], key=[])(kernel)


def memoized_report(analysed: dict) -> dict:
    """With fxquant's memo installed, each case analysed twice, as Dynamo traces two launches of one specialization:
    each kernel wrapped in a one-config autotuner of its own, the second time on other tensors of the same dtypes:
    {"memoized": written names per case, "generations": how many times torch compiled a kernel to TTIR}."""
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    memoize_access_analysis()
    generate_ttir, generations = wrap.generate_ttir, []

    def counted(*args, **kwargs):
        generations.append(1)
        return generate_ttir(*args, **kwargs)

    wrap.generate_ttir = counted
    memoized = {}
    for name, (kernel, kwargs) in analysed.items():
        other = {key: torch.empty(3, dtype=value.dtype) if isinstance(value, torch.Tensor) else value
                 for key, value in kwargs.items()}
        memoized[name] = written_arguments(_launch_autotuner(kernel), kwargs)
        assert written_arguments(_launch_autotuner(kernel), other) == memoized[name]
    return {"memoized": memoized, "generations": len(generations)}


if __name__ == "__main__":
    main()

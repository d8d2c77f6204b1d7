"""GPU benchmark: kernel correctness at full shapes, GEMM microbenchmark, end-to-end PixArt-alpha-1024 latency.

    python benchmarks/gpu_bench.py --sections kernels gemm pixart --out results.json

Everything runs in one process on the same inputs; times are medians of many calls. GEMMs are timed as CUDA-graph
replays (triton.testing.do_bench_cudagraph), so CPU launch overhead is excluded for every variant alike; the
end-to-end model is timed both as plain calls and as CUDA-graph replays. Ratios are against bf16 cuBLAS / bf16
eager / bf16 torch.compile measured in the same run. Random weights: speed does not depend on their values.
Writes one JSON with device, versions and date.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

import fxquant
from fxquant.backends.triton.quantize import quantize_per_token, quantize_per_token_fp8
from fxquant.backends.triton.w8a8_gemm import w8a8_gemm
from fxquant.metrics import relative_l2
from fxquant.ops import int8_linear_reference, quantize_per_token_reference
from fxquant.quantizer import quantize_weight_per_channel

DIT_SHAPES = [(1152, 1152), (1152, 3456), (1152, 4608), (4608, 1152)]  # (K, N) of PixArt-alpha's linears
FP8_MAX = 448.0


def _median_ms(fn) -> float:
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def _graph_median_ms(fn) -> float:
    fn()  # autotune / compile outside the graph
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=300, return_mode="median")


def _cuda_graph(fn):
    """Capture fn() (static inputs) once; return a replay callable that returns the captured output."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


def _fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.float().abs().amax(dim=1) / FP8_MAX).clamp_min(1e-8)
    return (w.float() / scale[:, None]).to(torch.float8_e4m3fn), scale


def check_kernels() -> list[dict]:
    """Triton kernels against fxquant's reference ops at full DiT shapes (fresh random inputs each)."""
    rows = []
    for k, n in DIT_SHAPES:
        m = 8192
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2 + 0.1
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        q, s, z = quantize_per_token(x)
        ref_q, ref_s, ref_z = quantize_per_token_reference(x.float())
        wq, ws = quantize_weight_per_channel(w)
        wsum = wq.sum(dim=1, dtype=torch.int32)
        out = w8a8_gemm(q, s, z, wq, ws, wsum, bias, torch.bfloat16)
        ref = int8_linear_reference(ref_q, ref_s, ref_z, wq, ws, wsum, bias, torch.float32)
        q8, s8 = quantize_per_token_fp8(x)
        w8, ws8 = _fp8_weight(w)
        out8 = w8a8_gemm(q8, s8, None, w8, ws8, None, bias, torch.bfloat16)
        ref8 = (q8.float() * s8) @ (w8.float() * ws8[:, None]).t() + bias.float()
        exact = x.float() @ w.float().t() + bias.float()
        rows.append({
            "M": m, "K": k, "N": n,
            "int8_quantize_mismatch_fraction": (q != ref_q).float().mean().item(),
            "int8_gemm_rel_err_vs_reference": relative_l2(out, ref),
            "fp8_gemm_rel_err_vs_reference": relative_l2(out8, ref8),
            "int8_linear_rel_err_vs_bf16_linear": relative_l2(out, exact),
            "fp8_linear_rel_err_vs_bf16_linear": relative_l2(out8, exact),
        })
        print("kernels", rows[-1], flush=True)
    return rows


def gemm_benchmark() -> list[dict]:
    """TFLOP/s of bf16 / int8 / fp8 cuBLAS and fxquant's Triton kernels at DiT shapes, M = 8192 and 256."""
    rows = []
    for m in (8192, 256):
        for k, n in DIT_SHAPES:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            q, s, z = quantize_per_token(x)
            wq, ws = quantize_weight_per_channel(w)
            wsum = wq.sum(dim=1, dtype=torch.int32)
            q8, s8 = quantize_per_token_fp8(x)
            w8, ws8 = _fp8_weight(w)
            w8_t = w8.t()
            ws8_row = ws8[None, :].contiguous()
            flops = 2 * m * n * k
            times = {
                "bf16_cublas": _graph_median_ms(lambda: torch.nn.functional.linear(x, w, bias)),
                "int8_cublas_int_mm": _graph_median_ms(lambda: torch._int_mm(q, wq.t())) if m > 16 else None,
                "fp8_cublas_scaled_mm": _graph_median_ms(lambda: torch._scaled_mm(q8, w8_t, scale_a=s8, scale_b=ws8_row,
                                                                           bias=bias, out_dtype=torch.bfloat16)),
                "fxquant_int8_gemm": _graph_median_ms(lambda: w8a8_gemm(q, s, z, wq, ws, wsum, bias, torch.bfloat16)),
                "fxquant_fp8_gemm": _graph_median_ms(lambda: w8a8_gemm(q8, s8, None, w8, ws8, None, bias, torch.bfloat16)),
                "fxquant_int8_quantize_plus_gemm": _graph_median_ms(
                    lambda: w8a8_gemm(*quantize_per_token(x), wq, ws, wsum, bias, torch.bfloat16)),
                "fxquant_int8_quantize_only": _graph_median_ms(lambda: quantize_per_token(x)),
            }
            row = {"M": m, "K": k, "N": n, "ms": times,
                   "tflops": {name: (flops / (t * 1e-3) / 1e12 if t else None) for name, t in times.items()
                              if name != "fxquant_int8_quantize_only"}}
            bf16 = times["bf16_cublas"]
            row["speedup_vs_bf16"] = {name: (bf16 / t if t else None) for name, t in times.items()}
            rows.append(row)
            print("gemm", m, k, n, {kk: round(v, 1) for kk, v in row["tflops"].items() if v}, flush=True)
    return rows


def pixart_benchmark(layers: int = 28, recipes: tuple[str, ...] = ("w8a8", "w8a8-fp8")) -> dict:
    """PixArt-alpha 1024 px transformer (hidden 1152, 4096 tokens, batch 2, 120 text tokens): latency + memory."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    config = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=layers,
                  cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2,
                  norm_type="ada_norm_single", use_additional_conditions=True)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 128, 128, device="cuda", dtype=torch.bfloat16),
        encoder_hidden_states=torch.randn(2, 120, 4096, device="cuda", dtype=torch.bfloat16),
        timestep=torch.tensor([999, 500], device="cuda"),
        added_cond_kwargs={"resolution": torch.tensor([[1024.0, 1024.0]] * 2, device="cuda", dtype=torch.bfloat16),
                           "aspect_ratio": torch.tensor([[1.0]] * 2, device="cuda", dtype=torch.bfloat16)},
        return_dict=False,
    )

    def build():
        torch.manual_seed(0)
        return PixArtTransformer2DModel(**config).to("cuda", torch.bfloat16).eval()

    def measure(model, name, compile_seconds=None):
        with torch.no_grad():
            out = model(**inputs)[0]
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model(**inputs)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            ms = _median_ms(lambda: model(**inputs))
            try:
                graph_ms, graph_error = _median_ms(_cuda_graph(lambda: model(**inputs)[0])), None
            except Exception as err:  # recorded, not hidden: some variants may not be capturable
                graph_ms, graph_error = None, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        print(f"pixart {name}: {ms:.2f} ms (CUDA graph {graph_ms}), activation peak {peak / 2**30:.2f} GiB, "
              f"weights {weights / 2**20:.0f} MiB", flush=True)
        return out, {"ms": ms, "cuda_graph_ms": graph_ms, "cuda_graph_error": graph_error,
                     "activation_peak_bytes": peak, "weight_bytes": weights,
                     "compile_seconds": compile_seconds}

    results = {"config": {**config, "batch": 2, "tokens": 4096, "text_tokens": 120}, "variants": {}}
    model = build()
    reference, results["variants"]["bf16_eager"] = measure(model, "bf16 eager")
    start = time.time()
    compiled = torch.compile(model)
    with torch.no_grad():
        compiled(**inputs)
    _, results["variants"]["bf16_compile"] = measure(compiled, "bf16 compile", time.time() - start)
    del compiled
    del model
    for recipe in recipes:
        torch._dynamo.reset()
        start = time.time()
        qmodel = fxquant.quantize(build(), recipe, [inputs])
        quantize_seconds = time.time() - start
        eager_out, eager = measure(qmodel, f"fxquant {recipe} eager")
        eager.update(rel_l2_vs_bf16=relative_l2(eager_out, reference), quantize_seconds=quantize_seconds)
        start = time.time()
        fast = torch.compile(qmodel, backend="fxquant")
        with torch.no_grad():
            fast(**inputs)
        out, compiled = measure(fast, f"fxquant {recipe} compile", time.time() - start)
        compiled.update(rel_l2_vs_bf16=relative_l2(out, reference), rel_l2_vs_eager_quantized=relative_l2(out, eager_out))
        results["variants"][f"fxquant_{recipe}_eager"] = eager
        results["variants"][f"fxquant_{recipe}_compile"] = compiled
        del qmodel, fast
    bf16_eager = results["variants"]["bf16_eager"]["ms"]
    bf16_compile = results["variants"]["bf16_compile"]["ms"]
    bf16_graph = results["variants"]["bf16_eager"]["cuda_graph_ms"]
    for name, variant in results["variants"].items():
        variant["speedup_vs_bf16_eager"] = bf16_eager / variant["ms"]
        variant["speedup_vs_bf16_compile"] = bf16_compile / variant["ms"]
        if variant["cuda_graph_ms"]:
            variant["cuda_graph_speedup_vs_bf16_eager_cuda_graph"] = bf16_graph / variant["cuda_graph_ms"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["kernels", "gemm", "pixart"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=28)
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if "kernels" in args.sections:
        result["kernels"] = check_kernels()
    if "gemm" in args.sections:
        result["gemm"] = gemm_benchmark()
    if "pixart" in args.sections:
        result["pixart_alpha_1024"] = pixart_benchmark(args.layers)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()

"""GPU benchmark: kernel correctness at full shapes, GEMM and attention microbenchmarks, end-to-end denoiser latency
and memory.

    python benchmarks/gpu_bench.py --sections kernels prologue gemm attention models --models pixart flux \
        --out results.json

Everything runs in one process on the same inputs; times are medians of >= 20 calls. GEMMs are timed as CUDA-graph
replays (triton.testing.do_bench_cudagraph), so CPU launch overhead is excluded for every variant alike; the
denoisers are timed both as plain calls and as CUDA-graph replays. Ratios are against bf16 cuBLAS / bf16 eager /
bf16 torch.compile measured in the same run. Random weights: speed does not depend on their values. Model variants:
bf16 eager / torch.compile (whole model or its repeated blocks), fxquant recipes compiled with backend="fxquant"
(whole model or `compile_blocks`), torchao float8 / int8 dynamic (when torchao imports; failures are recorded as
such). Section `packed` sweeps W4A8 against W8A8 over the token count, `packed_tiles` the W4A8 tiles at few tokens
(weights read from memory), `attention_configs` the attention tiles, `geglu` the GEGLU epilogue against its unfused
path. The JSON (device, versions, date) is rewritten after every variant (attention sections and conv_tiles: every
shape), so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import json
import platform
import pstats
import statistics
import time
import traceback

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

import fxquant
from fxquant.backends.triton.attention import (_attention_kernel, _tuning_key, attend, kernel_args, kernel_operands,
                                               quantized_attention, traced_config, tune)
from fxquant.backends.triton.gemm import fixed_config, quantized_gemm, unpack_weights
from fxquant.backends.triton.quantize import fused_quantize_per_token, quantize_per_token, quantize_per_token_fp8
from fxquant.metrics import relative_l2
from fxquant.model import compile_repeated_blocks
from fxquant.ops import (fp8_linear_reference, int8_linear_reference, prologue_reference,
                         quantize_per_token_reference, quantized_attention_reference)
from fxquant.quantizer import (asymmetric_params, attention_operands, fp8_scale, pack_bits, pack_sign_magnitude,
                               quantize_fp8, quantize_fp8_with_scale, quantize_weight_per_channel, unpack_bits)

DIT_SHAPES = [(1152, 1152), (1152, 3456), (1152, 4608), (4608, 1152)]  # (K, N) of PixArt-alpha's linears
FP8_MAX = 448.0
CALLS = 20
# (batch, heads, tokens, head dim) of the benchmarked models' self / joint attention (image + text tokens)
ATTENTION_SHAPES = {"pixart": (2, 16, 4096, 72), "sd3": (2, 24, 4096 + 333, 64), "flux": (1, 24, 4096 + 512, 128),
                    "cogvideox": (2, 30, 13 * 30 * 45 + 226, 64)}
# input shape and prologue of the quantizations the backend fuses: PixArt-1024's norm + adaLN and feed-forward
# GELU, SDXL's 1280-wide GEGLU at 32 x 32 latents
PROLOGUE_CASES = {"pixart_layernorm_adaln": ((2, 4096, 1152), dict(norm="layer", eps=1e-6), True),
                  "pixart_gelu_tanh": ((2, 4096, 4608), dict(activation="gelu_tanh"), False),
                  "sdxl_geglu": ((2, 1024, 2 * 5120), dict(activation="geglu"), False)}


def _median_ms(fn, calls: int = CALLS) -> float:
    """Median wall time of `calls` synchronised calls (after 3 warm-up calls), in ms."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_environment() -> dict:
    """What a result file records about the run: GPU, torch / Triton / Python versions, UTC date."""
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def attention_tflops(batch: int, heads: int, tokens: int, head_dim: int, ms: dict) -> dict:
    """Self-attention's two products (4 B H N^2 D operations) per timing in ms -> TFLOP/s per key."""
    flops = 4 * batch * heads * tokens * tokens * head_dim
    return {key: flops / (t * 1e-3) / 1e12 for key, t in ms.items()}


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


def _packed_weight(w: torch.Tensor, bits: int, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 codes, fp32 scale, int32 row sums) of w at 4 or 2 bits, packed as an int8 (pack_bits) or an fp8
    layer (4 bits: pack_sign_magnitude) keeps them."""
    codes, scale = quantize_weight_per_channel(w, bits)
    packed = pack_sign_magnitude(codes) if fp8 and bits == 4 else pack_bits(codes, bits)
    return packed, scale, codes.sum(dim=1, dtype=torch.int32)


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
        out = quantized_gemm(q, s, z, wq, ws, wsum, bias, torch.bfloat16)
        ref = int8_linear_reference(ref_q, ref_s, ref_z, wq, ws, wsum, bias, torch.float32)
        q8, s8 = quantize_per_token_fp8(x)
        w8, ws8 = _fp8_weight(w)
        out8 = quantized_gemm(q8, s8, None, w8, ws8, None, bias, torch.bfloat16)
        ref8 = (q8.float() * s8) @ (w8.float() * ws8[:, None]).t() + bias.float()
        exact = x.float() @ w.float().t() + bias.float()
        residual, gate = x.new_empty(2, m // 2, n).normal_(), bias.new_empty(2, 1, n).normal_()
        out8_residual = quantized_gemm(q8, s8, None, w8, ws8, None, bias, torch.bfloat16, gate=gate, residual=residual)
        hidden = torch.nn.functional.gelu(ref8, approximate="tanh")
        hidden_scale = fp8_scale(hidden.abs().max()).reshape(1)
        hidden_codes = quantized_gemm(q8, s8, None, w8, ws8, None, bias, torch.bfloat16, activation="gelu_tanh",
                                      out_scale=hidden_scale)
        ref_codes = quantize_fp8_with_scale(hidden, hidden_scale)
        # the accumulation alone: fp32 outputs against fp64 sums (int8 sums exactly; Hopper's fp8 MMA may not)
        exact8 = (q8.double() * s8.double()) @ (w8.double() * ws8.double()[:, None]).t() + bias.double()
        exact_int8 = ((q.double() - z.double()) * s.double()) @ (wq.double() * ws.double()[:, None]).t() + bias.double()
        packed_errors = {}
        for bits in (4, 2):
            packed, scale, sums = _packed_weight(w, bits)
            codes, _ = quantize_weight_per_channel(w, bits)
            ref_packed = int8_linear_reference(q, s, z, codes, scale, sums, bias, torch.float32)
            packed_fp8 = _packed_weight(w, bits, fp8=True)[0]
            ref_packed_fp8 = fp8_linear_reference(q8, s8, codes, scale, bias, torch.float32)
            for unpack_first, path in ((False, "k_loop"), (True, "unpack_first")):
                out_packed = quantized_gemm(q, s, z, packed, scale, sums, bias, torch.bfloat16, bits,
                                            unpack_first=unpack_first)
                packed_errors[f"w{bits}a8_gemm_{path}_rel_err_vs_reference"] = relative_l2(out_packed, ref_packed)
                out_packed_fp8 = quantized_gemm(q8, s8, None, packed_fp8, scale, None, bias, torch.bfloat16, bits,
                                                unpack_first=unpack_first)
                packed_errors[f"w{bits}a8_fp8_gemm_{path}_rel_err_vs_reference"] = relative_l2(out_packed_fp8,
                                                                                             ref_packed_fp8)
        rows.append({
            "M": m, "K": k, "N": n,
            "int8_quantize_mismatch_fraction": (q != ref_q).float().mean().item(),
            "int8_gemm_rel_err_vs_reference": relative_l2(out, ref),
            "fp8_gemm_rel_err_vs_reference": relative_l2(out8, ref8),
            "fp8_gemm_gate_residual_rel_err_vs_reference": relative_l2(
                out8_residual, residual.float() + gate.float() * ref8.view(residual.shape)),
            "fp8_gemm_gelu_quantize_code_mismatch_fraction":
                (hidden_codes.float() != ref_codes.float()).float().mean().item(),
            "fp8_gemm_gelu_quantize_rel_err_vs_reference": relative_l2(hidden_codes.float() * hidden_scale, hidden),
            "fp8_gemm_fp32_out_rel_err_vs_fp64": relative_l2(
                quantized_gemm(q8, s8, None, w8, ws8, None, bias, torch.float32), exact8),
            "int8_gemm_fp32_out_rel_err_vs_fp64": relative_l2(
                quantized_gemm(q, s, z, wq, ws, wsum, bias, torch.float32), exact_int8),
            "int8_linear_rel_err_vs_bf16_linear": relative_l2(out, exact),
            "fp8_linear_rel_err_vs_bf16_linear": relative_l2(out8, exact),
            **packed_errors,
        })
        print("kernels", rows[-1], flush=True)
    return rows


GEGLU_CASES = {"sdxl_1280": (2048, 1280, 5120), "sdxl_640": (8192, 640, 2560)}  # (tokens, K, N): SDXL's GEGLU FFs


def geglu_epilogue_benchmark() -> list[dict]:
    """The GEGLU epilogue (`quantized_gemm(..., activation="geglu")`: weights [2N, K], the program's two products
    give a * gelu(g), written as static fp8 codes) at SDXL's feed-forward shapes (batch 2, fixed tiles as compiled
    graphs launch it): code mismatches and error against an fp32 reference, and its time against the unfused path
    (the fp8 GEMM writing the 2N-wide bf16 output, then Inductor's chunk / GELU / multiply / quantize kernel)."""
    rows = []
    for case, (m, k, n) in GEGLU_CASES.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(2 * n, k, device="cuda", dtype=torch.bfloat16) * 0.05
        bias = torch.randn(2 * n, device="cuda", dtype=torch.bfloat16)
        x_q, x_scale = quantize_per_token_fp8(x)
        w_q, w_scale = _fp8_weight(w)
        full = (x_q.float() * x_scale) @ (w_q.float() * w_scale[:, None]).t() + bias.float()
        hidden, gate = full.chunk(2, dim=-1)
        hidden = hidden * F.gelu(gate)
        scale = fp8_scale(hidden.abs().max()).reshape(1)
        reference = quantize_fp8_with_scale(hidden, scale)
        gemm_tail = torch.compile(lambda y: quantize_fp8_with_scale(
            y.chunk(2, dim=-1)[0] * F.gelu(y.chunk(2, dim=-1)[1]), scale))
        fused = lambda: quantized_gemm(x_q, x_scale, None, w_q, w_scale, None, bias, torch.bfloat16,  # noqa: E731
                                       traced=True, activation="geglu", out_scale=scale)
        unfused = lambda: gemm_tail(quantized_gemm(x_q, x_scale, None, w_q, w_scale, None, bias,  # noqa: E731
                                                   torch.bfloat16, traced=True))
        codes = fused()
        row = {"case": case, "M": m, "K": k, "N": n,
               "code_mismatch_fraction": (codes.float() != reference.float()).float().mean().item(),
               "rel_err_vs_reference": relative_l2(codes.float() * scale, hidden),
               "unfused_rel_err_vs_reference": relative_l2(unfused().float() * scale, hidden),
               "us": {"fused": 1e3 * _graph_median_ms(fused), "unfused": 1e3 * _graph_median_ms(unfused)}}
        row["speedup_vs_unfused"] = row["us"]["unfused"] / row["us"]["fused"]
        rows.append(row)
        torch._dynamo.reset()
        print("geglu", row, flush=True)
    return rows


def prologue_benchmark() -> list[dict]:
    """The fused norm / modulation / activation + quantize kernel at full shapes: code mismatches against the fp32
    reference, and its time against the unfused path (Inductor's kernel for the prologue writing bf16 rows, then
    fxquant's quantize kernel) and against Inductor fusing prologue and quantization itself."""
    rows = []
    for name, (shape, spec, adaln) in PROLOGUE_CASES.items():
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 2 + 0.1
        kwargs = dict(weight=None, bias=None, mul=None, add=None, norm="none", eps=0.0, activation="none")
        kwargs.update(spec)
        if adaln:  # [B, 1, C] chunks of a [B, 6, C] table, as PixArt makes them
            table = torch.randn(shape[0], 6, shape[-1], device="cuda", dtype=torch.bfloat16) * 0.3
            kwargs.update(mul=1 + table[:, 1:2], add=table[:, 0:1])
        exact = prologue_reference(x, *kwargs.values())
        prologue_bf16 = torch.compile(lambda x: prologue_reference(x, *kwargs.values()).to(torch.bfloat16))
        row = {"case": name, "shape": list(shape), "ms": {}, "int8_code_mismatch_fraction": {}}
        for label, fp8, reference_quantize, kernel_quantize in (
                ("int8", False, quantize_per_token_reference, quantize_per_token),
                ("fp8", True, lambda rows: quantize_fp8(rows, dim=-1), quantize_per_token_fp8)):
            fused = lambda: fused_quantize_per_token(x, *kwargs.values(), fp8=fp8)  # noqa: E731
            unfused = lambda: kernel_quantize(prologue_bf16(x))  # noqa: E731
            inductor = torch.compile(lambda x: reference_quantize(prologue_reference(x, *kwargs.values())))
            if not fp8:
                reference_codes = quantize_per_token_reference(exact)[0]
                row["int8_code_mismatch_fraction"] = {
                    "fused": (fused()[0] != reference_codes).float().mean().item(),
                    "unfused_bf16_rows": (unfused()[0] != reference_codes).float().mean().item()}
            else:
                codes, scales, _ = fused()
                row["fp8_rel_err_vs_exact"] = relative_l2(codes.float() * scales, exact)
            row["ms"][f"{label}_fused"] = _graph_median_ms(fused)
            row["ms"][f"{label}_unfused"] = _graph_median_ms(unfused)
            row["ms"][f"{label}_inductor_fused"] = _graph_median_ms(lambda: inductor(x))
            row[f"{label}_speedup_vs_unfused"] = row["ms"][f"{label}_unfused"] / row["ms"][f"{label}_fused"]
            torch._dynamo.reset()
        read_write = x.numel() * x.element_size() + exact.numel() * 1  # bf16 in, 8-bit codes out
        row["fused_bandwidth_TBps"] = {key: read_write / (row["ms"][key] * 1e-3) / 1e12 for key in row["ms"]
                                       if key.endswith("_fused") and "inductor" not in key}
        rows.append(row)
        print("prologue", name, {key: round(t, 4) for key, t in row["ms"].items()},
              row["int8_code_mismatch_fraction"], flush=True)
    return rows


def concat_prologue_benchmark() -> list[dict]:
    """CogVideoX-2B's text + video tokens (LayerNorm, each part its own adaLN modulation, concatenated, fp8 per
    token): the fused concat kernel (also with the LayerNorm's affine folded into the modulations, as the backend
    launches it) against Inductor's norm + modulate + cat writing bf16 rows, then fxquant's quantize kernel (the graph
    before the rewrite); the fused codes' error against the fp32 reference."""
    text, video, width = 226, 13 * 30 * 45, 1920
    head = torch.randn(2, text, width, device="cuda", dtype=torch.bfloat16) * 2 + 0.1
    tail = torch.randn(2, video, width, device="cuda", dtype=torch.bfloat16) * 2 + 0.1
    weight, bias = (torch.randn(width, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    table = torch.randn(2, 6, width, device="cuda", dtype=torch.bfloat16) * 0.3
    mods = (1 + table[:, 1:2], table[:, 0:1], 1 + table[:, 4:5], table[:, 3:4])
    rows_bf16 = torch.compile(lambda head, tail: torch.cat([
        F.layer_norm(x, (width,), weight, bias, 1e-5) * mul + add
        for x, mul, add in ((head, *mods[:2]), (tail, *mods[2:]))], dim=1))
    fused = lambda: fused_quantize_per_token(head, weight, bias, *mods[:2], "layer", 1e-5, fp8=True,  # noqa: E731
                                             tail=tail, tail_mul=mods[2], tail_add=mods[3])
    # as the backend launches it: the LayerNorm's affine folded into each part's modulation (two vectors per row)
    folded_mods = [x for mul, add in (mods[:2], mods[2:]) for x in (weight * mul, bias * mul + add)]
    folded = lambda: fused_quantize_per_token(head, None, None, *folded_mods[:2], "layer", 1e-5,  # noqa: E731
                                              fp8=True, tail=tail, tail_mul=folded_mods[2], tail_add=folded_mods[3])
    codes, scales, _ = fused()
    folded_codes, folded_scales, _ = folded()
    exact = torch.cat([prologue_reference(x, weight, bias, mul, add, "layer", 1e-5, "none").reshape(x.shape)
                       for x, mul, add in ((head, *mods[:2]), (tail, *mods[2:]))], dim=1).reshape(-1, width)
    row = {"case": "cogvideox_text_video_layernorm_adaln_fp8", "shapes": [list(head.shape), list(tail.shape)],
           "fp8_rel_err_vs_exact": relative_l2(codes.float() * scales, exact),
           "scale_rel_err_vs_exact": relative_l2(scales, quantize_fp8(exact, dim=-1)[1]),
           "folded_fp8_rel_err_vs_exact": relative_l2(folded_codes.float() * folded_scales, exact),
           "ms": {"fused_concat": _graph_median_ms(fused), "fused_concat_folded_affine": _graph_median_ms(folded),
                  "inductor_rows_then_quantize": _graph_median_ms(lambda: quantize_per_token_fp8(rows_bf16(head,
                                                                                                           tail)))}}
    row["speedup"] = row["ms"]["inductor_rows_then_quantize"] / row["ms"]["fused_concat"]
    row["speedup_folded"] = row["ms"]["inductor_rows_then_quantize"] / row["ms"]["fused_concat_folded_affine"]
    torch._dynamo.reset()
    print("concat_prologue", row, flush=True)
    return [row]


@triton.jit
def _pipe_probe_kernel(x_ptr, out_ptr, OP: tl.constexpr, STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """Per element and step, register-resident: OP 0 an FFMA (and an FADD into a sum); 1 also an exp2 (MUFU.EX2);
    2 instead of the sum one fp32 -> e4m3 conversion of two values (F2FP, as the attention kernel packs P) xor-ed into
    integer codes; 3 the exp2 and the conversion (the attention kernel's softmax step)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    total = tl.zeros_like(x)
    codes = tl.zeros(x.shape, tl.int32)
    for _ in range(STEPS):
        x = x * 0.999 - 0.001
        y = tl.exp2(x) if OP % 2 == 1 else x
        if OP >= 2:
            codes ^= tl.inline_asm_elementwise(
                "{\n.reg .b16 c;\ncvt.rn.satfinite.e4m3x2.f32 c, $1, $2;\ncvt.u32.u16 $0, c;\n}", "=r,f,f", [y, x],
                dtype=tl.int32, is_pure=True, pack=1)
        else:
            total += y
    tl.store(out_ptr + offs, total + codes.to(tl.float32))


def pipe_probe_benchmark() -> list[dict]:
    """Which unit the attention kernel's softmax step waits on: billions of elements per second of an FFMA chain
    alone, with an exp2, with an fp32 -> e4m3 conversion, and with both (64 register-resident elements per thread,
    4 warps, enough programs for every SM). If exp2 + conversion costs about the sum of their extra times, both run
    on one low-throughput unit (then computing P's exponentials in f16x2 would not help); about the larger of the
    two, separate ones."""
    block, steps = 64 * 128, 256
    x = torch.rand(block * 132 * 16, device="cuda") - 1.0
    out = torch.empty_like(x)
    grid = (x.numel() // block,)
    rows = []
    for op, label in enumerate(("ffma", "ffma_exp2", "ffma_e4m3", "ffma_exp2_e4m3")):
        ms = _graph_median_ms(lambda: _pipe_probe_kernel[grid](x, out, OP=op, STEPS=steps, BLOCK=block, num_warps=4))
        rows.append({"op": label, "ms": ms, "g_elements_per_s": x.numel() * steps / (ms * 1e-3) / 1e9})
        print("pipes", rows[-1], flush=True)
    return rows


def residual_parts_benchmark() -> list[dict]:
    """CogVideoX-2B's output projection (K 1920) and second feed-forward linear (K 7680), whose fp8 GEMM output is
    cut into text and video tokens, each gated and added to its own residual stream: the GEMM writing both sums
    (`tail=`, fxquant::linear_residual_parts; at the residual epilogue's tile and at the plain GEMM's) against the GEMM
    writing bf16 rows, then Inductor's split + gated residual pass (the graph before the rewrite), and the plain GEMM
    alone; the error between fused and unfused."""
    text, video, width = 226, 13 * 30 * 45, 1920
    table = torch.randn(2, 6, width, device="cuda", dtype=torch.bfloat16) * 0.3
    gates = (table[:, 2:3], table[:, 5:6])
    residuals = [torch.randn(2, n, width, device="cuda", dtype=torch.bfloat16) for n in (text, video)]
    sums = torch.compile(lambda out, text_residual, video_residual: [
        residual + gate * part for part, gate, residual in zip(
            out.view(2, text + video, width).split([text, video], dim=1), gates, (text_residual, video_residual))])
    rows = []
    for k in (1920, 7680):
        x_q, x_scale = quantize_per_token_fp8(torch.randn(2 * (text + video), k, device="cuda", dtype=torch.bfloat16))
        w = torch.randn(width, k, device="cuda")
        w_scale = w.abs().amax(dim=1) / 448
        w_q, bias = (w / w_scale[:, None]).to(torch.float8_e4m3fn), torch.randn(width, device="cuda")
        gemm = lambda: quantized_gemm(x_q, x_scale, None, w_q, w_scale, None, bias, torch.bfloat16)  # noqa: E731
        fused = lambda: quantized_gemm(x_q, x_scale, None, w_q, w_scale, None, bias, torch.bfloat16,  # noqa: E731
                                       gate=gates[0], residual=residuals[0], tail=(gates[1], residuals[1]))
        gemm_tile = fixed_config(x_q.shape[0], width, k, False)
        fused_gemm_tile = lambda: quantized_gemm(  # noqa: E731
            x_q, x_scale, None, w_q, w_scale, None, bias, torch.bfloat16, gate=gates[0], residual=residuals[0],
            tail=(gates[1], residuals[1]), config=gemm_tile)
        unfused = lambda: sums(gemm(), *residuals)  # noqa: E731
        row = {"case": f"cogvideox_text_video_residuals_k{k}", "m": x_q.shape[0], "n": width, "k": k,
               "rel_l2_fused_vs_unfused": [relative_l2(a, b) for a, b in zip(fused(), unfused())],
               "ms": {"fused_parts": _graph_median_ms(fused),
                      "fused_parts_gemm_tile": _graph_median_ms(fused_gemm_tile),
                      "gemm_then_inductor_residuals": _graph_median_ms(unfused), "gemm_alone": _graph_median_ms(gemm)},
               "gemm_tile": gemm_tile}
        row["speedup"] = row["ms"]["gemm_then_inductor_residuals"] / row["ms"]["fused_parts"]
        print("residual_parts", row, flush=True)
        rows.append(row)
    torch._dynamo.reset()
    return rows


def v_operand_benchmark() -> list[dict]:
    """The fp8 V operand of static attention as Inductor compiles it from SD3's joint attention (image + text values,
    concatenated along keys, quantized, transposed keys-innermost, keys padded to 16): with and without the
    concatenation, and under Inductor tiling options; each against the bytes it must move."""
    from fxquant.backends.triton.attention import kernel_operands

    batch, heads, image, text, dim = 2, 24, 4096, 333, 64
    image_v, text_v = (torch.randn(batch, n, heads * dim, device="cuda", dtype=torch.bfloat16) for n in (image, text))
    q = torch.randn(batch, heads, image + text, dim, device="cuda", dtype=torch.bfloat16)
    scales = torch.full((3,), 4.0 / 448, device="cuda")
    heads_first = lambda x: x.view(batch, -1, heads, dim).transpose(1, 2)  # noqa: E731

    def joint(image_v, text_v):
        values = torch.cat([heads_first(image_v), heads_first(text_v)], dim=2)
        return kernel_operands(q, q, values, True, scales)["v_op"]

    def single(image_v, text_v):
        return kernel_operands(q, q, heads_first(image_v), True, scales)["v_op"]

    rows = []
    for name, fn, options in (("joint", joint, {}), ("image_only", single, {}),
                              ("joint_prefer_nd_tiling", joint, {"triton.prefer_nd_tiling": True}),
                              ("joint_max_tiles_3", joint, {"triton.max_tiles": 3})):
        torch._dynamo.reset()
        compiled = torch.compile(fn, options=options)
        ms = _graph_median_ms(lambda: compiled(image_v, text_v))
        values = batch * heads * dim * (image + (text if fn is joint else 0))
        rows.append({"case": name, "ms": ms, "TBps_read_bf16_write_fp8": values * 3 / (ms * 1e-3) / 1e12})
        print("v_operand", rows[-1], flush=True)
    return rows


ATTENTION_OPERAND_CASES = {  # name -> (batch, tokens per part, heads, head dim): PixArt-alpha 1024's self-attention,
    "pixart": (2, [4096], 16, 72),  # SD3-medium's joint attention (image + text projections)
    "sd3_joint": (2, [4096, 333], 24, 64)}


def attention_operands_benchmark() -> list[dict]:
    """Static-fp8 attention operands from their q / k / v GEMMs: the epilogues writing the fp8 codes in the attention
    kernel's layout (linear_attention_operand) against GEMMs writing bf16 and Inductor's quantize + pad (+ concat,
    + transpose) pass (N-d tiling where parts are concatenated, as the backend asks); code mismatches against the
    fp32 reference; the attention kernel on the laid-out codes (tails masked) against it on bf16 operands."""
    from fxquant.backends.triton.attention import attention_fp8_codes
    from fxquant.backends.triton.gemm import attention_operand_gemm
    from fxquant.ops import attention_operand_reference, heads_first

    rows = []
    for case, (batch, tokens, heads, head_dim) in ATTENTION_OPERAND_CASES.items():
        width = heads * head_dim
        activations = [quantize_per_token_fp8(torch.randn(batch * count, width, device="cuda", dtype=torch.bfloat16))
                       for count in tokens]
        operands, laid_out = [], []
        for index in range(3):
            linears = [(*_fp8_weight(torch.randn(width, width, device="cuda") * 0.05),
                        torch.randn(width, device="cuda", dtype=torch.bfloat16)) for _ in tokens]
            parts = [list(part) for part in zip(*[(x_q, x_scale, w_q, w_scale, bias) for (x_q, x_scale), (
                w_q, w_scale, bias) in zip(activations, linears)])]
            outs = [heads_first(fp8_linear_reference(*linear, torch.float32), heads, count)
                    for *linear, count in zip(*parts, tokens)]
            scale = torch.cat(outs, dim=2).abs().amax() / FP8_MAX
            keys_major = index == 2
            fused = attention_operand_gemm(*parts, scale, heads, tokens, keys_major, traced=True)
            reference = attention_operand_reference(torch.cat(outs, dim=2), scale, keys_major)
            valid = (..., slice(head_dim), slice(sum(tokens))) if keys_major else (..., slice(head_dim))
            torch._dynamo.reset()
            layout = torch.compile(lambda *parts: attention_operand_reference(torch.cat(parts, dim=2), scale,
                                                                              keys_major),
                                   options={"triton.prefer_nd_tiling": True} if len(tokens) > 1 else {})

            def unfused(parts=parts):
                return layout(*[heads_first(quantized_gemm(x_q, x_scale, None, w_q, w_scale, None, bias,
                                                           torch.bfloat16, traced=True), heads, count)
                                for x_q, x_scale, w_q, w_scale, bias, count in zip(*parts, tokens)])

            row = {"case": case, "operand": "qkv"[index], "tokens": tokens, "code_mismatch_fraction":
                   (fused[valid].float() != reference[valid].float()).float().mean().item(),
                   "us": {"gemm_epilogue_writes_codes": 1e3 * _graph_median_ms(lambda: attention_operand_gemm(
                              *parts, scale, heads, tokens, keys_major, traced=True)),
                          "gemm_bf16_then_inductor_layout": 1e3 * _graph_median_ms(unfused)}}
            row["saved_us"] = row["us"]["gemm_bf16_then_inductor_layout"] - row["us"]["gemm_epilogue_writes_codes"]
            rows.append(row)
            print("attention_operands", row, flush=True)
            operands.append(torch.cat(outs, dim=2).to(torch.bfloat16))
            laid_out.append((fused, scale))
        scales = torch.stack([scale for _, scale in laid_out])
        codes = [fused for fused, _ in laid_out]
        q, k, v = operands
        n = sum(tokens)
        tune(batch, heads, n, n, head_dim, True, True, torch.bfloat16)  # both launches take the tuned tile
        on_codes = attention_fp8_codes(*codes, head_dim, head_dim**-0.5, scales, torch.bfloat16, traced=True)
        on_bf16 = quantized_attention(q, k, v, head_dim**-0.5, True, scales, traced=True)
        bf16_operands = kernel_operands(q, k, v, True, scales)
        rows.append({"case": case, "attention_rel_l2_vs_bf16_operands": relative_l2(on_codes, on_bf16),
                     "ms": {"laid_out_codes_masked_tails": _graph_median_ms(lambda: attention_fp8_codes(
                                *codes, head_dim, head_dim**-0.5, scales, torch.bfloat16, traced=True)),
                            "bf16_operands_kernel_only": _graph_median_ms(lambda: attend(q, bf16_operands,
                                                                                         head_dim**-0.5))}})
        print("attention_operands", rows[-1], flush=True)
    torch._dynamo.reset()
    return rows


OPERAND_PART_CASES = {  # name -> (heads, head dim, tokens per part): SD3's joint parts alone and together, a
    "sd3_joint": (24, 64, [4096, 333]), "sd3_image": (24, 64, [4096]),  # 16-aligned text part, PixArt
    "sd3_text": (24, 64, [333]), "sd3_text336": (24, 64, [336]), "sd3_joint_text336": (24, 64, [4096, 336]),
    "pixart": (16, 72, [4096])}


def operand_parts_benchmark() -> list[dict]:
    """attention_operand_gemm (batch 2) per set of parts, Q (token-major) and V (keys-major): which part of a joint
    operand costs what."""
    from fxquant.backends.triton.gemm import attention_operand_gemm

    rows = []
    for case, (heads, head_dim, tokens) in OPERAND_PART_CASES.items():
        width = heads * head_dim
        activations = [quantize_per_token_fp8(torch.randn(2 * count, width, device="cuda", dtype=torch.bfloat16))
                       for count in tokens]
        weights = [_fp8_weight(torch.randn(width, width, device="cuda") * 0.05) for _ in tokens]
        args = ([x for x, _ in activations], [s for _, s in activations], [w for w, _ in weights],
                [s for _, s in weights], [torch.randn(width, device="cuda", dtype=torch.bfloat16) for _ in tokens],
                torch.tensor([0.01], device="cuda"), heads, tokens)
        rows.append({"case": case, "tokens": tokens, "us": {
            operand: 1e3 * _graph_median_ms(lambda: attention_operand_gemm(*args, operand == "v", traced=True))
            for operand in ("q", "v")}})
        print("operand_parts", rows[-1], flush=True)
    return rows


CONV_SHAPES = [  # SDXL-size UNet convolutions at 1024 px (batch 2): (channels, size, out channels, kernel, stride)
    (320, 128, 320, 3, 1), (320, 128, 320, 3, 2), (640, 64, 640, 3, 1), (1280, 32, 1280, 3, 1), (640, 64, 1280, 1, 1)]


def _conv_case(channels: int, size: int, out_channels: int, kernel: int, stride: int) -> dict:
    """A CONV_SHAPES convolution (batch 2, "same" padding) on random bf16 data with its static quantizations: int8
    (scale / zero point of x, per-channel codes and their sums) and fp8 (absmax scales); weights channels-last."""
    x = torch.randn(2, channels, size, size, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(out_channels, channels, kernel, kernel, device="cuda", dtype=torch.bfloat16) * 0.05
    w_q, w_scale = quantize_weight_per_channel(w)
    w8, w8_scale = _fp8_weight(w.reshape(out_channels, -1))
    scale, zero = (p.reshape(1) for p in asymmetric_params(x.float().min(), x.float().max()))
    return dict(x=x, w=w, bias=torch.randn(out_channels, device="cuda", dtype=torch.bfloat16),
                geometry=([stride] * 2, [kernel // 2] * 2, [1, 1]),
                int8=(scale.float(), zero.int(), w_q.contiguous(memory_format=torch.channels_last), w_scale,
                      w_q.sum(dim=(1, 2, 3), dtype=torch.int32)),
                fp8=(fp8_scale(x.float().abs().amax()).reshape(1), None,
                     w8.reshape(w.shape).contiguous(memory_format=torch.channels_last), w8_scale, None))


def conv_benchmark() -> list[dict]:
    """The implicit-GEMM conv through its launcher: int8 with static activations and per-patch ones against the
    im2col reference (exactness), fp8 (static) against fxquant::fp8_conv2d's reference, and their times against cuDNN
    bf16 (NCHW and channels-last inputs). The launcher's times include its eager quantization of the input (static)
    or its parameter pass (per patch); the quantization alone, compiled as the backend leaves it to Inductor, is
    timed too. `conv_tiles` times the kernel alone."""
    from fxquant.backends.triton.conv import channels_last_codes, quantized_conv2d
    from fxquant.ops import fp8_conv2d_reference, int8_conv2d_reference

    rows = []
    for channels, size, out_channels, kernel, stride in CONV_SHAPES:
        case = _conv_case(channels, size, out_channels, kernel, stride)
        x, w, bias, geometry = case["x"], case["w"], case["bias"], case["geometry"]
        scale, zero, w_q, w_scale, w_sum = case["int8"]
        x8_scale, _, w8, w8_scale, _ = case["fp8"]
        out = quantized_conv2d(x, scale, zero, w_q, w_scale, w_sum, bias, *geometry, traced=True)
        reference = int8_conv2d_reference(x, scale, zero, w_q, w_scale, w_sum, bias, *geometry)
        per_patch = quantized_conv2d(x, None, None, w_q, w_scale, w_sum, bias, *geometry, traced=True)
        per_patch_reference = int8_conv2d_reference(x, None, None, w_q, w_scale, w_sum, bias, *geometry)
        fp8_out = quantized_conv2d(x, x8_scale, None, w8, w8_scale, None, bias, *geometry, traced=True)
        torch._dynamo.reset()
        codes = torch.compile(channels_last_codes)
        x_last = x.contiguous(memory_format=torch.channels_last)
        w_last = w.contiguous(memory_format=torch.channels_last)
        flops = 2 * out.numel() * channels * kernel * kernel
        row = {"shape": [2, channels, size, size, out_channels, kernel, stride],
               "rel_err_vs_reference": relative_l2(out, reference), "equal_to_reference": torch.equal(out, reference),
               "per_patch_rel_err_vs_reference": relative_l2(per_patch, per_patch_reference),
               "rel_err_vs_bf16_conv": relative_l2(out, F.conv2d(x, w, bias, *geometry)),
               "per_patch_rel_err_vs_bf16_conv": relative_l2(per_patch, F.conv2d(x, w, bias, *geometry)),
               "fp8_rel_err_vs_reference": relative_l2(fp8_out, fp8_conv2d_reference(x, x8_scale, w8, w8_scale, bias,
                                                                                      *geometry)),
               "fp8_rel_err_vs_bf16_conv": relative_l2(fp8_out, F.conv2d(x, w, bias, *geometry)),
               "ms": {"fxquant_int8_conv": _graph_median_ms(lambda: quantized_conv2d(
                          x, scale, zero, w_q, w_scale, w_sum, bias, *geometry, traced=True)),
                      "fxquant_fp8_conv": _graph_median_ms(lambda: quantized_conv2d(
                          x, x8_scale, None, w8, w8_scale, None, bias, *geometry, traced=True)),
                      "fxquant_int8_conv_per_patch": _graph_median_ms(lambda: quantized_conv2d(
                          x, None, None, w_q, w_scale, w_sum, bias, *geometry, traced=True)),
                      "quantize_input_compiled": _graph_median_ms(lambda: codes(x, scale, zero)),
                      "cudnn_bf16_nchw": _graph_median_ms(lambda: F.conv2d(x, w, bias, *geometry)),
                      "cudnn_bf16_channels_last": _graph_median_ms(lambda: F.conv2d(x_last, w_last, bias, *geometry))}}
        row["tops_fxquant"] = flops / (row["ms"]["fxquant_int8_conv"] * 1e-3) / 1e12
        row["speedup_vs_cudnn_nchw"] = row["ms"]["cudnn_bf16_nchw"] / row["ms"]["fxquant_int8_conv"]
        rows.append(row)
        print("conv", row, flush=True)
    torch._dynamo.reset()
    return rows


CONV_TILES = [(128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
              (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
              (128, 256, 128, 8, 3), (64, 128, 128, 4, 3)]  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages


def conv_tile_sweep(shapes=tuple(CONV_SHAPES)) -> list[dict]:
    """The implicit-GEMM conv kernel alone (static codes prepared once, channels-last) over CONV_TILES at every
    CONV_SHAPES shape, int8 and fp8 e4m3 operands, against cuDNN bf16 (NCHW and channels-last); int8 outputs
    checked equal to the default tile's, fp8 error against the bf16 conv."""
    from fxquant.backends.triton.conv import channels_last_codes, conv_config, launch_conv

    rows = []
    for channels, size, out_channels, kernel, stride in shapes:
        case = _conv_case(channels, size, out_channels, kernel, stride)
        x, w, bias, geometry = case["x"], case["w"], case["bias"], case["geometry"]
        exact = F.conv2d(x, w, bias, *geometry)
        operands = {}
        for name in ("int8", "fp8"):  # the kernel's operands: channels-last codes, weights [O, kh, kw, C]
            scale, zero, weights, w_scale, w_sum = case[name]
            operands[name] = (channels_last_codes(x, scale, zero), scale, zero, weights.permute(0, 2, 3, 1), w_scale,
                              w_sum)
        out = torch.empty_like(exact)
        m = out.shape[0] * out.shape[2] * out.shape[3]
        default = {name: launch_conv(*ops[:6], bias, torch.empty_like(exact), *geometry).clone()
                   for name, ops in operands.items()}
        row = {"shape": [2, channels, size, size, out_channels, kernel, stride],
               "default_tile": {name: conv_config(m, out_channels, name == "fp8") for name in operands},
               "fp8_rel_err_vs_bf16_conv": relative_l2(default["fp8"], exact),
               "int8_rel_err_vs_bf16_conv": relative_l2(default["int8"], exact),
               "ms": {"cudnn_bf16_nchw": _graph_median_ms(lambda: F.conv2d(x, w, bias, *geometry))}}
        x_last, w_last = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
        row["ms"]["cudnn_bf16_channels_last"] = _graph_median_ms(lambda: F.conv2d(x_last, w_last, bias, *geometry))
        for bm, bn, bk, warps, stages in CONV_TILES:
            config = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
            for name, ops in operands.items():
                label = f"{name}_{bm}x{bn}x{bk}_w{warps}_s{stages}"
                try:
                    result = launch_conv(*ops[:6], bias, out, *geometry, config=config)
                    if name == "int8" and not torch.equal(result, default[name]):
                        row.setdefault("int8_tiles_not_equal_to_default", []).append(label)
                    row["ms"][label] = _graph_median_ms(lambda: launch_conv(*ops[:6], bias, out, *geometry,
                                                                            config=config))
                except Exception as err:  # e.g. shared memory: recorded, the sweep goes on
                    row["ms"][label] = None
                    row.setdefault("errors", {})[label] = _error_row(err)["error"]
        for name in operands:
            timed = {k: v for k, v in row["ms"].items() if k.startswith(name) and v}
            best = min(timed, key=timed.get)
            row[f"best_{name}"] = best
            row[f"best_{name}_vs_cudnn_channels_last"] = row["ms"]["cudnn_bf16_channels_last"] / timed[best]
        rows.append(row)
        print("conv_tiles", row, flush=True)
    return rows


# (input shape, prologue) of the quantizations whose launch config is swept: every benchmarked model's widths
QUANTIZE_SWEEP_CASES = {"pixart_1152_layernorm_adaln": ((8192, 1152), dict(norm="layer", eps=1e-6), True),
                        "pixart_1152_plain": ((8192, 1152), {}, False),
                        "pixart_4608_gelu_tanh": ((8192, 4608), dict(activation="gelu_tanh"), False),
                        "sd3_1536_layernorm_adaln": ((8192, 1536), dict(norm="layer", eps=1e-6), True),
                        "flux_3072_layernorm_adaln": ((4608, 3072), dict(norm="layer", eps=1e-6), True),
                        "sdxl_640_layernorm": ((8192, 640), dict(norm="layer", eps=1e-5), False),
                        "sdxl_1280_geglu": ((2048, 2 * 5120), dict(activation="geglu"), False),
                        # CogVideoX-2B's text / video concat prologue (two samples of 226 + 17550 tokens), as the
                        # backend launches it (LayerNorm without affine: folded into each part's modulation)
                        "cogvideox_1920_concat_layernorm_adaln": ((2, 226, 17550, 1920), dict(norm="layer", eps=1e-5),
                                                                  True)}


def quantize_config_sweep(names: list[str] | None = None) -> list[dict]:
    """Time the quantize kernel over (rows per program, warps) at every case's shape ([M, C], or [B, T_head,
    T_tail, C] for the concat form), int8 and fp8, against the launcher's current rule (`_launch_config`)."""
    from fxquant.backends.triton import quantize as kernels

    rows = []
    for name, (shape, spec, adaln) in QUANTIZE_SWEEP_CASES.items():
        if names and name not in names:
            continue
        concat = len(shape) == 4
        parts = [torch.randn((shape[0], tokens, shape[-1]) if concat else shape, device="cuda",
                             dtype=torch.bfloat16) * 2 + 0.1 for tokens in (shape[1:3] if concat else (0,))]
        width = shape[-1] // (2 if spec.get("activation") == "geglu" else 1)
        m = sum(part.numel() for part in parts) // shape[-1]
        mods = [torch.randn((shape[0], 1, width) if concat else (1, width), device="cuda", dtype=torch.bfloat16)
                if adaln else None for _ in range(4 if concat else 2)]
        operands = dict(mul=mods[0], add=mods[1], **dict(tail=parts[1], tail_mul=mods[2], tail_add=mods[3])
                        if concat else {}, **spec)
        block = triton.next_power_of_2(width)
        default = kernels._launch_config(width, spec.get("activation") == "geglu", concat)
        for fp8 in (False, True):
            times = {}
            for rows_per_program in (1, 2, 4, 8, 16):
                for warps in (1, 2, 4, 8, 16):
                    if rows_per_program * block // (32 * warps) > 128 or rows_per_program * block < 32 * warps:
                        continue  # register spill / idle threads
                    launch = lambda: kernels.fused_quantize_per_token(  # noqa: E731
                        parts[0], fp8=fp8, config=(rows_per_program, warps), **operands)
                    times[f"{rows_per_program}x{warps}"] = _graph_median_ms(launch)
            best = min(times, key=times.get)
            current = times.get(f"{default[0]}x{default[2]}")
            bytes_moved = sum(part.numel() * part.element_size() for part in parts) + m * width
            rows.append({"case": name, "shape": list(shape), "fp8": fp8, "ms_by_rows_x_warps": times,
                         "best": best, "best_ms": times[best], "current": f"{default[0]}x{default[2]}",
                         "current_ms": current, "best_TBps": bytes_moved / (times[best] * 1e-3) / 1e12})
            print("quantize_configs", name, "fp8" if fp8 else "int8", "best", best, round(times[best], 4),
                  "current", rows[-1]["current"], current and round(current, 4), flush=True)
    return rows


EPILOGUE_CONFIGS = [(128, 256, 128, 8, 3), (128, 128, 128, 8, 3), (128, 128, 128, 4, 4), (256, 128, 128, 8, 3),
                    (64, 256, 128, 4, 3), (128, 256, 64, 8, 4)]  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages


def _gemm_tile(bm: int, bn: int, bk: int, warps: int, stages: int, *fill: int) -> tuple[str, dict]:
    """A GEMM tile (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, FILL_M, FILL_N]) -> (its label in the sweeps' JSON,
    the launch config); with fill tiles, the rows past the main tiles' full waves take FILL_M x FILL_N tiles."""
    config = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
    if fill:
        config.update(FILL_M=fill[0], FILL_N=fill[1])
    return f"{bm}x{bn}x{bk}_w{warps}_s{stages}" + ("_f{}x{}".format(*fill) if fill else ""), config


def _tile_of_label(label: str) -> dict:
    """The launch config of a `_gemm_tile` label."""
    sizes, warps, stages, *fill = label.split("_")
    return _gemm_tile(*map(int, sizes.split("x")), int(warps[1:]), int(stages[1:]),
                      *(map(int, fill[0][1:].split("x")) if fill else ()))[1]


def epilogue_sweep() -> list[dict]:
    """The fp8 GEMM at PixArt's output-projection shapes (M 8192, K 1152 / 4608, N 1152) per tile config: plain,
    + residual, + gate (per element or per tile) + residual; at its first feed-forward GEMM's (K 1152, N 4608):
    plain, + GELU (tanh) writing fp8 codes; each a traced-style launch."""
    rows = []
    for k, n in ((1152, 1152), (4608, 1152), (1152, 4608)):
        m = 8192
        q8, s8 = quantize_per_token_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        w8, ws8 = _fp8_weight(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        residual = torch.randn(2, m // 2, n, device="cuda", dtype=torch.bfloat16)
        gate = torch.randn(2, 6, n, device="cuda", dtype=torch.bfloat16)[:, 2:3]
        variants = {"plain": {}, "residual": dict(residual=residual),
                    "gate_per_element_residual": dict(gate=gate, residual=residual, gate_per_tile=False),
                    "gate_per_tile_residual": dict(gate=gate, residual=residual, gate_per_tile=True)}
        if n > k:  # the feed-forward's first GEMM: no residual; the GELU and the next GEMM's fp8 codes instead
            variants = {"plain": {}, "gelu_tanh_fp8_codes": dict(activation="gelu_tanh",
                                                                 out_scale=torch.full((1,), 0.01, device="cuda"))}
        for tile in EPILOGUE_CONFIGS:
            _, config = _gemm_tile(*tile)
            row = {"M": m, "K": k, "N": n, "config": config, "us": {}}
            for name, extra in variants.items():
                row["us"][name] = 1e3 * _graph_median_ms(lambda: quantized_gemm(
                    q8, s8, None, w8, ws8, None, bias, torch.bfloat16, traced=True, config=config, **extra))
            rows.append(row)
            print("epilogue", k, n, tile, {key: round(t, 1) for key, t in row["us"].items()},
                  flush=True)
    return rows


# (name, M, K, N, epilogue) of the fp8 GEMMs in CogVideoX-2B's and SD3-medium's blocks (batch 2): attention
# projections, the first feed-forward GEMM with its GELU + fp8-codes epilogue, the second
MODEL_GEMMS = [("cogvideox_proj", 35552, 1920, 1920, None), ("cogvideox_ff1", 35552, 1920, 7680, "gelu_tanh"),
               ("cogvideox_ff2", 35552, 7680, 1920, None), ("sd3_proj", 8858, 1536, 1536, None),
               ("sd3_ff1", 8858, 1536, 6144, "gelu_tanh"), ("sd3_ff2", 8858, 6144, 1536, None),
               # SDXL at 1024 px, batch 2: 60 of its 70 transformer blocks at 1280 channels x 1024 tokens (q / k / v /
               # out: 160 tiles of 128 x 128 on 132 SMs, 1.2 waves), the other 10 at 640 x 4096
               ("sdxl_proj", 2048, 1280, 1280, None), ("sdxl_ff1", 2048, 1280, 10240, "geglu"),
               ("sdxl_ff2", 2048, 5120, 1280, None), ("sdxl_proj_640", 8192, 640, 640, None),
               ("sdxl_ff1_640", 8192, 640, 5120, "geglu"), ("sdxl_ff2_640", 8192, 2560, 640, None)]
# tiles `model_gemm_sweep` times: the autotuner's list, the epilogue sweep's, and deeper / wider Hopper tiles
MODEL_GEMM_TILES = sorted({*EPILOGUE_CONFIGS, (128, 256, 128, 8, 4), (256, 128, 128, 8, 4), (128, 256, 64, 8, 3),
                           (256, 128, 64, 8, 4), (128, 128, 64, 4, 5), (256, 256, 64, 8, 3),
                           # 64-row / 64-column tiles: 2-4 programs per SM, so that SDXL's 1.2 waves of 128 x 128
                           # tiles become many short ones
                           (64, 128, 128, 4, 4), (64, 128, 128, 4, 5), (64, 128, 256, 4, 3), (128, 64, 128, 4, 4),
                           (64, 64, 128, 4, 4), (64, 64, 256, 4, 3),
                           # 128 x 128 tiles over the full waves, smaller ones over the last wave's rows
                           (128, 128, 128, 8, 3, 64, 64), (128, 128, 128, 8, 3, 64, 128),
                           (128, 128, 128, 8, 3, 128, 64), (128, 128, 128, 4, 4, 64, 64)})


def model_gemm_sweep(names: list[str] | None = None, tiles: list[str] | None = None) -> list[dict]:
    """The fp8 GEMM at MODEL_GEMMS per tile of MODEL_GEMM_TILES (or the `_gemm_tile` labels `tiles`; traced-style
    launches, the model's epilogue) against the compile backend's tile (`fixed_config`), cuBLAS fp8 and bf16:
    TFLOP/s, whether the backend's rule picks the fastest tile at these larger shapes, and each tile's output against
    a plain 128 x 128 tile's (relative L2; 0 where the tiles add the same products in the same order)."""
    rows = []
    for name, m, k, n, activation in MODEL_GEMMS:
        if names and name not in names:
            continue
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        q8, s8 = quantize_per_token_fp8(x)
        w8, ws8 = _fp8_weight(w)
        extra = dict(activation=activation, out_scale=torch.full((1,), 0.01, device="cuda")) if activation else {}
        flops = 2 * m * n * k
        gated = bool(activation) and activation.startswith("geglu")  # (n weight rows: n / 2 outputs)
        fixed = fixed_config(m, n // 2 if gated else n, k, False, gated=gated)
        times = {"bf16_cublas": _graph_median_ms(lambda: torch.nn.functional.linear(x, w, bias)),
                 "fp8_cublas_scaled_mm": _graph_median_ms(lambda: torch._scaled_mm(
                     q8, w8.t(), scale_a=s8, scale_b=ws8[None, :].contiguous(), bias=bias, out_dtype=torch.bfloat16)),
                 "fxquant_fixed_config": _graph_median_ms(lambda: quantized_gemm(
                     q8, s8, None, w8, ws8, None, bias, torch.bfloat16, traced=True, **extra))}
        errors, rel_l2 = {}, {}
        plain = quantized_gemm(q8, s8, None, w8, ws8, None, bias, torch.bfloat16, traced=True,
                               config=_tile_of_label("128x128x128_w8_s3"), **extra).float()
        for key, config in ([(label, _tile_of_label(label)) for label in tiles] if tiles else
                            [_gemm_tile(*tile) for tile in MODEL_GEMM_TILES]):
            launch = lambda: quantized_gemm(q8, s8, None, w8, ws8, None, bias, torch.bfloat16,  # noqa: E731
                                            traced=True, config=config, **extra)
            try:
                rel_l2[key] = relative_l2(launch().float(), plain)
                times[key] = _graph_median_ms(launch)
            except Exception as err:  # out of shared memory / registers: recorded
                errors[key] = _error_row(err)["error"]
        tile_times = {key: t for key, t in times.items() if key[0].isdigit()}
        best = min(tile_times, key=tile_times.get)
        row = {"name": name, "M": m, "K": k, "N": n, "epilogue": activation, "ms": times, "errors": errors,
               "tflops": {key: flops / (t * 1e-3) / 1e12 for key, t in times.items()}, "best": best,
               "fixed_config": fixed, "best_vs_fixed_config": times["fxquant_fixed_config"] / times[best],
               "rel_l2_vs_128x128": rel_l2}
        rows.append(row)
        print("model gemm", name, {key: round(row["tflops"][key]) for key in
                                   ("bf16_cublas", "fp8_cublas_scaled_mm", "fxquant_fixed_config", best)},
              "best", best, "fixed", fixed, flush=True)
    return rows


def _autotuned_configs(m: int, n: int, k: int) -> dict:
    """The tile configs the autotuner chose for this problem, per kernel variant (its cache key -> config)."""
    from fxquant.backends.triton.gemm import _autotuned_gemm_kernel

    return {str(key): str(config) for key, config in _autotuned_gemm_kernel.cache.items()
            if tuple(key[:3]) == (m, n, k)}


def gemm_benchmark() -> list[dict]:
    """TFLOP/s of bf16 / int8 / fp8 cuBLAS and fxquant's Triton kernels (W8A8 int8 / fp8, W4A8, W2A8) at DiT
    shapes, M = 8192 (compute-bound) and 256 (memory-bound); the fp8 GEMM with a gated residual add in its
    epilogue against the same GEMM followed by Inductor's fused gate + residual kernel."""
    rows = []
    gated_residual = torch.compile(lambda residual, gate, out: residual + gate * out.view(residual.shape))
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
            w4, ws4, wsum4 = _packed_weight(w, 4)
            w2, ws2, wsum2 = _packed_weight(w, 2)
            w8_t = w8.t()
            ws8_row = ws8[None, :].contiguous()
            residual = torch.randn(2, m // 2, n, device="cuda", dtype=torch.bfloat16)  # 2 samples, adaLN-Zero gate
            gate = torch.randn(2, 1, n, device="cuda", dtype=torch.bfloat16)
            flops = 2 * m * n * k
            times = {
                "bf16_cublas": _graph_median_ms(lambda: torch.nn.functional.linear(x, w, bias)),
                "int8_cublas_int_mm": _graph_median_ms(lambda: torch._int_mm(q, wq.t())) if m > 16 else None,
                "fp8_cublas_scaled_mm": _graph_median_ms(lambda: torch._scaled_mm(
                    q8, w8_t, scale_a=s8, scale_b=ws8_row, bias=bias, out_dtype=torch.bfloat16)),
                "fxquant_int8_gemm": _graph_median_ms(
                    lambda: quantized_gemm(q, s, z, wq, ws, wsum, bias, torch.bfloat16, config="autotune")),
                "fxquant_int8_gemm_fixed_config": _graph_median_ms(
                    lambda: quantized_gemm(q, s, z, wq, ws, wsum, bias, torch.bfloat16, traced=True)),
                "fxquant_fp8_gemm": _graph_median_ms(
                    lambda: quantized_gemm(q8, s8, None, w8, ws8, None, bias, torch.bfloat16, config="autotune")),
                "fxquant_fp8_gemm_fixed_config": _graph_median_ms(
                    lambda: quantized_gemm(q8, s8, None, w8, ws8, None, bias, torch.bfloat16, traced=True)),
                "fxquant_fp8_gemm_gate_residual_fixed_config": _graph_median_ms(
                    lambda: quantized_gemm(q8, s8, None, w8, ws8, None, bias, torch.bfloat16, traced=True, gate=gate,
                                           residual=residual)),
                "fxquant_fp8_gemm_fixed_config_then_inductor_gate_residual": _graph_median_ms(
                    lambda: gated_residual(residual, gate, quantized_gemm(q8, s8, None, w8, ws8, None, bias,
                                                                          torch.bfloat16, traced=True))),
                "fxquant_w4a8_gemm": _graph_median_ms(
                    lambda: quantized_gemm(q, s, z, w4, ws4, wsum4, bias, torch.bfloat16, 4, config="autotune")),
                "fxquant_w2a8_gemm": _graph_median_ms(
                    lambda: quantized_gemm(q, s, z, w2, ws2, wsum2, bias, torch.bfloat16, 2, config="autotune")),
                "fxquant_int8_quantize_plus_gemm": _graph_median_ms(
                    lambda: quantized_gemm(*quantize_per_token(x), wq, ws, wsum, bias, torch.bfloat16,
                                           config="autotune")),
                "fxquant_int8_quantize_only": _graph_median_ms(lambda: quantize_per_token(x)),
            }
            row = {"M": m, "K": k, "N": n, "ms": times, "autotuned_configs": _autotuned_configs(m, n, k),
                   "tflops": {name: (flops / (t * 1e-3) / 1e12 if t else None) for name, t in times.items()
                              if name != "fxquant_int8_quantize_only"}}
            bf16 = times["bf16_cublas"]
            row["speedup_vs_bf16"] = {name: (bf16 / t if t else None) for name, t in times.items()}
            rows.append(row)
            print("gemm", m, k, n, {kk: round(v, 1) for kk, v in row["tflops"].items() if v}, flush=True)
    return rows


def packed_gemm_sweep() -> list[dict]:
    """W4A8 against W8A8 from few tokens (memory-bound) to many (compute-bound): the packed weights unpacked in the
    GEMM's K loop or by the unpack kernel before the int8 GEMM (and that kernel alone), at PixArt's first
    feed-forward shape and Flux's (K 3072, N 12288)."""
    rows = []
    for k, n in ((1152, 4608), (3072, 12288)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        wq, ws = quantize_weight_per_channel(w)
        wsum = wq.sum(dim=1, dtype=torch.int32)
        w8, ws8 = _fp8_weight(w)
        w4, ws4, wsum4 = _packed_weight(w, 4)
        for m in (16, 64, 256, 1024, 4096, 8192):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q, s, z = quantize_per_token(x)
            q8, s8 = quantize_per_token_fp8(x)
            times = {
                "bf16_cublas": _graph_median_ms(lambda: torch.nn.functional.linear(x, w, bias)),
                "fxquant_int8_gemm": _graph_median_ms(
                    lambda: quantized_gemm(q, s, z, wq, ws, wsum, bias, torch.bfloat16, config="autotune")),
                "fxquant_fp8_gemm": _graph_median_ms(
                    lambda: quantized_gemm(q8, s8, None, w8, ws8, None, bias, torch.bfloat16, config="autotune")),
                "fxquant_w4a8_k_loop": _graph_median_ms(
                    lambda: quantized_gemm(q, s, z, w4, ws4, wsum4, bias, torch.bfloat16, 4, unpack_first=False,
                                           config="autotune")),
                "fxquant_w4a8_unpack_first": _graph_median_ms(
                    lambda: quantized_gemm(q, s, z, w4, ws4, wsum4, bias, torch.bfloat16, 4, unpack_first=True,
                                           config="autotune")),
                "fxquant_w4_unpack_only": _graph_median_ms(lambda: unpack_weights(w4, 4)),
            }
            row = {"M": m, "K": k, "N": n, "ms": times,
                   "speedup_vs_int8": {name: times["fxquant_int8_gemm"] / t for name, t in times.items()}}
            rows.append(row)
            print("packed", m, k, n, {name: round(t * 1e3, 1) for name, t in times.items()}, "us", flush=True)
    return rows


# tiles of the packed (W4A8) K-loop kernel timed by `packed_tile_sweep` (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages):
# BLOCK_M is the MMA's narrow side (the product runs transposed), BLOCK_N < 64 leaves Hopper's warpgroup MMA
# (session 28: the 16 x 32 and 512-deep tiles, never the fastest in session 27's sweep, gave way to 128-deep ones, whose
# K steps divide PixArt's K = 1152 where 256-deep ones leave half a step masked)
PACKED_TILES = [(16, 64, 256, 4, 3), (16, 64, 256, 4, 4), (16, 64, 128, 4, 4), (16, 128, 256, 4, 3),
                (16, 128, 256, 8, 3), (32, 64, 256, 4, 3), (32, 64, 128, 4, 4), (32, 128, 256, 4, 3),
                (64, 64, 256, 4, 3), (64, 64, 128, 4, 4), (64, 128, 256, 4, 3), (128, 64, 256, 4, 3),
                (128, 128, 256, 8, 3), (128, 128, 128, 8, 4)]
COLD_L2_BYTES = 150 * 2**20  # weight copies rotated per timing: 3x an H100's 50 MB L2


def _weight_copies(weight_bytes: int) -> int:
    """Weight copies rotated so that each call reads its weights from memory (COLD_L2_BYTES in all, at most 256)."""
    return min(256, -(-COLD_L2_BYTES // weight_bytes))


def _cold_ms(call, weight_bytes: int) -> float:
    """Median time of call(i) over rotating weight copies i (`_weight_copies`: as a model whose weights exceed the
    L2 cache reads them), per call, as CUDA-graph replays."""
    copies = _weight_copies(weight_bytes)
    return do_bench_cudagraph(lambda: [call(i) for i in range(copies)], rep=100, return_mode="median") / copies


def packed_tile_sweep() -> list[dict]:
    """Few tokens (M 16 / 64 / 256), where a linear is memory-bound: W4A8 against int8 and against fp8 activations
    (K-loop unpacking; an fp8 layer's sign / magnitude codes) at each tile of PACKED_TILES and at the compile
    backend's tile (`fixed_config`, which unpacks first from UNPACK_MIN_TOKENS(_FP8) on), against the W8A8 int8 / fp8
    GEMMs (autotuned and at the backend's tile) and bf16 cuBLAS, every weight read from memory (rotating copies,
    `_cold_ms`), at PixArt's attention and first feed-forward shapes and Flux's feed-forward."""
    from fxquant.backends.triton.gemm import UNPACK_MIN_TOKENS, UNPACK_MIN_TOKENS_FP8, fixed_config

    rows = []
    for k, n in ((3072, 12288), (1152, 4608), (1152, 1152)):  # largest first (a run cut short keeps those)
        copies = _weight_copies(n * k // 2)  # enough for the smallest (4-bit) weights
        w = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05 for _ in range(2)]
        w = [w[i % 2] + i * 1e-3 for i in range(copies)]  # distinct tensors
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        int8 = [quantize_weight_per_channel(x) for x in w]
        wsum = int8[0][0].sum(dim=1, dtype=torch.int32)
        fp8 = [_fp8_weight(x) for x in w]
        w4 = [_packed_weight(x, 4) for x in w]
        w4f = [_packed_weight(x, 4, fp8=True) for x in w]
        for m in (16, 64, 256):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q, s, z = quantize_per_token(x)
            q8, s8 = quantize_per_token_fp8(x)
            times = {
                "bf16_cublas": _cold_ms(lambda i: torch.nn.functional.linear(x, w[i], bias), n * k * 2),
                "fxquant_int8_gemm": _cold_ms(
                    lambda i: quantized_gemm(q, s, z, *int8[i], wsum, bias, torch.bfloat16, config="autotune"), n * k),
                "fxquant_int8_gemm_fixed_config": _cold_ms(
                    lambda i: quantized_gemm(q, s, z, *int8[i], wsum, bias, torch.bfloat16, traced=True), n * k),
                "fxquant_fp8_gemm": _cold_ms(
                    lambda i: quantized_gemm(q8, s8, None, *fp8[i], None, bias, torch.bfloat16, config="autotune"),
                    n * k),
                "fxquant_fp8_gemm_fixed_config": _cold_ms(
                    lambda i: quantized_gemm(q8, s8, None, *fp8[i], None, bias, torch.bfloat16, traced=True), n * k),
                "fxquant_w4a8_fixed_config": _cold_ms(
                    lambda i: quantized_gemm(q, s, z, w4[i][0], w4[i][1], w4[i][2], bias, torch.bfloat16, 4,
                                             traced=True), n * k // 2),
                "fxquant_w4a8_fp8_fixed_config": _cold_ms(  # int4 codes as e4m3 against fp8 activations
                    lambda i: quantized_gemm(q8, s8, None, w4f[i][0], w4f[i][1], None, bias, torch.bfloat16, 4,
                                             traced=True), n * k // 2),
            }
            w4_fp8_error = relative_l2(  # against the fp32 product of the codes (Hopper's fp8 accumulation: ~1e-3)
                quantized_gemm(q8, s8, None, w4f[0][0], w4f[0][1], None, bias, torch.float32, 4, traced=True),
                fp8_linear_reference(q8, s8, unpack_bits(w4[0][0], 4), w4f[0][1], bias, torch.float32))
            w4_int_error = relative_l2(  # int32 sums: exact up to the output's rounding
                quantized_gemm(q, s, z, *w4[0], bias, torch.float32, 4, traced=True),
                int8_linear_reference(q, s, z, unpack_bits(w4[0][0], 4), w4[0][1], w4[0][2], bias, torch.float32))
            errors = {}
            references = {"w4a8": quantized_gemm(q, s, z, *w4[0], bias, torch.bfloat16, 4, unpack_first=False),
                          "w4a8_fp8": quantized_gemm(q8, s8, None, w4f[0][0], w4f[0][1], None, bias, torch.bfloat16,
                                                     4, unpack_first=False)}
            kloop = {kind: fixed_config(m, n, k, kind == "w4a8", packed=True) for kind in references}
            tiles = [(label, {kind: config for kind in references})
                     for label, config in (_gemm_tile(*tile) for tile in PACKED_TILES)]
            for accumulators in (2, 1):  # the K loop at the backend's tile, fields' products in two accumulators / one
                tiles.append((f"kloop_fixed_config_{accumulators}_accumulators",
                              {kind: {**kloop[kind], "FIELD_ACCUMULATORS": accumulators} for kind in references}))
            for label, configs in tiles:
                for kind, (a, a_scale, a_zero, weights) in (("w4a8", (q, s, z, w4)), ("w4a8_fp8", (q8, s8, None, w4f))):
                    config = configs[kind]
                    key = f"fxquant_{kind}_{label}"
                    try:
                        call = lambda i: quantized_gemm(  # noqa: E731
                            a, a_scale, a_zero, weights[i][0], weights[i][1], None if a_zero is None else weights[i][2],
                            bias, torch.bfloat16, 4, traced=True, config=config, unpack_first=False)
                        if kind == "w4a8" and not torch.equal(call(0), references[kind]):  # int32 sums: exact
                            raise AssertionError("output differs from the W4A8 kernel's at the backend's tile")
                        if kind == "w4a8_fp8" and relative_l2(call(0), references[kind]) > 1e-2:  # fp8 MMA order
                            raise AssertionError("output differs from the W4A8 fp8 kernel's at the backend's tile")
                        times[key] = _cold_ms(call, n * k // 2)
                    except Exception as err:  # out of resources: recorded
                        errors[key] = _error_row(err)["error"]
            best = {kind: min((key for key in times if key.startswith(f"fxquant_{kind}_") and "fixed_config" not in key
                               and (kind == "w4a8_fp8") == ("fp8" in key)), key=times.get)
                    for kind in ("w4a8", "w4a8_fp8")}
            int8_ms = times["fxquant_int8_gemm"]
            row = {"M": m, "K": k, "N": n, "weight_copies": copies, "ms": times, "errors": errors,
                   "w4a8_fp8_rel_l2_vs_fp32": w4_fp8_error, "w4a8_rel_l2_vs_reference": w4_int_error,
                   "w4a8_fp8_speedup_vs_fp8_fixed_config":  # both at the tile the compile backend launches
                       times["fxquant_fp8_gemm_fixed_config"] / times["fxquant_w4a8_fp8_fixed_config"],
                   "w4a8_fp8_best_tile_speedup_vs_fp8_fixed_config":
                       times["fxquant_fp8_gemm_fixed_config"] / times[best["w4a8_fp8"]],
                   "fixed_config_int8": fixed_config(m, n, k, True),
                   "fixed_config_w4a8": fixed_config(m, n, k, True, packed=m < UNPACK_MIN_TOKENS),
                   "fixed_config_w4a8_fp8": fixed_config(m, n, k, False, packed=m < UNPACK_MIN_TOKENS_FP8),
                   "best_w4a8": best["w4a8"], "best_w4a8_fp8": best["w4a8_fp8"],
                   "speedup_vs_int8": {key: int8_ms / t for key, t in times.items()}}
            rows.append(row)
            print("packed tiles", m, k, n, {key: round(t * 1e3, 1) for key, t in times.items()
                                            if "w4a8_" not in key or key in best.values() or "fixed" in key},
                  "best", best, "w4a8_fp8 error", f"{w4_fp8_error:.2e}", "w4a8 error", f"{w4_int_error:.2e}",
                  flush=True)
    return rows


# (name, M, K, N) of the 8-bit GEMMs the compile backend runs at a few hundred tokens (fixed_config's m < 1024
# rule): PixArt's cross-attention K / V on 2 x 120 text tokens, SD3's context stream (2 x 333) and Flux's text
# stream (512), and 256 tokens at PixArt's widths (a batch-1 256 px image)
FEW_TOKEN_GEMMS = [("pixart_cross_kv", 240, 1152, 1152), ("pixart_256_ff1", 256, 1152, 4608),
                   ("pixart_256_ff2", 256, 4608, 1152), ("sd3_context_proj", 666, 1536, 1536),
                   ("sd3_context_ff1", 666, 1536, 6144), ("sd3_context_ff2", 666, 6144, 1536),
                   ("flux_text_proj", 512, 3072, 3072), ("flux_text_ff1", 512, 3072, 12288),
                   ("flux_text_ff2", 512, 12288, 3072)]
FEW_TOKEN_TILES = [(64, 64, 256, 4, 3), (64, 64, 128, 4, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4),
                   (128, 128, 128, 4, 4), (128, 128, 128, 8, 3), (32, 64, 128, 4, 4), (32, 128, 128, 4, 4),
                   (128, 256, 128, 8, 3), (64, 256, 128, 8, 3)]


def few_token_tile_sweep() -> list[dict]:
    """The fp8 and int8 W8A8 GEMMs at FEW_TOKEN_GEMMS per tile of FEW_TOKEN_TILES against the compile backend's tile
    (`fixed_config`) and bf16 cuBLAS, every weight read from memory (rotating copies, `_cold_ms`): which tile the
    m < 1024 rule should take (the autotuner beat it at 256 tokens: packed-tiles-sign-magnitude.json)."""
    rows = []
    for name, m, k, n in FEW_TOKEN_GEMMS:
        copies = _weight_copies(n * k)
        w = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05 + i * 1e-3 for i in range(copies)]
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        q, s, z = quantize_per_token(x)
        q8, s8 = quantize_per_token_fp8(x)
        int8 = [quantize_weight_per_channel(weight) for weight in w]
        wsum = int8[0][0].sum(dim=1, dtype=torch.int32)
        fp8 = [_fp8_weight(weight) for weight in w]
        launches = {"fp8": lambda i, **config: quantized_gemm(q8, s8, None, *fp8[i], None, bias, torch.bfloat16,
                                                              traced=True, **config),
                    "int8": lambda i, **config: quantized_gemm(q, s, z, *int8[i], wsum, bias, torch.bfloat16,
                                                               traced=True, **config)}
        times = {"bf16_cublas": _cold_ms(lambda i: F.linear(x, w[i], bias), n * k * 2)}
        errors, best, fixed = {}, {}, {}
        for kind, launch in launches.items():
            times[f"{kind}_fixed_config"] = _cold_ms(launch, n * k)
            fixed[kind] = fixed_config(m, n, k, kind == "int8")
            reference = launch(0)
            for tile in FEW_TOKEN_TILES:
                label, config = _gemm_tile(*tile)
                try:
                    if relative_l2(launch(0, config=config), reference) > 1e-2:  # the MMA order differs a little
                        raise AssertionError("output differs from the kernel's at the backend's tile")
                    times[f"{kind}_{label}"] = _cold_ms(lambda i: launch(i, config=config), n * k)
                except Exception as err:  # out of shared memory: recorded
                    errors[f"{kind}_{label}"] = _error_row(err)["error"]
            best[kind] = min((key for key in times if key.startswith(f"{kind}_") and key[len(kind) + 1].isdigit()),
                             key=times.get)
        row = {"name": name, "M": m, "K": k, "N": n, "weight_copies": copies, "ms": times, "errors": errors,
               "fixed_config": fixed, "best": best,
               "fixed_vs_best": {kind: times[f"{kind}_fixed_config"] / times[key] for kind, key in best.items()}}
        rows.append(row)
        print("few-token tiles", name, {key: round(times[key] * 1e3, 1) for key in
                                        ("bf16_cublas", "fp8_fixed_config", best["fp8"], "int8_fixed_config",
                                         best["int8"])}, flush=True)
    return rows


def _attention_inputs(batch: int, heads: int, tokens: int, head_dim: int):
    """bf16 q / k / v in diffusers' layout ([B, H, N, D] views of [B, N, H, D]); keys share an offset."""
    q, k, v = (torch.randn(batch, tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    return q, k * 2 + 0.5, v


ATTENTION_FORMATS = {"int8": (False, False), "int8_fp8": (True, False), "fp8_static": (True, True)}  # (pv_fp8, static)


def attention_benchmark(shapes=tuple(ATTENTION_SHAPES)) -> list[dict]:
    """fxquant's quantized attention against SDPA (bf16, PyTorch's fastest backend) at the models' shapes: errors
    against fp32 SDPA and (PixArt) against the reference op, times of SDPA, the whole op (operands + kernel; eager and
    compiled, where Inductor fuses the operand quantization), of the operand quantization alone and of the kernel alone
    on prepared operands. fp8_static takes each operand's own absmax / 448 as its static scale (a calibration that
    saw this call)."""
    rows = []
    for name in shapes:
        batch, heads, tokens, head_dim = ATTENTION_SHAPES[name]
        q, k, v = _attention_inputs(batch, heads, tokens, head_dim)
        scale = head_dim**-0.5
        exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        calibrated = torch.stack([x.abs().amax().float() for x in (q, k, v)]) / FP8_MAX
        row = {"model": name, "batch": batch, "heads": heads, "tokens": tokens, "head_dim": head_dim,
               "rel_err_vs_fp32": {"sdpa_bf16": relative_l2(sdpa, exact)}, "ms": {}}
        row["ms"]["sdpa_bf16"] = _graph_median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        for label, (pv_fp8, static) in ATTENTION_FORMATS.items():
            scales = calibrated if static else None
            out = quantized_attention(q, k, v, scale, pv_fp8, scales)
            row["rel_err_vs_fp32"][f"fxquant_{label}"] = relative_l2(out, exact)
            if name == "pixart":  # the reference materialises the whole score matrix
                row.setdefault("rel_err_vs_reference", {})[f"fxquant_{label}"] = relative_l2(
                    out, quantized_attention_reference(q, k, v, scale, pv_fp8, scales))
            row["ms"][f"fxquant_{label}"] = _graph_median_ms(lambda: quantized_attention(q, k, v, scale, pv_fp8,
                                                                                         scales))
            row["ms"][f"fxquant_{label}_operands_only"] = _graph_median_ms(
                lambda: attention_operands(q, k, v, pv_fp8, scales))
            operands = kernel_operands(q, k, v, pv_fp8, scales)
            row["ms"][f"fxquant_{label}_kernel_only"] = _graph_median_ms(lambda: attend(q, operands, scale))
            try:  # as the compile backend does: tile autotuned for the shape, then traced into Inductor
                tune(batch, heads, tokens, tokens, head_dim, pv_fp8, static, q.dtype)
                compiled = torch.compile(lambda q, k, v, scales: quantized_attention(q, k, v, scale, pv_fp8, scales,
                                                                                     traced=True))
                row["rel_err_vs_fp32"][f"fxquant_{label}_compiled"] = relative_l2(compiled(q, k, v, scales), exact)
                row["ms"][f"fxquant_{label}_compiled"] = _graph_median_ms(lambda: compiled(q, k, v, scales))
            except Exception as err:  # recorded; the eager rows stand
                row.update(_error_row(err))
                traceback.print_exc()
            torch._dynamo.reset()
        row["tflops"] = attention_tflops(batch, heads, tokens, head_dim,
                                         {key: t for key, t in row["ms"].items() if "operands" not in key})
        row["speedup_vs_sdpa_bf16"] = {key: row["ms"]["sdpa_bf16"] / t for key, t in row["ms"].items()}
        row["autotuned_configs"] = {str(key): str(config) for key, config in _attention_kernel.cache.items()
                                    if tuple(key[:3]) == (tokens, tokens, head_dim)}
        rows.append(row)
        print("attention", name, {key: round(t, 3) for key, t in row["ms"].items()}, row["rel_err_vs_fp32"],
              flush=True)
    return rows


# the tile grid `attention_config_sweep` times (BLOCK_M, BLOCK_N, warps, stages): Triton's Hopper tutorial grid plus
# 256-query tiles; 8 warps only on tiles of >= 128 x 64
ATTENTION_SWEEP = [(bm, bn, w, s) for bm in (64, 128, 256) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)
                   if (w == 4 or bm * bn >= 128 * 64) and bm * bn <= 256 * 64]


def attention_config_sweep(shapes=tuple(ATTENTION_SHAPES), formats=("fp8_static",)) -> list[dict]:
    """Each tile config of ATTENTION_SWEEP launched directly (no autotuner) on prepared operands at the models'
    shapes, as CUDA-graph medians against SDPA bf16; configs that fail to compile or launch are recorded as errors.
    Shows whether the autotuner's candidate list holds the fastest tile for each shape."""
    rows = []
    for name in shapes:
        batch, heads, tokens, head_dim = ATTENTION_SHAPES[name]
        q, k, v = _attention_inputs(batch, heads, tokens, head_dim)
        scale = head_dim**-0.5
        sdpa_ms = _graph_median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        for label in formats:
            pv_fp8, static = ATTENTION_FORMATS[label]
            scales = torch.stack([x.abs().amax().float() for x in (q, k, v)]) / FP8_MAX if static else None
            operands = kernel_operands(q, k, v, pv_fp8, scales)
            reference = attend(q, operands, scale)  # the autotuner's tile (kept after the first launch)
            out = torch.empty_like(reference)
            args = kernel_args(operands, out, scale)
            times, errors, differences = {}, {}, {}
            for bm, bn, warps, stages in ATTENTION_SWEEP:
                key = f"{bm}x{bn}_w{warps}_s{stages}"
                grid = (triton.cdiv(tokens, bm) * batch * heads,)
                try:
                    launch = lambda: _attention_kernel.fn[grid](  # noqa: E731
                        *args, **operands["flags"], OUT_CODES=False, BLOCK_M=bm, BLOCK_N=bn,
                        num_warps=warps, num_stages=stages)
                    launch()
                    differences[key] = relative_l2(out, reference)  # tiles round P differently: ~1e-2 at most
                    if differences[key] > 5e-2:
                        raise AssertionError(f"output differs from the autotuned kernel's by {differences[key]}")
                    times[key] = _graph_median_ms(launch)
                except Exception as err:  # out of shared memory / registers: recorded
                    errors[key] = _error_row(err)["error"]
            best = min(times, key=times.get)
            row = {"model": name, "format": label, "batch": batch, "heads": heads, "tokens": tokens,
                   "head_dim": head_dim, "sdpa_bf16_ms": sdpa_ms, "ms": times, "errors": errors, "best": best,
                   "rel_l2_vs_autotuned": differences,
                   "best_speedup_vs_sdpa_bf16": sdpa_ms / times[best],
                   "autotuned": str(traced_config(_tuning_key(tokens, tokens, head_dim, pv_fp8, static, q.dtype))),
                   "autotuned_ms": _graph_median_ms(lambda: attend(q, operands, scale))}
            rows.append(row)
            print("attention configs", name, label, "sdpa", round(sdpa_ms, 3), "best", best, round(times[best], 3),
                  "autotuned", row["autotuned"], round(row["autotuned_ms"], 3), flush=True)
    return rows


def _pixart(layers: int = 28, pixels: int = 1024, batch: int = 2):
    from diffusers import PixArtTransformer2DModel

    latent = pixels // 8
    config = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=layers,
                  cross_attention_dim=1152, caption_channels=4096, sample_size=latent, patch_size=2,
                  norm_type="ada_norm_single", use_additional_conditions=True)
    inputs = dict(hidden_states=torch.randn(batch, 4, latent, latent),
                  encoder_hidden_states=torch.randn(batch, 120, 4096),
                  timestep=torch.tensor([999, 500][:batch]),
                  added_cond_kwargs={"resolution": torch.tensor([[float(pixels)] * 2] * batch),
                                     "aspect_ratio": torch.tensor([[1.0]] * batch)})
    return (lambda: PixArtTransformer2DModel(**config), inputs,
            {**config, "batch": batch, "tokens": (latent // 2) ** 2, "text_tokens": 120})


def _pixart_256(layers: int = 28):
    """PixArt-alpha at 256 px, batch 1: 256 image tokens (the issue's "batch-1 low-resolution" case for W4A8, where
    the weights' bytes weigh more against the work than at 4096 tokens)."""
    return _pixart(layers, pixels=256, batch=1)


def _sd3_medium():
    from diffusers import SD3Transformer2DModel

    config = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
    inputs = dict(hidden_states=torch.randn(2, 16, 128, 128), encoder_hidden_states=torch.randn(2, 333, 4096),
                  pooled_projections=torch.randn(2, 2048), timestep=torch.tensor([999.0, 500.0]))
    return lambda: SD3Transformer2DModel(**config), inputs, {**config, "batch": 2, "tokens": 4096, "text_tokens": 333}


def _flux_stack():
    from diffusers import FluxTransformer2DModel

    config = dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)
    inputs = dict(hidden_states=torch.randn(1, 4096, 64), encoder_hidden_states=torch.randn(1, 512, 4096),
                  pooled_projections=torch.randn(1, 768), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(4096, 3), txt_ids=torch.zeros(512, 3), guidance=torch.tensor([3.5]))
    return lambda: FluxTransformer2DModel(**config), inputs, {**config, "batch": 1, "tokens": 4096, "text_tokens": 512}


def _cogvideox_2b():
    from diffusers import CogVideoXTransformer3DModel

    config = dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, num_layers=30,
                  text_embed_dim=4096, time_embed_dim=512, sample_width=90, sample_height=60, sample_frames=49,
                  patch_size=2)
    inputs = dict(hidden_states=torch.randn(2, 13, 16, 60, 90), encoder_hidden_states=torch.randn(2, 226, 4096),
                  timestep=torch.tensor([999, 500]))
    return (lambda: CogVideoXTransformer3DModel(**config), inputs,
            {**config, "batch": 2, "tokens": 13 * 30 * 45, "text_tokens": 226})


def _sdxl_unet():
    from diffusers import UNet2DConditionModel

    config = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                  transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816, use_linear_projection=True)
    inputs = dict(sample=torch.randn(2, 4, 128, 128), timestep=torch.tensor([999, 500]),
                  encoder_hidden_states=torch.randn(2, 77, 2048),
                  added_cond_kwargs={"text_embeds": torch.randn(2, 1280), "time_ids": torch.randn(2, 6)})
    return lambda: UNet2DConditionModel(**config), inputs, {**config, "batch": 2, "latent": 128, "text_tokens": 77}


MODELS = {"pixart": _pixart, "pixart_256": _pixart_256, "sd3": _sd3_medium, "flux": _flux_stack,
          "cogvideox": _cogvideox_2b, "sdxl": _sdxl_unet}


def _to_cuda(value):
    if isinstance(value, dict):
        return {key: _to_cuda(item) for key, item in value.items()}
    if value.is_floating_point():
        return value.to("cuda", torch.bfloat16)
    return value.to("cuda")


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _measure(model, inputs: dict) -> dict:
    """Plain-call and CUDA-graph medians, activation peak over the resident weights, weight bytes."""
    with torch.no_grad():
        call = lambda: model(**inputs, return_dict=False)  # noqa: E731
        call()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = _median_ms(call)
        try:
            graph_ms, graph_error = _median_ms(_cuda_graph(call)), None
        except Exception as err:  # recorded, not hidden: some variants may not be capturable
            graph_ms, graph_error = None, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return {"ms": ms, "cuda_graph_ms": graph_ms, "cuda_graph_error": graph_error, "activation_peak_bytes": peak,
            "weight_bytes": weights, "peak_bytes": weights + peak}


def _error_row(err: Exception) -> dict:
    """{"error": the exception's type and first line, then its root cause's (a backend failure wraps the real one, whose
    message starts on a later line)}."""
    causes = [err]
    while (cause := getattr(causes[-1], "inner_exception", None) or causes[-1].__cause__) and len(causes) < 8:
        causes.append(cause)
    parts = [err] if len(causes) == 1 else [err, causes[-1]]
    return {"error": " <- ".join(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
                                 for e in parts)}


def _torchao(model, kind: str):
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                      Int8DynamicActivationInt8WeightConfig, PerRow, quantize_)

    # set_inductor_config=False: by default quantize_ turns on coordinate-descent tuning for the whole process, which
    # made every later compile in it slow (bf16 compile of PixArt 394 s instead of ~50 s, pixart-torchao.json)
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False) \
        if kind == "float8" else Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    quantize_(model, config)
    return model


def _profile_table(model, inputs: dict) -> str:
    """CUDA time per kernel over 3 calls (top 60, full kernel names)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            model(**inputs, return_dict=False)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=160)


def _calibration_calls(inputs: dict, count: int = 8) -> list[dict]:
    """`count` copies of the inputs whose timesteps step from the top of the model's scale (1 or 999) down to 0, so
    that every timestep group of a recipe gets calls; [inputs] for a model without a timestep input."""
    timestep = inputs.get("timestep")
    if timestep is None:
        return [inputs]
    top = 1.0 if timestep.max() <= 1 else 999.0
    return [{**inputs, "timestep": torch.full_like(timestep, value)}
            for value in torch.linspace(top, 0, count).tolist()]


def _nudged(inputs: dict) -> dict:
    """inputs with the first floating-point tensor (the latent) scaled by 1 + 2^-8, about one bf16 step."""
    name = next(key for key, value in inputs.items() if torch.is_tensor(value) and value.is_floating_point())
    return {**inputs, name: inputs[name] * (1 + 2**-8)}


def _variant_model(variant: str, model, inputs: dict, name: str):
    """(the model of a variant, ready to call, fxquant's eager outputs or None: on the inputs and on `_nudged`
    inputs, the quantized model's own sensitivity to one bf16 step, against which a compiled-vs-eager difference
    is judged). Variants: bf16_eager, bf16_compile,
    bf16_compile_reduce_overhead, bf16_compile_blocks (its repeated blocks compiled),
    fxquant:<recipe>[@<backend or Inductor option>=<0|1>,...] (the whole model compiled as one flat graph; the
    options bench.sweep_tiles=1 / bench.fill_tiles=0 change the GEMM tiles for the rest of the process:
    `_use_swept_tiles`, `_without_fill_tiles`),
    fxquant-blocks:<recipe>[@...] (its repeated blocks compiled, QuantizedModel.compile_blocks),
    fxquant-nested:<recipe>[@...] (the whole model compiled with its repeated blocks as nested regions,
    QuantizedModel.nest_blocks: what torch.compile(qmodel, backend="fxquant") does by default),
    fxquant-graphs:<recipe> (the same with mode="reduce-overhead": Inductor's CUDA-graph trees), torchao:float8|int8
    (the whole model compiled), torchao-blocks:float8|int8 (its repeated blocks compiled)."""
    if variant == "bf16_compile":
        return torch.compile(model), None
    if variant == "bf16_compile_reduce_overhead":  # Inductor's CUDA-graph trees: plain calls replay graphs
        return torch.compile(model, mode="reduce-overhead"), None
    if variant == "bf16_compile_blocks":  # regional compilation, as fxquant-blocks
        compile_repeated_blocks(model)
        return model, None
    if variant.startswith("torchao:"):
        return torch.compile(_torchao(model, variant.split(":", 1)[1])), None
    if variant.startswith("torchao-blocks:"):
        model = _torchao(model, variant.split(":", 1)[1])
        compile_repeated_blocks(model)
        return model, None
    if not variant.startswith(("fxquant:", "fxquant-blocks:", "fxquant-nested:", "fxquant-graphs:")):
        return model, None
    recipe_name, _, option_text = variant.split(":", 1)[1].partition("@")
    options = {key: value == "1" for key, value in (item.split("=") for item in option_text.split(",") if item)}
    if options.pop("bench.sweep_tiles", False):
        _use_swept_tiles(SWEPT_TILES["path"])
    if not options.pop("bench.fill_tiles", True):
        _without_fill_tiles()
    recipe = fxquant.get_config(recipe_name)
    qmodel = fxquant.quantize(model, recipe, _calibration_calls(inputs))
    with torch.no_grad():
        eager_outputs = tuple(_first_output(qmodel(**call, return_dict=False)) for call in (inputs, _nudged(inputs)))
    if variant.startswith("fxquant-blocks:"):
        qmodel.compile_blocks(options=options or None)
        return qmodel, eager_outputs
    if variant.startswith("fxquant-graphs:"):  # torch.compile takes a mode or options, not both
        if options:
            raise ValueError(f"{variant}: fxquant-graphs takes no @options (torch.compile's mode excludes them)")
        return torch.compile(qmodel, backend="fxquant", mode="reduce-overhead"), eager_outputs
    qmodel.nest_blocks(variant.startswith("fxquant-nested:"))  # fxquant: the flat whole-model graph
    return torch.compile(qmodel, backend="fxquant", options=options or None), eager_outputs


SWEPT_TILES = {"path": None}  # --swept-tiles


def _use_swept_tiles(path: str | None) -> None:
    """From now on in this process, fp8 GEMMs of a shape that the model_gemms sweep in `path` (this script's JSON)
    timed run on that sweep's fastest tile instead of `fixed_config`'s (whatever their epilogue: the sweep timed the
    model's plain or activation epilogue only): what a perfect tile rule would give at those shapes end to end."""
    if path is None:
        raise ValueError("@bench.sweep_tiles=1 needs --swept-tiles FILE")
    with open(path) as f:
        rows = json.load(f)["model_gemms"]
    swept = {}
    for row in rows:
        gated = bool(row["epilogue"]) and row["epilogue"].startswith("geglu")
        swept[(row["M"], row["N"] // 2 if gated else row["N"], row["K"], gated)] = _tile_of_label(row["best"])
    print("swept tiles", swept, flush=True)
    from fxquant.backends.triton import gemm
    rule = gemm._fixed_config

    @functools.cache
    def swept_or_rule(m, n, k, integer, residual, packed, gated, limits, interpret):
        tile = None if integer or packed else swept.get((m, n, k, gated))
        return tile or rule(m, n, k, integer, residual, packed, gated, limits, interpret)

    gemm._fixed_config = swept_or_rule


def _without_fill_tiles() -> None:
    """From now on in this process, `fixed_config` gives no GEMM fill tiles (its rule before session 35): the A/B of
    variants with @bench.fill_tiles=0 (run them last)."""
    from fxquant.backends.triton import gemm
    gemm.fill_tiles = lambda m, n, sm_count: None
    gemm._fixed_config.cache_clear()


def _compile_phase_seconds() -> dict[str, float]:
    """torch.compile's time so far per timed phase (Dynamo tracing, AOT, Inductor lowering / codegen, waiting for
    kernel compiles, ...), summed over every compile of this process."""
    names, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    return dict(zip(names, map(float, values)))


def _phases_since(before: dict[str, float], at_least: float = 0.5) -> dict[str, float]:
    """The phases that took at least `at_least` seconds since `before` (a _compile_phase_seconds snapshot), longest
    first: where a variant's first call spent its compile time, without a profiler's overhead."""
    spent = {name: seconds - before.get(name, 0.0) for name, seconds in _compile_phase_seconds().items()}
    return {name: round(seconds, 2) for name, seconds in sorted(spent.items(), key=lambda item: -item[1])
            if seconds >= at_least}


def model_benchmark(name: str, variants: list[str], results: dict, save, layers: int | None = None,
                    profile_to: str | None = None, compile_profile_to: str | None = None) -> None:
    """One model: every variant measured on the same inputs into `results`; `save()` is called after each.
    profile_to: a text file that gets each variant's kernel profile; compile_profile_to: one that gets a cProfile
    of each variant's first call (where torch.compile spends its time)."""
    build_fn, cpu_inputs, config = MODELS[name](layers) if layers else MODELS[name]()
    inputs = _to_cuda(cpu_inputs)

    def build():
        torch.manual_seed(0)
        return build_fn().to("cuda", torch.bfloat16).eval()

    results.update(config=config, variants={})
    reference = None
    for variant in variants:
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        row = {}
        results["variants"][variant] = row
        try:
            start, allocated = time.time(), torch.cuda.memory_allocated()
            model, eager_outputs = _variant_model(variant, build(), inputs, name)
            row["build_and_quantize_seconds"] = time.time() - start  # build (+ quantize + one eager call)
            # what the model keeps on the device (weight_bytes miscounts tensor subclasses such as torchao's)
            row["resident_bytes"] = torch.cuda.memory_allocated() - allocated
            profiler = cProfile.Profile() if compile_profile_to else contextlib.nullcontext()
            phases_before = _compile_phase_seconds()
            with torch.no_grad(), profiler:
                out = _first_output(model(**inputs, return_dict=False)).clone()  # CUDA-graph trees reuse outputs
            torch.cuda.synchronize()
            row["compile_phases_seconds"] = _phases_since(phases_before)
            if compile_profile_to:
                with open(compile_profile_to, "a") as f:
                    f.write(f"\n## {name} {variant}: first call (compile), by cumulative time\n")
                    pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats(80)
                    f.write(f"\n## {name} {variant}: first call (compile), by own time\n")
                    pstats.Stats(profiler, stream=f).sort_stats("tottime").print_stats(40)
                    f.write(f"\n## {name} {variant}: torch.compile phases\n{torch._dynamo.utils.compile_times()}\n")
            row["setup_seconds"] = time.time() - start
            row["first_call_seconds"] = row["setup_seconds"] - row["build_and_quantize_seconds"]  # the compile
            row.update(_measure(model, inputs))
            if reference is None:  # the first variant that runs (put bf16_eager first to compare against it)
                reference, results["reference_variant"] = out.float(), variant
            row["rel_l2_vs_reference_variant"] = relative_l2(out, reference)
            if eager_outputs is not None:
                row["rel_l2_compiled_vs_eager_quantized"] = relative_l2(out, eager_outputs[0])
                row["rel_l2_eager_quantized_vs_nudged_input"] = relative_l2(eager_outputs[1], eager_outputs[0])
            if profile_to:
                with open(profile_to, "a") as f:
                    f.write(f"\n## {name} {variant}\n{_profile_table(model, inputs)}\n")
        except Exception as err:  # a variant that fails is a result (e.g. torchao int8 on small linears)
            row.update(_error_row(err))
            traceback.print_exc()
        print(name, variant, {k: v for k, v in row.items() if k != "cuda_graph_error"}, flush=True)
        model = None
        save()
    base = results["variants"].get("bf16_eager", {})
    base_compile = results["variants"].get("bf16_compile", {})
    for row in results["variants"].values():
        for label, ref in (("bf16_eager", base), ("bf16_compile", base_compile)):
            for key in ("ms", "cuda_graph_ms"):
                if row.get(key) and ref.get(key):
                    row[f"speedup_{key}_vs_{label}"] = ref[key] / row[key]
        for key in ("weight_bytes", "peak_bytes"):
            if row.get(key) and base.get(key):
                row[f"{key}_vs_bf16"] = row[key] / base[key]
    return results


KERNEL_SECTIONS = {"kernels": check_kernels, "prologue": prologue_benchmark,
                   "concat_prologue": concat_prologue_benchmark, "residual_parts": residual_parts_benchmark,
                   "pipes": pipe_probe_benchmark,
                   "v_operand": v_operand_benchmark,
                   "attention_operands": attention_operands_benchmark, "operand_parts": operand_parts_benchmark,
                   "conv": conv_benchmark, "conv_tiles": conv_tile_sweep,
                   "quantize_configs": quantize_config_sweep,
                   "epilogue": epilogue_sweep, "geglu": geglu_epilogue_benchmark, "gemm": gemm_benchmark,
                   "packed": packed_gemm_sweep,
                   "packed_tiles": packed_tile_sweep, "few_token_tiles": few_token_tile_sweep,
                   "model_gemms": model_gemm_sweep,
                   "attention": attention_benchmark, "attention_configs": attention_config_sweep}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["kernels", "prologue", "gemm", "attention", "models"],
                        choices=[*KERNEL_SECTIONS, "models"])
    parser.add_argument("--models", nargs="+", default=["pixart"], choices=sorted(MODELS))
    parser.add_argument("--variants", nargs="+",
                        default=["bf16_eager", "bf16_compile", "fxquant:w8a8", "fxquant:w8a8-fp8", "fxquant:w4a8"])
    parser.add_argument("--attention-shapes", nargs="+", default=list(ATTENTION_SHAPES), choices=list(ATTENTION_SHAPES),
                        help="the models whose attention shapes the attention section times")
    parser.add_argument("--model-gemms", nargs="+", choices=[entry[0] for entry in MODEL_GEMMS],
                        help="the GEMMs the model_gemms section sweeps (default: all)")
    parser.add_argument("--model-gemm-tiles", nargs="+", help="the tiles the model_gemms section times, as labelled in "
                        "its JSON (e.g. 128x128x128_w8_s3_f64x64; default: MODEL_GEMM_TILES)")
    parser.add_argument("--quantize-cases", nargs="+", choices=list(QUANTIZE_SWEEP_CASES),
                        help="the cases the quantize_configs section sweeps (default: all)")
    parser.add_argument("--layers", type=int, help="blocks of the model (PixArt only; default: the full model)")
    parser.add_argument("--profile", help="write each variant's kernel profile to this text file")
    parser.add_argument("--compile-profile", help="write a cProfile of each variant's first (compiling) call here")
    parser.add_argument("--swept-tiles", help="a model_gemms JSON of this script whose fastest tiles the variants "
                        "with @bench.sweep_tiles=1 run at its shapes (an upper bound for fixed_config's rule)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    SWEPT_TILES["path"] = args.swept_tiles
    if args.layers and not set(args.models) <= {"pixart", "pixart_256"}:
        parser.error("--layers applies to the PixArt models alone")
    result = run_environment()

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")

    per_shape = {"attention": args.attention_shapes, "attention_configs": args.attention_shapes,
                 "conv_tiles": CONV_SHAPES}
    for section, run in KERNEL_SECTIONS.items():
        if section in args.sections and section in per_shape:  # saved shape by shape
            result[section] = []
            for shape in per_shape[section]:
                result[section] += run((shape,))
                save()
        elif section in args.sections:
            selected = {"model_gemms": (args.model_gemms, args.model_gemm_tiles),
                        "quantize_configs": (args.quantize_cases,)}
            result[section] = run(*selected.get(section, ()))
            save()
    if "models" in args.sections:
        result["models"] = {}
        for name in args.models:
            result["models"][name] = {}
            model_benchmark(name, args.variants, result["models"][name], save, args.layers, args.profile,
                            args.compile_profile)
            save()


if __name__ == "__main__":
    main()

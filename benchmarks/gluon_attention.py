"""The Gluon fp8-static attention kernel (`backends/triton/attention_hopper.py`, MMAs in flight across the softmax)
against the Triton one (`attention.py`) and bf16 SDPA, on a Hopper GPU: correctness first, then kernel times.

    python benchmarks/gluon_attention.py --out gluon-attention.json

Correctness: on small shapes that exercise one key tile, partial tiles, queries past a tile, a padded head dim (72)
and NaN codes in the operands' padding channels and keys, the Gluon output against the Triton kernel's (same format;
they differ only in the order the online softmax's tiles round) and against fp32 SDPA. Timing: the models' attention
shapes (gpu_bench's ATTENTION_SHAPES), every Gluon config (tile), CUDA-graph medians of the kernels
alone on prepared operands, bf16 output and fp8-codes output; and the host's time per call of the launchers and of
the ops a compiled model calls.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch
import torch.nn.functional as F

import fxquant  # noqa: F401  (registers the ops)
from fxquant.backends.triton import attention_hopper
from fxquant.backends.triton.attention import attention_fp8_codes
from fxquant.metrics import relative_l2
from fxquant.ops import attention_operand_reference
from gpu_bench import (ATTENTION_SHAPES, FP8_MAX, _attention_inputs, _graph_median_ms, attention_tflops,
                       run_environment)

CHECK_SHAPES = {"one_tile": (1, 2, 200, 77, 64), "two_tiles": (1, 3, 300, 130, 64),
                "one_tile_d128": (1, 2, 200, 77, 128), "two_tiles_d128": (1, 3, 300, 130, 128),
                "partial_tiles": (2, 3, 257, 257, 64), "cross_attention": (2, 4, 1024, 120, 64),
                "d32": (1, 2, 130, 300, 32), "d72": (2, 2, 300, 400, 72)}


def operands(q, k, v):
    """bf16 q / k / v [B, H, N, D] -> (static scales fp32 [3], fp8 codes laid out as attention_operand_fp8's)."""
    operand_scales = torch.stack([x.abs().amax().float() for x in (q, k, v)]) / FP8_MAX
    codes = [attention_operand_reference(x, s, keys_major) for x, s, keys_major in
             zip((q, k, v), operand_scales.unbind(), (False, False, True))]
    return operand_scales, codes


def gluon(codes, head_dim, scale, operand_scales, out_scale=None, config=attention_hopper.DEFAULT_CONFIG):
    """The Gluon kernel on laid-out codes -> bf16 output, or fp8 codes of out_scale."""
    return attention_hopper.attention_fp8_codes(*codes, head_dim, scale, operand_scales, torch.bfloat16, out_scale,
                                                config=config)


def check(name: str, batch: int, heads: int, n_q: int, n_k: int, head_dim: int) -> dict:
    """Errors of every Gluon config on one small shape, with NaN codes in the operands' padding channels and keys."""
    q = torch.randn(batch, heads, n_q, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, heads, n_k, head_dim, device="cuda", dtype=torch.bfloat16) * s for s in (2, 1))
    scale = head_dim**-0.5
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    operand_scales, codes = operands(q, k, v)
    for operand in codes[:2]:  # e4m3 NaN in the padding channels and keys, as buffers a GEMM epilogue wrote may hold
        operand[..., head_dim:].view(torch.uint8).fill_(0x7F)
    codes[2][..., n_k:].view(torch.uint8).fill_(0x7F)
    codes[2][:, :, head_dim:].view(torch.uint8).fill_(0x7F)
    triton_out = attention_fp8_codes(*codes, head_dim, scale, operand_scales, torch.bfloat16)
    row = {"shape": [batch, heads, n_q, n_k, head_dim], "triton_vs_fp32": relative_l2(triton_out, exact),
           "gluon": {}}
    for config in attention_hopper.CONFIGS:
        try:
            out = gluon(codes, head_dim, scale, operand_scales, config=config)
            row["gluon"][str(config)] = {"vs_fp32": relative_l2(out, exact), "vs_triton": relative_l2(out, triton_out),
                                         "finite": bool(out.float().isfinite().all())}
        except Exception as err:
            row["gluon"][str(config)] = {"error": f"{type(err).__name__}: {err}"[:1500]}
            traceback.print_exc()
    print(name, json.dumps(row), flush=True)
    return row


def host_microseconds(run, calls: int = 20) -> float:
    """The host's time per call of run (its kernels queued, not waited for), median of 5 batches of `calls`."""
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            run()
        times.append((time.perf_counter() - start) / calls * 1e6)
    torch.cuda.synchronize()
    return sorted(times)[2]


def compare(name: str) -> dict:
    """One model shape: errors and kernel times of bf16 SDPA, the Triton kernel and every Gluon config."""
    batch, heads, tokens, head_dim = ATTENTION_SHAPES[name]
    q, k, v = _attention_inputs(batch, heads, tokens, head_dim)
    scale = head_dim**-0.5
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    out_scale = (exact.abs().amax() / FP8_MAX).reshape(1)
    operand_scales, codes = operands(q, k, v)
    row = {"model": name, "shape": [batch, heads, tokens, head_dim], "ms": {}, "rel_err_vs_fp32": {}}
    row["ms"]["sdpa_bf16"] = _graph_median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    runs = {"triton": lambda: attention_fp8_codes(*codes, head_dim, scale, operand_scales, torch.bfloat16),
            "triton_codes": lambda: attention_fp8_codes(*codes, head_dim, scale, operand_scales, torch.bfloat16,
                                                        out_scale)}
    for config in attention_hopper.CONFIGS:
        runs[f"gluon{config}"] = lambda config=config: gluon(codes, head_dim, scale, operand_scales, config=config)
        runs[f"gluon{config}_codes"] = lambda config=config: gluon(codes, head_dim, scale, operand_scales, out_scale,
                                                                   config)
    for key, run in runs.items():
        try:
            out = run()
            out = out.float() * out_scale if key.endswith("_codes") else out
            row["rel_err_vs_fp32"][key] = relative_l2(out, exact)
            row["ms"][key] = _graph_median_ms(run)
        except Exception as err:
            row.setdefault("errors", {})[key] = f"{type(err).__name__}: {err}"[:1500]
            traceback.print_exc()
    # host time per call, the kernels queued: the launchers, the Gluon launcher's descriptors, and the ops a compiled
    # model calls (the Gluon op's plain calls made the Flux stack 30.5 ms against 23.9 in session 33, CUDA-graph
    # replays 18.9 against 19.1)
    block_m, block_n = attention_hopper.DEFAULT_CONFIG[:2]
    out = runs["triton"]()
    ops = {"gluon_descriptors": lambda: attention_hopper.kernel_arguments(*codes, head_dim, operand_scales, out,
                                                                          scale, None, 0, block_m, block_n),
           "triton_op": lambda: torch.ops.fxquant.attention_fp8_codes(*codes, head_dim, scale, operand_scales,
                                                                       torch.bfloat16),
           "gluon_op": lambda: torch.ops.fxquant.gluon_attention_fp8_codes(*codes, head_dim, scale, operand_scales,
                                                                           torch.bfloat16)}
    default = f"gluon{attention_hopper.DEFAULT_CONFIG}"
    row["host_us"] = {key: host_microseconds(run) for key, run in
                      {"triton": runs["triton"], default: runs[default], **ops}.items()}
    row["tflops"] = attention_tflops(batch, heads, tokens, head_dim, row["ms"])
    row["speedup_vs_triton"] = {key: row["ms"]["triton"] / t for key, t in row["ms"].items()}
    print(name, {key: round(t, 3) for key, t in row["ms"].items()}, row["host_us"], flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", nargs="*", default=list(CHECK_SHAPES), choices=list(CHECK_SHAPES))
    parser.add_argument("--shapes", nargs="*", default=list(ATTENTION_SHAPES), choices=list(ATTENTION_SHAPES))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = {**run_environment(), "checks": {}, "shapes": []}
    for name in args.checks:
        result["checks"][name] = check(name, *CHECK_SHAPES[name])
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    for name in args.shapes:
        result["shapes"].append(compare(name))
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

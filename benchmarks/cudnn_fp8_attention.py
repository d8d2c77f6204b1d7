"""cuDNN's fp8 flash attention (per-tensor scales, through the cudnn-frontend Python graph API) against fxquant's
Triton `fp8-static` attention kernel and bf16 SDPA, at the benchmarked models' attention shapes (GPU, Hopper).

    python benchmarks/cudnn_fp8_attention.py --out cudnn-fp8-attention.json

Both quantized kernels run the same format: Q, K, V float8 e4m3 with one static scale each (each operand's absmax /
448, as a calibration that saw this call), P cast to e4m3 after multiplying by 448, the output written as e4m3 codes
of one static scale (the output projection's input, as `static_attention_outputs` does). Times are CUDA-graph
medians (triton.testing.do_bench_cudagraph) of the kernels alone on prepared operands; errors are relative L2 of the
dequantized outputs against fp32 SDPA. Head dims cuDNN does not take (PixArt's 72: fp8 needs a multiple of 16) are
zero-padded for it. Needs the `nvidia-cudnn-frontend` wheel; the cuDNN library is the one torch loads.
"""

from __future__ import annotations

import argparse
import json
import traceback

import torch
import torch.nn.functional as F

import fxquant  # noqa: F401  (registers the ops)
from fxquant.backends.triton.attention import attend, kernel_operands
from fxquant.metrics import relative_l2
from gpu_bench import (ATTENTION_SHAPES, FP8_MAX, _attention_inputs, _graph_median_ms, _median_ms, attention_tflops,
                       run_environment)


def _fp8_codes(x: torch.Tensor, scale: torch.Tensor, head_dim: int) -> torch.Tensor:
    """x [B, H, N, D] (a view of [B, N, H, D]) -> e4m3 codes of x / scale zero-padded to head_dim channels, stored
    [B, N, H, head_dim] and returned as the [B, H, N, head_dim] view."""
    codes = (x.transpose(1, 2).float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    codes = F.pad(codes.view(torch.uint8), (0, head_dim - x.shape[-1])).view(torch.float8_e4m3fn)
    return codes.transpose(1, 2)


def cudnn_fp8_attention(q_codes, k_codes, v_codes, operand_scales: torch.Tensor, out_scale: torch.Tensor,
                        scale: float):
    """A cuDNN fp8 SDPA graph over these codes ([B, H, N, D] views) -> (run, out): run() writes out, the e4m3 codes
    of the attention output divided by out_scale, stored [B, N, H, D]."""
    import cudnn

    handle = cudnn.create_handle()
    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
    operands = [graph.tensor(name=name, dim=list(x.shape), stride=list(x.stride()), data_type=e4m3)
                for name, x in (("q", q_codes), ("k", k_codes), ("v", v_codes))]
    scalar = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
    names = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
    scalars = {name: graph.tensor(name=name, **scalar) for name in names}
    out_t, _, amax_s_t, amax_o_t = graph.sdpa_fp8(*operands, *scalars.values(), generate_stats=False,
                                                  attn_scale=scale, use_causal_mask=False, name="sdpa_fp8")
    out = torch.empty(q_codes.shape[0], q_codes.shape[2], q_codes.shape[1], v_codes.shape[3],
                      dtype=torch.float8_e4m3fn, device="cuda").transpose(1, 2)
    out_t.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(e4m3)
    amax_s, amax_o = (torch.zeros(1, 1, 1, 1, device="cuda") for _ in range(2))
    for tensor in (amax_s_t, amax_o_t):
        tensor.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    workspace = torch.empty(max(graph.get_workspace_size(), 1), device="cuda", dtype=torch.uint8)
    values = torch.cat([operand_scales.float(), torch.tensor([1 / FP8_MAX, FP8_MAX], device="cuda"),
                        1 / out_scale.float().reshape(1)])
    pack = {**dict(zip(operands, (q_codes, k_codes, v_codes))),
            **{tensor: value.reshape(1, 1, 1, 1).clone() for tensor, value in zip(scalars.values(), values)},
            out_t: out, amax_s_t: amax_s, amax_o_t: amax_o}

    def run():
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        graph.execute(pack, workspace, handle=handle)
        return out

    return run, out


def compare(name: str) -> dict:
    """One shape: errors and kernel times of bf16 SDPA, fxquant's fp8-static kernel (bf16 out and fp8 codes out)
    and cuDNN's fp8 SDPA (fp8 codes out)."""
    batch, heads, tokens, head_dim = ATTENTION_SHAPES[name]
    q, k, v = _attention_inputs(batch, heads, tokens, head_dim)
    scale = head_dim**-0.5
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    operand_scales = torch.stack([x.abs().amax().float() for x in (q, k, v)]) / FP8_MAX
    out_scale = (exact.abs().amax() / FP8_MAX).reshape(1)
    row = {"model": name, "batch": batch, "heads": heads, "tokens": tokens, "head_dim": head_dim, "ms": {},
           "rel_err_vs_fp32": {}}
    row["ms"]["sdpa_bf16"] = _graph_median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    row["rel_err_vs_fp32"]["sdpa_bf16"] = relative_l2(F.scaled_dot_product_attention(q, k, v), exact)
    operands = kernel_operands(q, k, v, True, operand_scales)
    row["rel_err_vs_fp32"]["fxquant_fp8_static"] = relative_l2(attend(q, operands, scale), exact)
    row["ms"]["fxquant_fp8_static"] = _graph_median_ms(lambda: attend(q, operands, scale))
    codes = attend(q, operands, scale, out_scale=out_scale)
    row["rel_err_vs_fp32"]["fxquant_fp8_static_codes"] = relative_l2(codes.float() * out_scale, exact)
    row["ms"]["fxquant_fp8_static_codes"] = _graph_median_ms(lambda: attend(q, operands, scale, out_scale=out_scale))
    try:
        padded = -(-head_dim // 16) * 16
        q_c, k_c, v_c = (_fp8_codes(x, s, padded) for x, s in zip((q, k, v), operand_scales.unbind()))
        run, out = cudnn_fp8_attention(q_c, k_c, v_c, operand_scales, out_scale, scale)
        run()
        torch.cuda.synchronize()
        row["rel_err_vs_fp32"]["cudnn_fp8"] = relative_l2(out[..., :head_dim].float() * out_scale, exact)
        try:
            row["ms"]["cudnn_fp8"] = _graph_median_ms(run)
        except Exception as err:  # not capturable: synchronised calls instead
            row["cudnn_cuda_graph_error"] = f"{type(err).__name__}: {err}"[:500]
            row["ms"]["cudnn_fp8"] = _median_ms(run)
        row["cudnn_head_dim"] = padded
        # V keys-major (each channel's keys contiguous, as fxquant's GEMM epilogues write it for the Triton kernel)
        v_keys_major = F.pad(v_c.transpose(-1, -2).contiguous().view(torch.uint8), (0, -tokens % 16))
        v_keys_major = v_keys_major.view(torch.float8_e4m3fn).transpose(-1, -2)[:, :, :tokens]
        run_km, out_km = cudnn_fp8_attention(q_c, k_c, v_keys_major, operand_scales, out_scale, scale)
        run_km()
        torch.cuda.synchronize()
        row["rel_err_vs_fp32"]["cudnn_fp8_v_keys_major"] = relative_l2(out_km[..., :head_dim].float() * out_scale,
                                                                       exact)
        row["ms"]["cudnn_fp8_v_keys_major"] = _graph_median_ms(run_km)
    except Exception as err:  # recorded: the fxquant rows stand
        row["cudnn_error"] = f"{type(err).__name__}: {err}"[:2000]
        traceback.print_exc()
    row["tflops"] = attention_tflops(batch, heads, tokens, head_dim, row["ms"])
    row["speedup_vs_sdpa_bf16"] = {key: row["ms"]["sdpa_bf16"] / t for key, t in row["ms"].items()}
    print(name, {key: round(t, 3) for key, t in row["ms"].items()}, row["rel_err_vs_fp32"], flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(ATTENTION_SHAPES), choices=list(ATTENTION_SHAPES))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = {**run_environment(), "cudnn": torch.backends.cudnn.version(), "shapes": []}
    try:
        import cudnn
        result["cudnn_frontend"] = cudnn.__version__
        result["cudnn_backend_seen_by_frontend"] = cudnn.backend_version()
    except Exception as err:
        result["cudnn_frontend_error"] = f"{type(err).__name__}: {err}"
    for name in args.shapes:
        result["shapes"].append(compare(name))
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()

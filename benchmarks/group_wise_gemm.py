"""Group-wise against per-channel W4 GEMMs on the GPU: correctness at full shapes, then time per call.

    python benchmarks/group_wise_gemm.py --out group-wise-gemm.json

At DiT shapes (PixArt-alpha's 1152 <-> 4608, M from a batch's adaLN rows to 8192 tokens), int8 and fp8
activations: the group-wise W4 GEMM (`quantized_gemm` with [N, K / group] scales), unpacked in its K loop and
unpacked first, against the fxquant ops' torch references on the same codes (relative L2 of fp32 outputs; session 30's
run compared with the CUDA op, which is the unpack-first kernel itself), and the median
time (CUDA-graph replays, triton.testing.do_bench_cudagraph, bf16 out; sessions 30-31 used do_bench, whose times
include launch gaps) of both, of per-channel W4 (the K loop below UNPACK_MIN_TOKENS(_FP8),
unpack-first above) and of 8-bit weights (W8A8). JSON with device, versions, date; group_vs_*: the faster group-wise
form against the others.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch
import triton

import fxquant  # noqa: F401  (registers the ops)
from fxquant.backends.triton.gemm import quantized_gemm
from fxquant.metrics import relative_l2
from fxquant.ops import fp8_linear_reference, int8_linear_reference
from fxquant.quantizer import (pack_bits, pack_sign_magnitude, quantize_weight_groups, quantize_weight_per_channel,
                               weight_sums)

fxq = torch.ops.fxquant
SHAPES = [(16, 1152, 4608), (256, 1152, 4608), (4096, 1152, 1152), (8192, 1152, 4608), (8192, 4608, 1152)]


def _operands(m: int, k: int, n: int, fp8: bool, group: int, device: str) -> dict:
    """Activation codes and three weight forms of one random problem."""
    x, w = torch.randn(m, k, device=device), torch.randn(n, k, device=device)
    if fp8:
        (x_q, x_scale), x_zero = fxq.quantize_per_token_fp8(x), None
    else:
        x_q, x_scale, x_zero = fxq.quantize_per_token(x)
    pack = pack_sign_magnitude if fp8 else (lambda codes: pack_bits(codes, 4))
    grouped_q, grouped_scale = quantize_weight_groups(w, 4, group)
    channel_q, channel_scale = quantize_weight_per_channel(w, 4)
    eight_q, eight_scale = quantize_weight_per_channel(w, 8)
    sums = (lambda codes, groups=0: None) if fp8 else weight_sums
    return {"x": (x_q, x_scale, x_zero),
            "grouped": (grouped_q, pack(grouped_q), grouped_scale, sums(grouped_q, k // group)),
            "per_channel": (pack(channel_q), channel_scale, sums(channel_q)),
            "w8": (eight_q.float().to(torch.float8_e4m3fn) if fp8 else eight_q, eight_scale, sums(eight_q))}


def measure(m: int, k: int, n: int, fp8: bool, group: int, device: str = "cuda", timed: bool = True) -> dict:
    """One problem's row: the group-wise kernel's error against the reference and (timed) the three GEMMs' times."""
    ops = _operands(m, k, n, fp8, group, device)
    x_q, x_scale, x_zero = ops["x"]
    codes, packed, scale, w_sum = ops["grouped"]
    if fp8:  # (the ops' torch bodies: on CUDA the ops themselves dispatch to the Triton GEMM)
        reference = fp8_linear_reference(x_q, x_scale, codes.float().to(torch.float8_e4m3fn), scale, None,
                                         torch.float32)
    else:
        reference = int8_linear_reference(x_q, x_scale, x_zero, codes, scale, w_sum, None, torch.float32)

    def grouped(unpack_first: bool, dtype: torch.dtype = torch.bfloat16):
        return lambda: quantized_gemm(x_q, x_scale, x_zero, packed, scale, w_sum, None, dtype, 4,
                                      unpack_first=unpack_first)

    runs = {"w4_group_k_loop": grouped(False), "w4_group_unpacked_first": grouped(True),
            "w4_per_channel": lambda: quantized_gemm(x_q, x_scale, x_zero, *ops["per_channel"][:2],
                                                     ops["per_channel"][2], None, torch.bfloat16, 4),
            "w8": lambda: quantized_gemm(x_q, x_scale, x_zero, *ops["w8"][:2], ops["w8"][2], None, torch.bfloat16)}
    row = {"m": m, "k": k, "n": n, "activations": "fp8" if fp8 else "int8", "group": group,
           "rel_l2_vs_reference": {form: relative_l2(grouped(first, torch.float32)().float(), reference)
                                   for form, first in (("k_loop", False), ("unpacked_first", True))}}
    if timed:
        times = {}
        for name, run in runs.items():  # CUDA-graph replays: launch gaps (unpack-first is two launches) left out
            run()
            times[name] = triton.testing.do_bench_cudagraph(run, rep=200, return_mode="median") * 1000
        fastest = min(times["w4_group_k_loop"], times["w4_group_unpacked_first"])
        row.update(us=times, group_vs_per_channel=times["w4_per_channel"] / fastest, group_vs_w8=times["w8"] / fastest)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--check-only", action="store_true",
                        help="small shapes on the CPU, no timing (with TRITON_INTERPRET=1: a smoke run)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    shapes, device = ([(5, 256, 32), (300, 256, 32)], "cpu") if args.check_only else (SHAPES, "cuda")
    rows = []
    for fp8 in (True, False):
        for m, k, n in shapes:
            rows.append(measure(m, k, n, fp8, args.group, device, timed=not args.check_only))
            print(json.dumps(rows[-1]), flush=True)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
              "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()

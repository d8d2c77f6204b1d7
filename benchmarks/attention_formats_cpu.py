"""Attention formats on the reference models' own operands (CPU): error of each format against fp32 attention.

Records the Q / K / V of every quantizable attention call while the full-precision pipeline generates (calibration
prompts, then held-out evaluation prompts, all timesteps), calibrates static scales per call site (the n-th attention
call of a denoiser forward) on the first set and measures, on the second, the relative L2 error against fp32 SDPA of
fxquant's formats (`int8`, `int8-fp8`, `fp8-static`: the fxquant::quantized_attention reference op) and of one
candidate not built into fxquant, emulated here: `int8-static` = Q and K int8 with static per-tensor scales, K first
centred on its calibrated per-channel midrange ((min + max) / 2, which shifts each score row by a constant and so
leaves the softmax unchanged), V fp8 static, P V in fp8 as the op does.

    python benchmarks/attention_formats_cpu.py --out benchmarks/results/attention-formats-cpu.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
import torch.nn.functional as F

import fxquant.ops  # noqa: F401  (registers torch.ops.fxquant)
from fxquant.attention import SdpaTap
from fxquant.metrics import relative_l2
from fxquant.quality import _initial_noise, calibration_prompts, eval_prompts, generate
from fxquant.quantizer import FP8_MAX, fp8_scale
from fxquant.reference.pipeline import REFERENCE_MODELS, load_reference_pipeline

fxq = torch.ops.fxquant
INT8_MAX = 127.0


class _RecordAttention(SdpaTap):
    """Keeps (call site, q, k, v, scale) of every quantizable SDPA call; `forward_start()` restarts the site count."""

    def __init__(self):
        super().__init__()
        self.calls, self.site = [], 0

    def forward_start(self, *_):
        self.site = 0

    def record(self, q, k, v, scale: float) -> None:
        self.calls.append((self.site, q.detach().clone(), k.detach().clone(), v.detach().clone(), scale))
        self.site += 1


def _record(pipe, name: str, prompts: list[str], seed: int) -> list[tuple]:
    steps, guidance = REFERENCE_MODELS[name]
    recorder = _RecordAttention()
    handle = pipe.transformer.register_forward_pre_hook(recorder.forward_start)  # the DiT references
    with recorder:
        generate(pipe, prompts, _initial_noise(pipe, len(prompts), seed), steps, guidance, batch=len(prompts))
    handle.remove()
    return recorder.calls


def _calibrate(calls: list[tuple]) -> dict[int, dict]:
    """Per call site: |Q|, |K|, |V| maxima and K's per-channel (head, dim) minima / maxima over all calls."""
    sites = defaultdict(dict)
    for site, q, k, v, _ in calls:
        stats = sites[site]
        k_min, k_max = k.amin(dim=(0, 2)), k.amax(dim=(0, 2))
        for key, value, reduce in (("q", q.abs().amax(), torch.maximum), ("k", k.abs().amax(), torch.maximum),
                                   ("v", v.abs().amax(), torch.maximum), ("k_min", k_min, torch.minimum),
                                   ("k_max", k_max, torch.maximum)):
            stats[key] = value if key not in stats else reduce(stats[key], value)
    return sites


def _int8_static(q, k, v, scale: float, stats: dict) -> torch.Tensor:
    """The emulated int8-static format (module docstring): fake-quantized operands, fp8 P as in the reference op."""
    center = ((stats["k_min"] + stats["k_max"]) / 2)[None, :, None, :]
    k_scale = ((stats["k_max"] - stats["k_min"]) / 2).amax() / INT8_MAX
    q_scale = stats["q"] / INT8_MAX
    q_f = (q / q_scale).round().clamp(-INT8_MAX, INT8_MAX) * q_scale
    k_f = ((k - center) / k_scale).round().clamp(-INT8_MAX, INT8_MAX) * k_scale
    v_scale = fp8_scale(stats["v"])
    v_f = (v / v_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * v_scale
    scores = (q_f @ k_f.transpose(-1, -2)) * scale
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    return ((p * FP8_MAX).to(torch.float8_e4m3fn).float() @ v_f) / FP8_MAX / p.sum(dim=-1, keepdim=True)


def measure(name: str, prompts: int, seed: int) -> dict:
    pipe = load_reference_pipeline(name)
    with torch.no_grad():
        sites = _calibrate(_record(pipe, name, calibration_prompts(prompts, seed), seed))
        evaluation = _record(pipe, name, eval_prompts(prompts, seed + 1)[0], seed + 1)
        errors = defaultdict(list)
        for site, q, k, v, scale in evaluation:
            exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
            stats = sites[site]
            static = torch.stack([fp8_scale(stats[key]) for key in ("q", "k", "v")])
            outputs = {"int8": fxq.quantized_attention(q, k, v, scale, False),
                       "int8-fp8": fxq.quantized_attention(q, k, v, scale, True),
                       "fp8-static": fxq.quantized_attention(q, k, v, scale, True, static),
                       "int8-static (emulated)": _int8_static(q, k, v, scale, stats)}
            for label, out in outputs.items():
                errors[label].append(relative_l2(out.float(), exact))
    return {"calls": len(evaluation), "call_sites": len(sites),
            "rel_l2_vs_fp32": {label: {"mean": sum(e) / len(e), "max": max(e)} for label, e in errors.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["t2i-dit", "video-dit"], choices=["t2i-dit", "video-dit"])
    parser.add_argument("--prompts", type=int, default=4, help="calibration and evaluation prompts each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = {name: measure(name, args.prompts, args.seed) for name in args.models}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    for name, row in result.items():
        print(name, {label: round(e["mean"], 4) for label, e in row["rel_l2_vs_fp32"].items()})


if __name__ == "__main__":
    main()

"""The CPU ablations quoted in README's ViDiT-Q findings (small N; the N=1000 table comes from quality.py).

    python benchmarks/ablation_cpu.py [--out benchmarks/results/ablation-cpu.json]

1. Channel outlier ratios of the reference models (calibration: 4 prompts x 4 steps).
2. W4A8 on t2i-dit: no balancing, viditq (threshold 4), balancing every layer, rotation only, smoothing 0.1 only
   (12 samples, 8 calibration prompts).
3. Static W8A8 with and without timestep groups [250, 500, 750] on video-dit (8 clips) and t2i-dit (16 images).
4. The synthetic MLP with 40x outlier channels of tests/passes/test_balance.py, per recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import fxquant
from fxquant.quality import calibration_prompts, evaluate, format_table
from fxquant.reference.pipeline import REFERENCE_MODELS, load_reference_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "passes"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def outlier_ratios() -> dict:
    result = {}
    for name in REFERENCE_MODELS:
        pipe = load_reference_pipeline(name)
        fxquant.quantize_pipeline(pipe, "viditq-w8a8", calibration_prompts(4), num_inference_steps=4)
        ratios = torch.tensor([l.outlier_ratio for l in pipe.denoiser.plan.quantized_layers() if l.outlier_ratio])
        result[name] = {"linears": len(ratios), "median": ratios.median().item(), "max": ratios.max().item(),
                        "at_least_4": int((ratios >= 4).sum())}
        print(name, result[name], flush=True)
    return result


def summarise(report: dict, labels: list[str]) -> list[dict]:
    rows = []
    for label, row in zip(["fp"] + labels, report["rows"]):
        rows.append({"label": label, "psnr_db": row["psnr_db"], "fd_fmnist": row["fd_fmnist"],
                     "accuracy": row["accuracy"],
                     "mean_sqnr_db": None if row["sqnr_db_per_step"] is None
                     else sum(row["sqnr_db_per_step"]) / len(row["sqnr_db_per_step"])})
    return rows


def synthetic_outliers() -> dict:
    from test_balance import _error

    generator = torch.Generator().manual_seed(0)
    inputs = [{"hidden_states": torch.randn(64, 8, generator=generator)} for _ in range(2)]
    return {recipe: _error(recipe, inputs)[0]
            for recipe in ("w8a8", "smoothquant-w8a8", "viditq-w8a8", "w4a8", "viditq-w4a8")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/ablation-cpu.json")
    args = parser.parse_args()
    result = {"torch": torch.__version__, "outlier_ratios": outlier_ratios()}

    w4 = {"w4a8": "w4a8", "viditq-w4a8 (threshold 4)": "viditq-w4a8",
          "viditq-w4a8, every layer": fxquant.ViditqW4A8Config(balance_threshold=0.0),
          "w4a8 + rotation only": fxquant.QuantConfig(weight_bits=4, rotate=True),
          "w4a8 + smoothing 0.1 only": fxquant.QuantConfig(weight_bits=4, smooth_alpha=0.1)}
    report = evaluate("t2i-dit", list(w4.values()), samples=12, calibration=8, echo=lambda *a: None)
    print(format_table([report]), flush=True)
    result["w4a8_balancing_t2i_dit"] = summarise(report, list(w4))

    static = {"w8a8-static": "w8a8-static",
              "w8a8-static, timestep groups [250, 500, 750]": fxquant.W8A8StaticConfig(timestep_groups=[250, 500, 750])}
    result["timestep_groups"] = {}
    for model, samples in (("video-dit", 8), ("t2i-dit", 16)):
        report = evaluate(model, list(static.values()), samples=samples, calibration=8, echo=lambda *a: None)
        print(format_table([report]), flush=True)
        result["timestep_groups"][model] = summarise(report, list(static))

    result["synthetic_outlier_mlp_rel_l2"] = synthetic_outliers()
    print(result["synthetic_outlier_mlp_rel_l2"])
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

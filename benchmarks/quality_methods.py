"""The ViDiT-Q and MixDQ quality tables, with their ablations, on the reference models (GPU, full N).

    python benchmarks/quality_methods.py --models t2i-dit --method viditq --samples 1000 \
        --out benchmarks/results/quality-methods

Rows per model (recipe strings with overrides, see fxquant.get_config):
- ViDiT-Q (t2i-dit, video-dit): the naive per-tensor baseline, per-token W8A8, SmoothQuant, ViDiT-Q W8A8; W4A8
  without balancing, with balancing (viditq-w4a8), mixed precision without balancing, without timestep groups,
  and the full viditq-w4a8-mp.
- MixDQ (t2i-dit, fewstep-unet): mixdq-w8a8 and mixdq-w4a8-mp at 4.0 and 5.0 average weight bits, each with and
  without BOS-awareness, and 4.0 bits with activation bits allocated too (4 / 8 / 16 per linear, 8.0 on average).
Writes <out>/<method>/<model>.json / .md and grids (one sub-run per model and method, so each can be redone).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fxquant.quality import evaluate, format_table

VIDITQ = ["w8a8-static", "w8a8", "smoothquant-w8a8", "viditq-w8a8", "w4a8", "viditq-w4a8",
          "viditq-w4a8-mp:smooth_alpha=null,rotate=false",
          "viditq-w4a8-mp:bits_per_timestep_group=false,timestep_groups=[]",
          "viditq-w4a8-mp"]
MIXDQ = ["mixdq-w8a8", "mixdq-w8a8:bos_aware=false",
         "mixdq-w4a8-mp", "mixdq-w4a8-mp:bos_aware=false",
         "mixdq-w4a8-mp:target_bits=5.0", "mixdq-w4a8-mp:target_bits=5.0,bos_aware=false",
         "mixdq-w4a8-mp:act_candidate_bits=[4,8,16],act_target_bits=8.0"]
RECIPES = {"t2i-dit": {"viditq": VIDITQ, "mixdq": MIXDQ}, "video-dit": {"viditq": VIDITQ},
           "fewstep-unet": {"mixdq": ["w8a8-static", "w8a8"] + MIXDQ}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(RECIPES))
    parser.add_argument("--samples", type=int, default=1000, help="per image model (video: a quarter)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--method", choices=["viditq", "mixdq"], nargs="+", default=["viditq", "mixdq"])
    parser.add_argument("--out", default="benchmarks/results/quality-methods")
    args = parser.parse_args()
    reports = []
    for model in args.models:
        for method in args.method:
            if method in RECIPES[model]:
                reports.append(evaluate(model, RECIPES[model][method], device=args.device, batch=args.batch,
                                        samples=args.samples if model != "video-dit" else args.samples // 4,
                                        out_dir=Path(args.out) / method))
    print(format_table(reports))


if __name__ == "__main__":
    main()

"""The README quality table: every recipe x the three reference models, against full precision.

    python benchmarks/quality.py --device cuda --samples 1000 --out benchmarks/results/quality-gpu   # GPU, full N
    python benchmarks/quality.py --samples 20 --out /tmp/quality                                       # CPU, small N

Same as `fxquant eval --models all --recipes all`; writes <model>.json, <model>.md, grids and quality.md.
"""

import sys

from fxquant.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "--models", "all", "--recipes", "all", *sys.argv[1:]]))

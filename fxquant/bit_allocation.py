"""Bit allocation by integer programming (MixDQ), solved with python-mip (CBC).

One binary variable per (layer, candidate bit-width); each layer takes exactly one. The program maximises the
summed sensitivity scores (higher = better quality, e.g. SQNR or SSIM of the output with that layer at that
width) subject to a memory budget: the parameter-weighted average bit-width lies within ±tolerance of the target.
An optional latency budget bounds the summed per-layer latencies. A "layer" may be any unit the caller scores —
ViDiT-Q's (layer, timestep group) pairs fit the same program.

    choice = allocate_bits(sizes={"a": 1000, "b": 10}, scores={"a": {4: -3.0, 8: 0.0}, "b": {4: -0.1, 8: 0.0}},
                           target_bits=4.1)
"""

from __future__ import annotations

from collections.abc import Mapping

import mip

from .errors import RecipeError


def allocate_bits(sizes: Mapping[str, int], scores: Mapping[str, Mapping[int, float]], target_bits: float,
                  tolerance: float = 0.02, latency: Mapping[str, Mapping[int, float]] | None = None,
                  latency_budget: float | None = None, time_limit: float = 10.0) -> dict[str, int]:
    """layer -> chosen bit-width. sizes: parameter counts; scores[layer][bits]: quality if the layer runs at bits.

    Raises RecipeError when no choice meets the budget (naming the reachable range) or the inputs disagree.
    """
    layers = list(sizes)
    if set(scores) != set(layers):
        raise RecipeError(f"scores and sizes name different layers: {sorted(set(scores) ^ set(layers))[:5]}")
    total = sum(sizes.values())
    if total <= 0:
        raise RecipeError("allocate_bits needs layers with a positive parameter count.")
    lowest = sum(sizes[n] * min(scores[n]) for n in layers) / total
    highest = sum(sizes[n] * max(scores[n]) for n in layers) / total
    if target_bits + tolerance < lowest or target_bits - tolerance > highest:
        raise RecipeError(
            f"Average weight bits {target_bits} ± {tolerance} is out of reach: the candidate bit-widths give "
            f"{lowest:.3f} to {highest:.3f}. Choose a target in that range or add candidates."
        )
    model = mip.Model(sense=mip.MAXIMIZE, solver_name=mip.CBC)
    model.verbose = 0
    choice = {(n, b): model.add_var(var_type=mip.BINARY) for n in layers for b in scores[n]}
    for n in layers:
        model += mip.xsum(choice[n, b] for b in scores[n]) == 1
    weighted_bits = mip.xsum(sizes[n] * b * choice[n, b] for n in layers for b in scores[n])
    model += weighted_bits <= (target_bits + tolerance) * total
    model += weighted_bits >= (target_bits - tolerance) * total
    if latency_budget is not None:
        if latency is None:
            raise RecipeError("latency_budget needs a per-layer latency table (latency[layer][bits]).")
        model += mip.xsum(latency[n][b] * choice[n, b] for n in layers for b in scores[n]) <= latency_budget
    model.objective = mip.xsum(scores[n][b] * choice[n, b] for n in layers for b in scores[n])
    status = model.optimize(max_seconds=time_limit)
    if status not in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
        raise RecipeError(
            f"No bit allocation meets average {target_bits} ± {tolerance} bits"
            + (f" and latency ≤ {latency_budget}" if latency_budget is not None else "")
            + f" (solver status {status.name}). Loosen the budget or add candidate bit-widths."
        )
    return {n: next(b for b in scores[n] if choice[n, b].x >= 0.5) for n in layers}


def average_bits(sizes: Mapping[str, int], bits: Mapping[str, int]) -> float:
    """Parameter-weighted mean bit-width of an allocation."""
    return sum(sizes[n] * bits[n] for n in sizes) / sum(sizes.values())

"""Bit allocation by integer programming (MixDQ), solved with python-mip (CBC, or HiGHS where CBC is missing).

One binary variable per (layer, candidate bit-width); each layer takes exactly one. The program maximises the
summed sensitivity scores (higher = better quality, e.g. SQNR or SSIM of the output with that layer at that
width) subject to a memory budget: the parameter-weighted average bit-width lies within ±tolerance of the target.
An optional latency budget bounds the summed per-layer latencies. A "layer" may be any unit the caller scores —
ViDiT-Q's (layer, timestep group) pairs fit the same program. Candidates may also be (weight bits, activation
bits) pairs (MixDQ's activation allocation): the memory budget counts their weight bits, and act_target_bits bounds
the act_sizes-weighted average of their activation bits.

    choice = allocate_bits(sizes={"a": 1000, "b": 10}, scores={"a": {4: -3.0, 8: 0.0}, "b": {4: -0.1, 8: 0.0}},
                           target_bits=4.1)
"""

from __future__ import annotations

from collections.abc import Mapping

import mip
import torch

from .errors import RecipeError


def require_solver() -> str:
    """The python-mip solver to use: CBC (the cbcbox package in mip >= 2), else HiGHS (the highsbox package).
    Raises RecipeError when neither library loads (without one, mip fails only when a program is solved, e.g.
    NameError: name 'cbclib' is not defined)."""
    from mip import cbc

    if getattr(cbc, "has_cbc", True):
        return mip.CBC
    from mip import highs

    if highs.has_highs:
        return mip.HIGHS
    raise RecipeError("Mixed precision solves an integer program with python-mip, which found no solver library "
                      "here: install one with `pip install cbcbox` (CBC) or `pip install highsbox` (HiGHS), or use "
                      "a recipe without mixed_precision.")


def allocate_bits(sizes: Mapping[str, int], scores: Mapping[str, Mapping], target_bits: float,
                  tolerance: float = 0.02, latency: Mapping[str, Mapping[int, float]] | None = None,
                  latency_budget: float | None = None, executed_bits: float | None = None,
                  act_sizes: Mapping[str, int] | None = None, act_target_bits: float | None = None,
                  time_limit: float = 10.0) -> dict[str, int | tuple | dict[int, int]]:
    """layer -> chosen bit-width. sizes: parameter counts; scores[layer][bits]: quality if the layer runs at bits
    (bits: an int, or a (weight bits, activation bits) pair; act_target_bits then bounds the average activation
    bits weighted by act_sizes).

    Per-timestep-group layers (ViDiT-Q): scores[layer] = {group: {bits: score}}; the layer then gets a width per
    group ({group: bits}) and is stored at the largest (nested planes), which is what the memory budget counts.
    executed_bits bounds the parameter-weighted average of the widths run, over groups (the weight traffic).
    Raises RecipeError when no choice meets the budget (naming the reachable range) or the inputs disagree, or when
    no solver library loads (`require_solver`).
    """
    solver = require_solver()
    layers = list(sizes)
    if set(scores) != set(layers):
        raise RecipeError(f"scores and sizes name different layers: {sorted(set(scores) ^ set(layers))[:5]}")
    total = sum(sizes.values())
    if total <= 0:
        raise RecipeError("allocate_bits needs layers with a positive parameter count.")
    grouped = {n: dict(scores[n]) if _per_group(scores[n]) else {None: dict(scores[n])} for n in layers}
    widths = {n: sorted({b for table in grouped[n].values() for b in table}, key=weight_bits_of) for n in layers}
    lowest = sum(sizes[n] * max(min(map(weight_bits_of, t)) for t in grouped[n].values()) for n in layers) / total
    highest = sum(sizes[n] * weight_bits_of(widths[n][-1]) for n in layers) / total
    if target_bits + tolerance < lowest or target_bits - tolerance > highest:
        raise RecipeError(
            f"Average weight bits {target_bits} ± {tolerance} is out of reach: the candidate bit-widths give "
            f"{lowest:.3f} to {highest:.3f}. Choose a target in that range or add candidates."
        )
    model = mip.Model(sense=mip.MAXIMIZE, solver_name=solver)
    model.verbose = 0
    run = {(n, g, b): model.add_var(var_type=mip.BINARY) for n in layers for g, t in grouped[n].items() for b in t}
    stored = {(n, b): model.add_var(var_type=mip.BINARY) for n in layers for b in widths[n]}
    for n in layers:
        model += mip.xsum(stored[n, b] for b in widths[n]) == 1
        for g, table in grouped[n].items():
            model += mip.xsum(run[n, g, b] for b in table) == 1
            for b in table:  # a group runs at most the stored width
                model += run[n, g, b] <= mip.xsum(stored[n, w] for w in widths[n]
                                                  if weight_bits_of(w) >= weight_bits_of(b))
        for b in widths[n]:  # the stored width is the widest one run
            model += stored[n, b] <= mip.xsum(run[n, g, b] for g, t in grouped[n].items() if b in t)
    weighted_bits = mip.xsum(sizes[n] * weight_bits_of(b) * stored[n, b] for n in layers for b in widths[n])
    model += weighted_bits <= (target_bits + tolerance) * total
    model += weighted_bits >= (target_bits - tolerance) * total
    if executed_bits is not None:
        model += mip.xsum(sizes[n] * weight_bits_of(b) * run[n, g, b] / len(grouped[n])
                          for n in layers for g, t in grouped[n].items() for b in t) <= executed_bits * total
    if act_target_bits is not None:
        act_total = sum(act_sizes[n] for n in layers)
        model += mip.xsum(act_sizes[n] * b[1] * stored[n, b] for n in layers for b in widths[n]) \
            <= act_target_bits * act_total
    if latency_budget is not None:
        if latency is None:
            raise RecipeError("latency_budget needs a per-layer latency table (latency[layer][bits]).")
        model += mip.xsum(latency[n][b] * run[n, g, b] / len(grouped[n])
                          for n in layers for g, t in grouped[n].items() for b in t) <= latency_budget
    model.objective = mip.xsum(grouped[n][g][b] * run[n, g, b]
                               for n in layers for g, t in grouped[n].items() for b in t)
    status = _optimize(model, time_limit)
    if status not in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
        raise RecipeError(
            f"No bit allocation meets average {target_bits} ± {tolerance} bits"
            + (f", executed bits ≤ {executed_bits}" if executed_bits is not None else "")
            + (f", activation bits ≤ {act_target_bits}" if act_target_bits is not None else "")
            + (f" and latency ≤ {latency_budget}" if latency_budget is not None else "")
            + f" (solver status {status.name}). Loosen the budget or add candidate bit-widths."
        )
    choice = {n: {g: next(b for b in t if run[n, g, b].x >= 0.5) for g, t in grouped[n].items()} for n in layers}
    return {n: choice[n] if _per_group(scores[n]) else choice[n][None] for n in layers}


def _optimize(model: mip.Model, time_limit: float) -> mip.OptimizationStatus:
    """model.optimize within time_limit seconds, keeping torch's CPU thread count: CBC sets OpenMP's to 1 for the
    whole process (the OpenMP runtime torch shares), which left torch single-threaded after every mixed-precision
    quantization."""
    threads = torch.get_num_threads()
    try:
        return model.optimize(max_seconds=time_limit)
    finally:
        torch.set_num_threads(threads)


def weight_bits_of(candidate: int | tuple) -> int:
    """The weight bits of a candidate: the int itself or the first of a (weight, activation) pair."""
    return candidate[0] if isinstance(candidate, tuple) else candidate


def _per_group(table: Mapping) -> bool:
    """True when a layer's scores are {group: {bits: score}} rather than {bits: score}."""
    return any(isinstance(value, Mapping) for value in table.values())


def average_bits(sizes: Mapping[str, int], bits: Mapping[str, int | Mapping[int, int]]) -> float:
    """Parameter-weighted mean stored bit-width of an allocation (a per-group choice stores its largest width)."""
    stored = {n: max(b.values()) if isinstance(b, Mapping) else weight_bits_of(b) for n, b in bits.items()}
    return sum(sizes[n] * stored[n] for n in sizes) / sum(sizes.values())

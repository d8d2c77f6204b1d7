"""fxquant's graph passes, run in one fixed order by `run_passes`.

    annotate -> observe -> [calibration: the user's pipeline runs the prepared model] -> calibrate -> balance
    -> sensitivity -> lower

`prepare` runs PREPARE_PASSES, `convert` runs CONVERT_PASSES. After every pass the validator checks the graph and
the plan; with FXQUANT_DUMP=<dir> each pass's graph and plan are written there as text. A failing pass is named
together with the passes that ran before it.
"""

from __future__ import annotations

import os
from pathlib import Path

from fxquant.errors import FxquantError
from fxquant.state import QuantState

from .annotate import AnnotatePass
from .balance import BalancePass
from .base import PassResult, QuantPass
from .calibrate import CalibratePass
from .lower import LowerPass
from .observe import ObservePass
from .sensitivity import SensitivityPass

PASSES: tuple[QuantPass, ...] = (AnnotatePass(), ObservePass(), CalibratePass(), BalancePass(), SensitivityPass(),
                                 LowerPass())
PASS_NAMES = tuple(p.name for p in PASSES)
PREPARE_PASSES = ("annotate", "observe")
CONVERT_PASSES = ("calibrate", "balance", "sensitivity", "lower")

_META_KEYS = ("fxquant_fqn", "fxquant_role", "fxquant_group", "fxquant_observed", "fxquant_lowered")


def run_passes(state: QuantState, names: tuple[str, ...]) -> QuantState:
    """Run the named passes (a contiguous part of PASS_NAMES, in order) on `state`, validating after each."""
    unknown = [name for name in names if name not in PASS_NAMES]
    if unknown:
        raise ValueError(f"Unknown pass {unknown[0]!r}; passes are {PASS_NAMES}.")
    for quant_pass in PASSES:
        if quant_pass.name not in names:
            continue
        try:
            quant_pass(state)
        except FxquantError:
            raise
        except Exception as err:
            raise RuntimeError(
                f"An error occurred in the {quant_pass.name!r} pass after the passes {state.passes_run}: {err}"
            ) from err
        state.passes_run.append(quant_pass.name)
        validate(state)
        dump_dir = os.environ.get("FXQUANT_DUMP")
        if dump_dir:
            dump(state, Path(dump_dir))
    return state


def validate(state: QuantState) -> None:
    """Invariants between passes: the graph lints, every annotated node has a plan entry, bits are consistent."""
    state.graph.lint()
    if state.plan is None:
        return
    for node in state.graph.nodes:
        fqn = node.meta.get("fxquant_fqn")
        if fqn is not None and fqn not in state.plan.layers:
            raise AssertionError(f"node {node.name} is tied to {fqn!r}, which has no plan entry")
    for layer in state.plan.layers.values():
        active = layer.attention_format is not None if layer.op == "sdpa" else layer.quantized
        if active == (layer.keep_reason is not None):
            raise AssertionError(f"layer {layer.fqn!r} must be either quantized or kept with a reason")


def graph_text(state: QuantState) -> str:
    """The captured graph as readable text, one node a line, with fxquant's annotations as comments."""
    lines = []
    for node in state.graph.nodes:
        notes = " ".join(f"{key[8:]}={node.meta[key]}" for key in _META_KEYS if key in node.meta)
        args = ", ".join(str(a) for a in node.args)
        target = node.target if node.op != "call_function" else getattr(node.target, "__name__", node.target)
        line = f"%{node.name} = {node.op}[{target}]({args})"
        lines.append(f"{line}  # {notes}" if notes else line)
    return "\n".join(lines)


def dump(state: QuantState, directory: Path) -> Path:
    """Write the graph and plan after the last pass run to <directory>/<NN>-<pass>.txt."""
    directory.mkdir(parents=True, exist_ok=True)
    name = state.passes_run[-1]
    path = directory / f"{PASS_NAMES.index(name):02d}-{name}.txt"
    plan = state.plan.summary() if state.plan is not None else "(no plan yet)"
    path.write_text(f"# after pass {name!r}\n\n{graph_text(state)}\n\n# plan\n{plan}\n")
    return path


__all__ = ["PASSES", "PASS_NAMES", "PREPARE_PASSES", "CONVERT_PASSES", "PassResult", "QuantPass", "run_passes",
           "validate", "graph_text", "dump"]

"""sensitivity: metric-decoupled sensitivity probing, then bit allocation by integer programming (mixed precision).

Reads: config (mixed_precision, share_bits_across_blocks, candidate_bits, target_bits, bits_per_timestep_group,
content_metric, sensitivity_cache), state.recorded_calls (the full-precision trajectory recorded during calibration),
state.render (the pipeline's sampler, for the rendered content metric), plan layers (groups, balancing, static
scales), the float model. Writes: LayerPlan.weight_bits / group_weight_bits, LayerPlan.sensitivity / sensitivity_metric,
plan.sensitivity_seconds, the cache file. Runs only when the config asks for mixed precision.

Units: "layer" = each quantized layer (MixDQ); "block-group" = the quantized layers of one block and layer group
(ViDiT-Q), the block being the FQN up to its first numeric component. With config.share_bits_across_blocks the members
of each list of repeated blocks share their units (the layers at one position in all of them: one unit), so that the
blocks keep identical code for the compiler. For each unit x candidate bits (x timestep
group) the unit's layers are lowered to the real QuantLinear / QuantConv2d at those bits, everything else stays
full precision, the recorded calls (of that timestep group) are replayed and the output is compared with full
precision by the unit's metric, as relative noise power (10^(-SQNR/10), additive across layers):
  - "text-alignment" (cross-attention; MixDQ also feed-forward): the guidance direction, conditional minus
    unconditional half of a classifier-free-guidance batch (detected when the first half of the text input repeats
    one embedding); calls without that structure use fidelity;
  - "temporal" (temporal attention, 5-D outputs [B, C, F, H, W]): the frame-to-frame differences along F;
  - "fidelity" (everything else): the whole output;
  - "rendered-ssim" (content layers with config.content_metric "render", MixDQ's own metric): the pipeline
    generates the first render_prompts calibration prompts again (state.render, from quantize_pipeline) with the unit
    quantized, damage = 1 - mean SSIM of those samples against the full-precision ones.
The damages of each metric are normalised to sum 1 over its units at the lowest candidate bits, so each metric
weighs alike (MixDQ's decoupling), and fxquant.bit_allocation picks the widths that minimise the summed damage
within target_bits ± 0.02 (parameter-weighted average over the quantized layers, as stored) and, if set,
executed_bits (the average width run over timestep groups).

Single-unit damages add up only while they are small: many 2-bit layers together hurt more than their sum (measured:
fewstep-unet at 4.0 bits, 31.1 dB with {2, 4, 8} against 37.2 dB with {4, 8}). So, when the lowest candidate can be
dropped and the target still reached, the program is solved both with and without it, both allocations are lowered
together and replayed (joint damage: each metric's noise power on the whole model's output, averaged), and the
lower joint damage wins (plan.allocation_checks records both).

Blocks before a unit are not rerun (config.sensitivity_replay): where a model's repeated blocks run one after
another, each feeding only the next (a DiT), a probe of a unit whose layers sit in block i replays block i-1's
full-precision output (recorded once per block and call; the earlier blocks return it instead of running) and runs
only blocks i.. onwards. Checked per block against the full-precision output of the first recorded call (relative
L2 <= 1e-5); from the first block where that fails (a UNet's skip connections, interleaved spatial / temporal lists)
probes run the whole model.

Probes persist (config.sensitivity_cache, a JSON file): each damage is written as soon as it is measured, keyed by
unit, timestep group and bits, under a fingerprint of everything a damage depends on (the probe-related config, the
plan of every probed layer with its calibrated scales, the model's parameters and the replayed calls; measured values
within 1 %, since a GPU's calibration moves in its last bits from run to run). A run that
crashed or was stopped resumes where it stopped; a rerun that changes only the allocation's budgets (target_bits,
executed_bits, act_target_bits) probes no unit again (the joint check of the allocation still runs); a file made for
another model, calibration or recipe is refused.

Activation bits (config.act_candidate_bits, "layer" units of linears): each unit is also probed with its activations
alone at the other widths (weights at 8 bits; 4: static scales re-derived on a 4-bit grid, 16: not quantized), the
program's candidates become (weight bits, activation bits) pairs scored by the sum of both damages less the shared
W8A8 probe, and act_target_bits bounds their in_features-weighted average activation bits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fxquant.bit_allocation import allocate_bits, require_solver, weight_bits_of
from fxquant.errors import CalibrationError, RecipeError
from fxquant.metrics import relative_l2, ssim
from fxquant.model import repeated_blocks
from fxquant.modules import QuantConv2d, QuantLinear
from fxquant.plan import LayerPlan
from fxquant.quantizer import asymmetric_params, asymmetric_range, packable
from fxquant.state import QuantState
from fxquant.timestep import TimestepGroup

from .base import PassResult, QuantPass
from .lower import replace_module

_BLOCK = re.compile(r"^(.*?\.(?:\d+|\*))\.")  # a block index, or "*" for every member of a list
# config fields that do not change a probe's damage (the program's budgets, how probes run): a cache survives
# changing them
_NOT_FINGERPRINTED = {"target_bits", "executed_bits", "act_target_bits", "sensitivity_cache",
                      "sensitivity_replay"}
_CONTENT_GROUPS = {"layer": ("cross-attention", "mlp"), "block-group": ("cross-attention",)}


def _unit_name(layer: LayerPlan, granularity: str, shared_blocks: list[str]) -> str:
    """The sensitivity unit of a layer: its name ("layer") or its block and layer group ("block-group"), with the
    index of the repeated block it lies in replaced by "*" when that block is among `shared_blocks`
    (config.share_bits_across_blocks: one unit for that position in every member of the list)."""
    fqn = layer.fqn
    block = next((name for name in shared_blocks if fqn.startswith(name + ".")), None)
    if block is not None:
        fqn = f"{block.rsplit('.', 1)[0]}.*{fqn[len(block):]}"
    if granularity == "layer":
        return fqn
    match = _BLOCK.match(fqn)
    return f"{match.group(1) if match else '(top)'}/{layer.group}"


def _metric(layers: list[LayerPlan], granularity: str, content_metric: str = "proxy") -> str:
    groups = {layer.group for layer in layers}
    if groups & set(_CONTENT_GROUPS[granularity]):
        return "rendered-ssim" if content_metric == "render" else "text-alignment"
    return "temporal" if "temporal-attention" in groups else "fidelity"


def _frames(samples: torch.Tensor) -> torch.Tensor:
    """Samples [N, C, H, W] or clips [N, C, F, H, W] -> float64 CPU frames [N * F, C, H, W]."""
    samples = samples.detach().double().cpu()
    return samples.movedim(2, 1).flatten(0, 1) if samples.dim() == 5 else samples


def _ssim_damage(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """1 - mean SSIM of the samples against the full-precision ones (data range: the reference's)."""
    frames, reference = _frames(samples), _frames(reference)
    data_range = (reference.max() - reference.min()).item() or 1.0
    return 1.0 - sum(ssim(frames, reference, data_range)) / len(frames)


# calibrated LayerPlan fields: compared within _MEASURED_RTOL, not hashed; zero points are neither (they follow the
# scales and the calls)
_MEASURED_FIELDS = ("act_scale", "outlier_ratio", "smooth", "attention_scales")
# a GPU's nondeterministic bf16 reductions move a calibrated maximum by about one bf16 step (2^-8, 0.4 %) between
# runs of the same calibration; a change of data, model or recipe moves far more or changes the hashed part
_MEASURED_RTOL = 1e-2


def _magnitudes(values: torch.Tensor) -> list[float]:
    """[sum, max] of the absolute values (0, 0 when empty): what _fingerprint compares of a tensor or a vector."""
    values = values.detach().double().abs().flatten()
    return [float(values.sum()), float(values.max())] if values.numel() else [0.0, 0.0]


def _digest(value, measured: list[float]) -> str:
    """A tensor, or nested lists / tuples / dicts of them and plain values -> text of what must match exactly (tensor
    shapes and dtypes, plain values; other objects by their type only, never their address); each tensor's
    `_magnitudes` are appended to `measured` instead."""
    if isinstance(value, torch.Tensor):
        measured.extend(_magnitudes(value))
        return f"{tuple(value.shape)}:{value.dtype}"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}={_digest(item, measured)}" for key, item in sorted(value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_digest(item, measured) for item in value) + "]"
    return repr(value) if value is None or isinstance(value, (bool, int, float, str)) else type(value).__name__


def _fingerprint(state: QuantState, units: dict, calls: list) -> tuple[dict[str, str], list[float]]:
    """What a probe's damage depends on, in two parts: sha256 hashes of what must match exactly ("config": the
    probe-related config; "layers": the probed layers' plans without their calibrated values; "model" and "calls":
    the shapes and dtypes of the model's parameters and buffers and of the replayed calls' tensors) and the measured
    values (`_magnitudes` of each probed layer's calibrated scales, smoothing factors and outlier ratio, and of those
    tensors: two numbers each, so that the file stays small), which match within _MEASURED_RTOL."""
    measured: list[float] = []
    config = {key: value for key, value in dataclasses.asdict(state.config).items() if key not in _NOT_FINGERPRINTED}
    layers = {}
    for name, unit in units.items():
        layers[name] = []
        for layer in unit:
            plan = {key: value for key, value in dataclasses.asdict(layer).items()
                    if key not in (*_MEASURED_FIELDS, "act_zero")}
            for key in _MEASURED_FIELDS:
                values = [v for v in torch.utils._pytree.tree_leaves(getattr(layer, key)) if v is not None]
                plan[key] = len(values)
                measured.extend(_magnitudes(torch.tensor(values, dtype=torch.float64)))
            layers[name].append(plan)
    parts = {"config": config, "layers": layers,
             "model": [_digest(tensor, measured) for tensor in (*state.model.parameters(), *state.model.buffers())],
             "calls": _digest([list(call) for call in calls], measured)}
    hashes = {key: hashlib.sha256(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()
              for key, part in parts.items()}
    return hashes, measured


def _measured_match(stored: list[float], measured: list[float]) -> bool:
    """True when two runs' measured values (_fingerprint) agree within _MEASURED_RTOL each."""
    return len(stored) == len(measured) and all(
        abs(a - b) <= _MEASURED_RTOL * max(abs(a), abs(b)) for a, b in zip(stored, measured))


class _ProbeCache:
    """Probe damages in a JSON file (config.sensitivity_cache), rewritten atomically after every probe, under the
    fingerprint (_fingerprint) of what they depend on."""

    def __init__(self, path: str, fingerprint: tuple[dict[str, str], list[float]]):
        self.path, (self.fingerprint, self.measured), self.damage = Path(path), fingerprint, {}
        if self.path.exists():
            data = json.loads(self.path.read_text())
            stored = data.get("fingerprint")
            stored = stored if isinstance(stored, dict) else {}
            changed = [key for key, value in self.fingerprint.items() if stored.get(key) != value]
            if changed:
                differs = f"its fingerprint differs in {', '.join(changed)}"
            elif not _measured_match(data.get("measured", []), self.measured):
                differs = f"its calibrated scales, weights or calls differ by more than {_MEASURED_RTOL:.0%}"
            else:
                differs = None
            if differs:
                raise CalibrationError(
                    f"sensitivity_cache {str(self.path)!r} holds the probes of another model, calibration or recipe "
                    f"({differs}): delete it, or name another file to probe afresh.")
            self.damage = data["damage"]

    def __len__(self) -> int:
        return len(self.damage)

    def get(self, key: str) -> float | None:
        return self.damage.get(key)

    def put(self, key: str, value: float) -> None:
        self.damage[key] = value
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps({"fingerprint": self.fingerprint, "measured": self.measured,
                                       "damage": self.damage}))
        os.replace(partial, self.path)  # a crash mid-write leaves the previous file whole


class _BlockDone(Exception):
    """Ends a recording forward pass once the block it waits for has run."""


def _full_precision_outputs(model: torch.nn.Module, calls: list) -> tuple[list[torch.Tensor], list[str]]:
    """The model's outputs on the recorded calls (args, kwargs, ...), and its repeated blocks in the order the first
    call runs them ([] when one runs twice: no single prefix to replay)."""
    order: list[str] = []
    hooks = [model.get_submodule(name).register_forward_pre_hook(lambda *_, name=name: order.append(name))
             for name in repeated_blocks(model)]
    with torch.no_grad():
        try:  # the hooks see the first call only
            outputs = [_first_tensor(model(*args, **kwargs)) for args, kwargs, *_ in calls[:1]]
        finally:
            for hook in hooks:
                hook.remove()
        outputs += [_first_tensor(model(*args, **kwargs)) for args, kwargs, *_ in calls[1:]]
    return outputs, order if len(order) == len(set(order)) else []


class PrefixReplay:
    """Full-precision block outputs replayed in place of the blocks before a probed unit (see the module docstring).
    calls: the recorded calls (args, kwargs, group, cfg); reference: their full-precision outputs; order: the
    repeated blocks in execution order (_full_precision_outputs)."""

    TOLERANCE = 1e-5  # relative L2 of a replayed run against the full-precision output

    def __init__(self, model: torch.nn.Module, calls: list, reference: list, order: list[str]):
        self.model, self.calls, self.reference, self.order = model, calls, reference, order
        self.position, self.outputs = 0, []  # order[position - 1]'s output per call, when position > 0

    def prepare(self, lowered: list[LayerPlan]) -> int:
        """With the model still full precision: how many leading blocks a probe of the `lowered` layers may replay
        (their outputs recorded now if needed); 0 when none may."""
        position = min((next((i for i, name in enumerate(self.order) if layer.fqn.startswith(name + ".")), 0)
                        for layer in lowered), default=0)
        if position == 0 or position == self.position:
            return position
        with torch.no_grad():
            outputs = [self._record(index, position) for index in range(len(self.calls))]
        self.position, self.outputs = position, outputs
        if not self._reproduces_reference():
            self.order, self.position, self.outputs = [], 0, []  # this model's blocks cannot be replayed
        return self.position

    def _record(self, index: int, position: int):
        """order[position - 1]'s full-precision output for call `index` (the blocks held so far replayed)."""
        held = []

        def keep(module, args, output):
            held.append(output)
            raise _BlockDone

        hook = self.model.get_submodule(self.order[position - 1]).register_forward_hook(keep)
        args, kwargs, *_ = self.calls[index]
        try:
            with self.replayed(index, self.position if self.position < position else 0):
                self.model(*args, **kwargs)
        except _BlockDone:
            pass
        finally:
            hook.remove()
        return held[0]

    def _reproduces_reference(self) -> bool:
        args, kwargs, *_ = self.calls[0]
        try:
            with torch.no_grad(), self.replayed(0, self.position):
                out = _first_tensor(self.model(*args, **kwargs))
        except Exception:  # any failure: the code between the blocks needs their own outputs
            return False
        return out.shape == self.reference[0].shape and relative_l2(out, self.reference[0]) <= self.TOLERANCE

    @contextmanager
    def replayed(self, index: int, position: int):
        """Within: the first `position` blocks return the held output for call `index` instead of running (the
        last one a copy, so that nothing downstream can change the held tensors)."""
        blocks = [self.model.get_submodule(name) for name in self.order[:position]]
        held = self.outputs[index] if position else None
        for block in blocks[:-1]:
            block.forward = lambda *args, **kwargs: held
        if blocks:
            blocks[-1].forward = lambda *args, **kwargs: torch.utils._pytree.tree_map_only(
                torch.Tensor, torch.clone, held)
        try:
            yield
        finally:
            for block in blocks:
                del block.forward


def _can_store(layer: LayerPlan, bits: int) -> bool:
    """Whether the layer can store `bits`: convolutions take one plane (2, 4 or 8 bits, not 6 = 4 + 2), and the
    per-output-channel width must pack."""
    return not (layer.op == "conv2d" and bits == 6) and packable(layer.num_params // layer.out_features, bits)


def _first_tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _noise_power(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference||^2 / ||reference||^2 (10^(-SQNR/10))."""
    reference = reference.double()
    return ((output.double() - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30)).item()


def _cfg_split(kwargs: dict, condition_names: list[str]) -> bool:
    """True when the call is a classifier-free-guidance batch: its 3-D condition input (passed by keyword, as
    diffusers pipelines do) has a first half that repeats one embedding (the empty prompt) and a second half that
    does not."""
    for name in condition_names:
        text = kwargs.get(name)
        if isinstance(text, torch.Tensor) and text.dim() == 3 and text.shape[0] % 2 == 0 and text.shape[0] > 1:
            half = text.shape[0] // 2
            return bool((text[:half] == text[:1]).all()) and not bool((text[half:] == text[:1]).all())
    return False


def _fewer_rows(args: tuple, kwargs: dict, rows: int, cfg: bool) -> tuple[tuple, dict]:
    """The call on at most `rows` samples: every tensor whose first dimension is the batch is sliced (a guidance
    batch keeps the same samples from both halves)."""
    batch = next(t.shape[0] for t in torch.utils._pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor) and t.dim() > 1)
    if batch <= rows:
        return args, kwargs
    index = torch.arange(rows // 2)
    index = torch.cat([index, index + batch // 2]) if cfg else torch.arange(rows)

    def slice_rows(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[index.to(tensor.device)] if tensor.dim() and tensor.shape[0] == batch else tensor

    return torch.utils._pytree.tree_map_only(torch.Tensor, slice_rows, (args, kwargs))


def _view(output: torch.Tensor, metric: str, cfg: bool) -> torch.Tensor:
    """The part of the output a metric compares."""
    if metric == "text-alignment" and cfg:
        uncond, cond = output.chunk(2)
        return cond - uncond
    if metric == "temporal" and output.dim() == 5 and output.shape[2] > 1:
        return output[:, :, 1:] - output[:, :, :-1]
    return output


def _act_allocated(layers: list[LayerPlan]) -> bool:
    """Whether a unit's activation bits are allocated: linears only (convolutions quantize inside their op, A8)."""
    return all(layer.op == "linear" for layer in layers)


def _at_bits(layer: LayerPlan, weight_bits: int, act_bits: int = 8) -> LayerPlan:
    """The layer's plan at other weight / activation bits, for probing or for the final choice: static scales are
    re-derived for other activation bits from the calibrated range; the norm fold is cleared (it happens only at
    lower, and probes multiply by 1 / s themselves)."""
    changes = dict(weight_bits=weight_bits, group_weight_bits=None, smooth_folded_into=None)
    if act_bits != layer.act_bits:
        changes["act_bits"] = act_bits
        if layer.act_scale is not None and act_bits != 16:
            params = [asymmetric_params(*map(torch.tensor, asymmetric_range(scale, zero, layer.act_bits)), act_bits)
                      for scale, zero in zip(layer.act_scale, layer.act_zero)]
            changes.update(act_scale=[scale.item() for scale, _ in params],
                           act_zero=[int(zero.item()) for _, zero in params])
    return dataclasses.replace(layer, **changes)


def _pair(choice) -> tuple[int, int]:
    """An allocation's choice as (weight bits, activation bits)."""
    return choice if isinstance(choice, tuple) else (choice, 8)


def _with_activations(table: dict, allocated: bool) -> dict:
    """With activation allocation: {bits: score, "a4": score, ...} -> {(weight bits, act bits): score} (an
    activation's damage adds to the weight damage, less the shared W8A8 probe; units without activation probes get
    (bits, 8) only). Without: the table unchanged."""
    if not allocated:
        return table
    weights = {bits: score for bits, score in table.items() if not isinstance(bits, str)}
    acts = {int(key[1:]): score for key, score in table.items() if isinstance(key, str)}
    acts[8] = weights[8]
    return {(w, a): weights[w] + acts[a] - weights[8] for w in weights for a in acts}


class SensitivityPass(QuantPass):
    name = "sensitivity"

    def requires(self, state):
        assert not state.hooks, "sensitivity needs calibrate to have detached the observers"

    def call(self, state: QuantState) -> PassResult:
        config, plan = state.config, state.plan
        if not config.mixed_precision:
            return PassResult(modified=False)
        require_solver()  # before the probes, not after them
        start = time.perf_counter()
        units: dict[str, list[LayerPlan]] = defaultdict(list)
        shared_blocks = repeated_blocks(state.model) if config.share_bits_across_blocks else []
        for layer in plan.quantized_layers():
            units[_unit_name(layer, config.mixed_precision, shared_blocks)].append(layer)
        groups = [None]
        if config.bits_per_timestep_group:
            groups = list(range(len(plan.timestep_boundaries) + 1))
            missing = set(groups) - {group for *_, group in state.recorded_calls}
            if missing:
                bounds = [-float("inf"), *plan.timestep_boundaries, float("inf")]
                ranges = ", ".join(f"{g} ({bounds[g]:g} <= t < {bounds[g + 1]:g})" for g in sorted(missing))
                raise CalibrationError(
                    f"The recorded calibration calls reach no call in timestep groups [{ranges}], so their bits "
                    "cannot be probed: calibrate with calls whose timesteps reach every group (whole trajectories, "
                    f"or batches at chosen timesteps), or raise sensitivity_calls (now {config.sensitivity_calls}) "
                    "if later calibration calls do.")
        condition_names = [name for name, role in plan.input_roles.items() if role == "condition"]
        calls = []
        for args, kwargs, group in state.recorded_calls:
            cfg = _cfg_split(kwargs, condition_names)
            calls.append((*_fewer_rows(args, kwargs, config.sensitivity_rows, cfg), group, cfg))
        reference, block_order = _full_precision_outputs(state.model, calls)
        replay = PrefixReplay(state.model, calls, reference, block_order) if config.sensitivity_replay else None
        metric_of = {name: _metric(layers, config.mixed_precision, config.content_metric)
                     for name, layers in units.items()}
        rendered = None  # the full-precision samples, when content layers are scored by rendering
        if "rendered-ssim" in metric_of.values():
            if state.render is None:
                raise CalibrationError("content_metric='render' generates samples with the pipeline: quantize with "
                                       "fxquant.quantize_pipeline, or use content_metric='proxy'.")
            rendered = state.render()
        damage: dict[str, dict] = {}
        probes = [(name, group, bits, 8) for name, layers in units.items() for group in groups
                  for bits in config.candidate_bits if all(_can_store(l, bits) for l in layers)]
        probes += [(name, None, 8, act) for name, layers in units.items() for act in config.act_candidate_bits
                   if act != 8 and _act_allocated(layers)]  # activations alone: weights at 8 bits
        cache = _ProbeCache(config.sensitivity_cache, _fingerprint(state, units, calls)) \
            if config.sensitivity_cache else None
        cached = f", {len(cache)} probes cached" if cache is not None else ""
        for name, group, bits, act in tqdm(probes, desc=f"sensitivity ({len(units)} units{cached})", unit="probe"):
            key = f"{name}|{group}|{bits}|{act}"
            value = cache.get(key) if cache is not None else None
            if value is None:
                value = self._damage(state, [_at_bits(layer, bits, act) for layer in units[name]], metric_of[name],
                                     group, calls, (reference, rendered), replay)
                if cache is not None:
                    cache.put(key, value)
            damage.setdefault(name, {}).setdefault(group, {})[bits if act == 8 else f"a{act}"] = value
        self._allocate(state, units, damage, groups, calls, (reference, rendered), metric_of)
        plan.sensitivity_seconds = time.perf_counter() - start
        return PassResult(modified=True)

    def _damage(self, state: QuantState, lowered: list[LayerPlan], metric: str, group: int | None, calls: list,
                reference: tuple, replay: PrefixReplay | None) -> float:
        """One probe: the `lowered` layer plans quantized, the rest full precision -> the unit's damage by `metric`
        (mean noise power over the recorded calls of timestep group `group`, or 1 - SSIM of a rendering).
        reference: (the recorded calls' full-precision outputs, the full-precision samples or None); replay: the
        blocks before the unit (PrefixReplay), or None (config.sensitivity_replay off)."""
        outputs_fp, rendered = reference
        if metric == "rendered-ssim":
            return _ssim_damage(self._probe(state, lowered, [], render=True)[1], rendered)
        selected = [i for i, call in enumerate(calls) if group is None or call[2] == group]
        position = replay.prepare(lowered) if replay else 0
        outputs, _ = self._probe(state, lowered, [calls[i] for i in selected],
                                 replayed=[replay.replayed(i, position) for i in selected] if position else None)
        return sum(_noise_power(_view(out, metric, calls[i][3]), _view(outputs_fp[i], metric, calls[i][3]))
                   for out, i in zip(outputs, selected)) / len(selected)

    @staticmethod
    @contextmanager
    def _lowered(state: QuantState, lowered: list[LayerPlan]):
        """Within: the `lowered` layer plans (from _at_bits) run as their real quantized modules, the rest full
        precision; yields the TimestepGroup their static scales read."""
        originals, timestep = {}, TimestepGroup()
        for layer in lowered:
            module = state.model.get_submodule(layer.fqn)
            new = QuantConv2d.from_float(module, layer) if layer.op == "conv2d" else \
                QuantLinear.from_float(module, layer, seed=state.config.seed)
            if state.plan.timestep_boundaries:
                new._timestep = timestep
            replace_module(state.model, layer.fqn, new)
            originals[layer.fqn] = module
        try:
            yield timestep
        finally:
            for fqn, module in originals.items():
                replace_module(state.model, fqn, module)

    def _probe(self, state: QuantState, lowered: list[LayerPlan], calls: list, render: bool = False,
               replayed: list | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """With the `lowered` layer plans lowered once (the rest full precision): the outputs of the recorded `calls`
        (each inside its context from `replayed`, if given: PrefixReplay.replayed) and, if `render`, the pipeline's
        samples (state.render)."""
        device = state.model.get_submodule(lowered[0].fqn).weight.device
        outputs = []
        with self._lowered(state, lowered) as timestep, torch.no_grad():
            for (args, kwargs, group, _), context in zip(calls, replayed or [nullcontext()] * len(calls)):
                timestep.index = torch.tensor([group], device=device)  # static scales: the call's timestep group
                with context:
                    outputs.append(_first_tensor(state.model(*args, **kwargs)))
            samples = state.render() if render else None
        return outputs, samples

    def _joint_damage(self, state: QuantState, units: dict, choice: dict, calls: list, reference: tuple,
                      metric_of: dict) -> float:
        """Every unit lowered at its chosen bits at once: the mean over the metrics in use of each metric's damage
        (noise power of its view of the recorded calls' outputs, averaged over calls; rendered-ssim: 1 - SSIM of
        one rendering). reference: (the recorded calls' full-precision outputs, the full-precision samples or None)."""
        outputs_fp, rendered = reference
        lowered = [_at_bits(layer, *_pair(choice[name])) for name, layers in units.items() for layer in layers]
        metrics = set(metric_of.values())
        outputs, samples = self._probe(state, lowered, calls, render="rendered-ssim" in metrics)
        per_metric = []
        for metric in metrics - {"rendered-ssim"}:
            per_metric.append(sum(_noise_power(_view(out, metric, call[3]), _view(ref, metric, call[3]))
                                  for out, ref, call in zip(outputs, outputs_fp, calls)) / len(calls))
        if samples is not None:
            per_metric.append(_ssim_damage(samples, rendered))
        return sum(per_metric) / len(per_metric)

    def _allocate(self, state: QuantState, units: dict, damage: dict, groups: list, calls: list,
                  reference: tuple, metric_of: dict) -> None:
        """Normalise each metric's damages, solve the integer program (checking jointly whether to drop the lowest
        candidate), write the bits into the plan."""
        config = state.config
        lowest = min(config.candidate_bits)
        totals: dict[str, float] = defaultdict(float)
        for name, per_group in damage.items():
            for table in per_group.values():
                totals[metric_of[name]] += table.get(lowest, max(table.values()))
        scores = {name: {g: {b: -d / (totals[metric_of[name]] or 1.0) for b, d in table.items()}
                         for g, table in per_group.items()} for name, per_group in damage.items()}
        allocated = config.act_candidate_bits != [8]
        flat = {name: per_group if groups != [None] else _with_activations(per_group[None], allocated)
                for name, per_group in scores.items()}
        sizes = {name: sum(layer.num_params for layer in units[name]) for name in units}
        budgets = dict(act_sizes={name: sum(layer.in_features for layer in units[name]) for name in units},
                       act_target_bits=config.act_target_bits) if allocated else {}
        choice = allocate_bits(sizes, flat, config.target_bits, executed_bits=config.executed_bits, **budgets)
        higher = config.candidate_bits[1:]
        if groups == [None] and higher and config.target_bits >= higher[0] - 0.02:
            try:
                without = allocate_bits(sizes, {name: {b: s for b, s in table.items() if weight_bits_of(b) in higher}
                                                for name, table in flat.items()}, config.target_bits, **budgets)
            except RecipeError:  # the budget needs the lowest width: nothing to compare
                without = choice
            candidates = {",".join(map(str, config.candidate_bits)): choice, ",".join(map(str, higher)): without}
            joint = {key: self._joint_damage(state, units, picked, calls, reference, metric_of)
                     for key, picked in candidates.items()}
            state.plan.allocation_checks = joint
            choice = candidates[min(joint, key=joint.get)]
        for name, layers in units.items():
            picked = choice[name]
            per_group = [picked[g] for g in groups] if isinstance(picked, dict) else None
            for layer in layers:
                if not per_group:
                    chosen = _at_bits(layer, *_pair(picked))
                    layer.act_bits, layer.act_scale, layer.act_zero = chosen.act_bits, chosen.act_scale, chosen.act_zero
                layer.weight_bits = max(per_group) if per_group else _pair(picked)[0]
                layer.group_weight_bits = per_group if per_group and len(set(per_group)) > 1 else None
                layer.sensitivity_metric = metric_of[name]
                layer.sensitivity = {(f"{g}:{b}" if g is not None else str(b)): d
                                     for g, table in damage[name].items() for b, d in table.items()}

    def ensures(self, state):
        if state.config.mixed_precision:
            for layer in state.plan.quantized_layers():
                assert layer.weight_bits in state.config.candidate_bits, layer.fqn
                assert layer.act_bits in state.config.act_candidate_bits, layer.fqn

"""The QuantPlan: every quantization decision, keyed by module FQN.

Passes write it, backends read it and never re-decide. It round-trips through readable JSON
(`{"_type": "QuantPlan", "_version", "_data"}`, indent 2, sorted keys) and prints as a table with `summary()`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError
from .quantizer import groupable

PLAN_VERSION = 1
FULL_PRECISION_BITS = 16  # what a kept layer counts for in average_weight_bits


@dataclass
class LayerPlan:
    """One linear / conv2d / attention node of the captured graph.

    fqn: module name; op: "linear" | "conv2d" | "sdpa"; group: self-attention, cross-attention,
    temporal-attention, mlp, conv, embedding; role: "latent" (reached from the latent input), "condition"
    (reached only from timestep / condition inputs) or "timestep" (reached only from the timestep).
    weight_bits None means full precision, and keep_reason says why. weight_granularity: "per_channel" or
    "per_group" (weight_group_size inputs per scale where `inputs_per_scale` says the layer runs so). number_format: "int" or "fp8" (e4m3 activations;
    e4m3 weights at 8 bits, integer codes held in e4m3 at 4 / 2).
    act_scale, act_zero: static per-tensor activation scale and zero point (asymmetric int8, from the calibrated
    min / max) per timestep group, or None when activations are quantized per token at run time.
    outlier_ratio: max / median of the calibrated per-channel |x| maxima (linears); balance: "smooth", "rotate",
    "smooth+rotate" or None; smooth: the smoothing factors s (x / s, W * s); smooth_folded_into: the LayerNorm whose
    weight and bias carry the 1 / s (else x / s runs as a multiply); rotation_block: Hadamard block size.
    group_weight_bits: weight bits per timestep group when they differ (weight_bits is then their maximum, the
    stored width of the nested planes). fp_tokens: leading tokens that skip activation quantization (BOS-aware);
    fp_tokens_cached: their outputs are the same for every prompt and stored. attention_format (sdpa layers): how
    the attention matmuls run quantized (config.attention), None when they run in full precision; attention_scales:
    the static fp8 scales [Q, K, V] per timestep group of the "fp8-static" format (calibrated). sensitivity: the
    probe's damage (lower is better) per candidate, keyed "bits" or "group:bits", measured by sensitivity_metric.
    """

    fqn: str
    op: str
    group: str
    role: str
    num_params: int = 0
    in_features: int = 0
    out_features: int = 0
    weight_bits: int | None = None
    weight_granularity: str | None = None
    weight_group_size: int | None = None
    number_format: str | None = None
    act_bits: int | None = None
    act_mode: str | None = None
    act_scale: list[float] | None = None
    act_zero: list[int] | None = None
    outlier_ratio: float | None = None
    balance: str | None = None
    smooth: list[float] | None = None
    smooth_folded_into: str | None = None
    rotation_block: int | None = None
    group_weight_bits: list[int] | None = None
    fp_tokens: int = 0
    fp_tokens_cached: bool = False
    attention_format: str | None = None
    attention_scales: list[list[float]] | None = None
    sensitivity: dict[str, float] | None = None
    sensitivity_metric: str | None = None
    keep_reason: str | None = None

    @property
    def quantized(self) -> bool:
        return self.weight_bits is not None

    @property
    def inputs_per_scale(self) -> int:
        """Inputs per weight scale where the weights run group-wise (a linear with per_group granularity stored as
        one 4- / 2-bit plane whose input width splits into groups: quantizer.groupable), else 0 (per channel)."""
        if (self.weight_granularity != "per_group" or self.op != "linear" or self.group_weight_bits
                or not groupable(self.in_features, self.weight_bits, self.weight_group_size)):
            return 0
        return self.weight_group_size

    def keep(self, reason: str) -> None:
        """Mark this layer full precision for `reason` (the first reason given wins)."""
        if self.keep_reason is None:
            self.keep_reason = reason
        self.weight_bits = self.weight_granularity = self.weight_group_size = self.number_format = None
        self.act_bits = self.act_mode = None
        self.act_scale = self.act_zero = None
        self.balance = self.smooth = self.smooth_folded_into = self.rotation_block = self.group_weight_bits = None
        self.fp_tokens, self.fp_tokens_cached = 0, False
        self.attention_format = self.attention_scales = None


@dataclass
class QuantPlan:
    """All decisions for one model. `layers` is keyed by module FQN, in graph execution order.

    allocation_checks (mixed precision): joint damage of each candidate allocation the sensitivity pass compared,
    keyed by its candidate bits ("2,4,8"); the plan holds the lowest.

    Timestep groups (fxquant.timestep): boundaries on the 0-1000 scale, the forward argument (name, position)
    carrying the timestep, the factor normalising it, and the groups calibration saw (unseen groups use the
    statistics of all calls).
    """

    model_class: str
    model_fingerprint: str
    recipe: str
    config: dict[str, Any]
    input_roles: dict[str, str] = field(default_factory=dict)
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    calibration_calls: int = 0
    timestep_boundaries: list[float] = field(default_factory=list)
    timestep_argument: str | None = None
    timestep_position: int | None = None
    timestep_scale: float = 1.0
    calibrated_groups: list[int] = field(default_factory=list)
    sensitivity_seconds: float | None = None
    allocation_checks: dict[str, float] = field(default_factory=dict)

    # -- queries -------------------------------------------------------------------------------------------------
    def quantized_layers(self) -> list[LayerPlan]:
        return [layer for layer in self.layers.values() if layer.quantized]

    def quantized_attention(self) -> list[LayerPlan]:
        """Attention (sdpa) layers whose matmuls run quantized (attention_format set)."""
        return [layer for layer in self.layers.values() if layer.op == "sdpa" and layer.attention_format]

    def weighted_layers(self) -> list[LayerPlan]:
        """Layers that own weights (linear / conv2d)."""
        return [layer for layer in self.layers.values() if layer.op != "sdpa"]

    @property
    def average_weight_bits(self) -> float:
        """Parameter-weighted mean weight bits over linear / conv layers; full-precision layers count 16."""
        layers = self.weighted_layers()
        total = sum(layer.num_params for layer in layers)
        if total == 0:
            return float(FULL_PRECISION_BITS)
        bits = sum(layer.num_params * (layer.weight_bits or FULL_PRECISION_BITS) for layer in layers)
        return bits / total

    @property
    def quantized_average_weight_bits(self) -> float | None:
        """Parameter-weighted mean stored weight bits over the quantized layers only (what mixed precision
        targets), or None when nothing is quantized."""
        layers = [layer for layer in self.quantized_layers() if layer.op != "sdpa"]
        total = sum(layer.num_params for layer in layers)
        return sum(layer.num_params * layer.weight_bits for layer in layers) / total if total else None

    # -- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layers"] = [dataclasses.asdict(layer) for layer in self.layers.values()]
        return {"_type": "QuantPlan", "_version": PLAN_VERSION, "_data": data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantPlan:
        if data.get("_type") != "QuantPlan":
            raise CheckpointError(f"Not a QuantPlan: _type is {data.get('_type')!r}.")
        if data.get("_version") != PLAN_VERSION:
            raise CheckpointError(
                f"QuantPlan version {data.get('_version')} is not supported by this fxquant (plan version "
                f"{PLAN_VERSION}); re-quantize the model with this release."
            )
        payload = dict(data["_data"])
        layers = [LayerPlan(**layer) for layer in payload.pop("layers")]
        return cls(**payload, layers={layer.fqn: layer for layer in layers})

    @classmethod
    def from_json(cls, text: str) -> QuantPlan:
        return cls.from_dict(json.loads(text))

    # -- display -------------------------------------------------------------------------------------------------
    def summary(self) -> str:
        """A readable table: layer, op, group, role, bits, granularity, activation mode, balancing, channel outlier
        ratio, kept and why."""
        header = ("layer", "op", "group", "role", "W", "A", "granularity", "activations", "balance", "outliers",
                  "kept in full precision: why")
        rows = [header]
        for layer in self.layers.values():
            rows.append(
                (
                    layer.fqn,
                    layer.op,
                    layer.group,
                    layer.role,
                    _bits_cell(layer),
                    layer.attention_format or str(layer.act_bits or "-"),
                    f"group {layer.inputs_per_scale}" if layer.inputs_per_scale else "per_channel" if layer.quantized
                    else "-",
                    layer.act_mode or "-",
                    (layer.balance or "-") + (f" (1/s in {layer.smooth_folded_into})" if layer.smooth_folded_into
                                              else ""),
                    "-" if layer.outlier_ratio is None else f"{layer.outlier_ratio:.1f}",
                    layer.keep_reason or "",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        quantized = self.quantized_layers()
        lines.append(
            f"{self.model_class}, recipe {self.recipe}: {len(quantized)}/{len(self.weighted_layers())} weighted "
            f"layers quantized, average weight bits {self.average_weight_bits:.2f} (quantized layers "
            f"{self.quantized_average_weight_bits or 0:.2f}), "
            f"{self.calibration_calls} calibration calls"
            + (f", {len(self.quantized_attention())} attention layers quantized" if self.quantized_attention() else "")
            + (f", timestep groups at {self.timestep_boundaries} (calibrated: {self.calibrated_groups})"
               if self.timestep_boundaries else "")
        )
        return "\n".join(lines)


def _bits_cell(layer: LayerPlan) -> str:
    """The W column: "-", "fp8", "4 (e4m3)" (integer codes run in fp8), "8", "4/8" (per timestep group), with
    "+bos1" when leading tokens stay fp."""
    if not layer.quantized:
        return "-"
    fp8 = layer.number_format == "fp8"
    bits = ("fp8" if layer.weight_bits == 8 else f"{layer.weight_bits} (e4m3)") if fp8 else (
        "/".join(map(str, layer.group_weight_bits)) if layer.group_weight_bits else str(layer.weight_bits))
    return bits + (f" +bos{layer.fp_tokens}" if layer.fp_tokens else "")

"""Quantization configs and the recipe registry.

A recipe is data: a `QuantConfig` dataclass named for what it does, validated in `__post_init__`, serialised as
`{"_type", "_version", "_data"}` and loaded back only into classes of this module (`config_from_dict`).
`get_config("w8a8")` turns a recipe name into its config; an unknown name gets an error listing the known ones.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import RecipeError

ACT_MODES = ("dynamic_per_token", "static_per_tensor")
WEIGHT_GRANULARITIES = ("per_channel", "per_group")
WEIGHT_BITS = (8, 4, 2)
MIXED_PRECISION = (None, "layer", "block-group")
CANDIDATE_BITS = (2, 4, 6, 8)
ACT_CANDIDATE_BITS = (4, 8, 16)
ATTENTION_FORMATS = (None, "int8", "int8-fp8", "fp8-static")
CONTENT_METRICS = ("proxy", "render")


@dataclass
class QuantConfig:
    """Base config; every recipe is a subclass with its own defaults.

    Args:
        weight_bits: bits of the weights of quantized layers (8 in this release).
        weight_granularity: "per_channel" (one symmetric scale per output channel) or "per_group" (4- / 2-bit
            linear weights: one scale per output channel and run of weight_group_size inputs, applied per K step in
            the packed GEMM's loop; layers whose input width does not split into such groups, 8-bit layers and
            convolutions keep per-channel scales).
        weight_group_size: inputs per weight scale with weight_granularity="per_group" (a power of two, 32 to 1024).
        act_bits: bits of the activations entering quantized layers (8).
        act_mode: "dynamic_per_token" (asymmetric int8, a scale and zero point per token computed at run time;
            convolutions use one per kernel patch) or "static_per_tensor" (one per layer from calibrated min / max;
            fp8: absmax / 448 of the calibrated range).
        static_hidden_activations: linears whose input is a GELU / SiLU of another linear's output (a
            feed-forward's second linear) take static per-tensor activations whatever act_mode says. The compile
            backend then applies the activation and the quantization in the first linear's GEMM epilogue: the
            hidden activations reach memory once, as 8-bit codes (no float write, no per-token pass).
        static_attention_outputs: linears reading an attention's output (the output projection) take static
            per-tensor activations whatever act_mode says. With fp8 and a quantized attention (`attention=...`) the
            compile backend then has the attention kernel write the projection's codes: no float write, no
            per-token pass.
        static_conv_activations: convolutions take static per-tensor activations whatever act_mode says. fxquant's
            implicit-GEMM conv kernel then reads channels-last codes quantized once (under the compile backend
            in the pass producing the input) instead of quantizing the float input per patch, tap by tap. With fp8
            the convolutions run in float8 e4m3 too (per-channel weights, activations absmax / 448): on Hopper
            the fp8 kernel outran cuDNN bf16 where the int8 one did not.
        keep_condition_layers: keep condition-only layers outside attention (timestep MLP, adaLN modulation,
            caption / context projection) in full precision.
        keep_io_layers: keep the first and the last latent-path layer (patch embedding, output projection) in
            full precision.
        keep_full_precision: extra layers to keep, pattern -> reason. A pattern is an exact module FQN or
            "re:<regex>" (searched); exact names win over regexes, the first matching regex wins.
        smooth_alpha: static smoothing strength (SmoothQuant's alpha) for balanced linears; None = no smoothing.
        rotate: rotate balanced linears' inputs with a block Hadamard matrix after smoothing (ViDiT-Q).
        balance_threshold: balance only linears whose calibrated channel outlier ratio (max / median of the
            per-channel |x| maxima) is at least this; 0 balances every quantized linear.
        seed: seed of the rotation signs (stored with the model, never redrawn).
        timestep_groups: boundaries on the normalised 0-1000 timestep scale; static activation scales are then
            calibrated per timestep group and chosen on the device from each call's timestep (fxquant.timestep).
        fp8: use float8 e4m3 instead of int8 for the weights and activations of quantized linears (symmetric,
            per-channel / per-token or static absmax / 448; Hopper's fast 8-bit path). Convolutions stay int8
            unless static_conv_activations is set. With weight_bits 4 / 2 the linears' weights stay integer codes
            (packed, per-channel scales), which float8 e4m3 holds exactly: they are unpacked into e4m3 for the fp8
            GEMM (convolutions then stay int8). With mixed_precision every linear runs fp8 activations against the
            bits chosen: e4m3 weights at 8, integer codes at 4 / 2 (convolutions int8).
        bos_aware: find leading text tokens whose magnitude alone stretches the range of the cross-attention
            key / value inputs (MixDQ's BOS token: |x| at least bos_ratio times every later token's) from
            calibration; they skip activation quantization (full-precision activations, cached outputs when the
            tokens are the same in every calibration call) and the static range is calibrated without them.
        mixed_precision: choose weight bits from sensitivity probing and integer programming (passes/sensitivity):
            "layer" (MixDQ: one choice per linear), "block-group" (ViDiT-Q: one per block x layer group) or None.
        share_bits_across_blocks: with mixed_precision, the layers at one position in the members of a list of
            repeated blocks (a DiT's transformer blocks; a UNet level's resnets or attention blocks:
            fxquant.model.repeated_blocks) form one unit and take the same bits, so that the blocks stay identical
            and regional or nested compilation compiles each list once (otherwise every block that differs in its
            bits is compiled anew).
        candidate_bits: the weight bit-widths the allocation chooses from (2, 4, 6, 8; 6-bit weights are stored
            as a 4-bit and a 2-bit plane).
        target_bits: parameter-weighted average weight bits of the quantized linears (± 0.02).
        bits_per_timestep_group: let the allocation give a layer other bits in each timestep group (one nested
            weight copy, the group's planes chosen on the device); needs timestep_groups.
        executed_bits: with bits_per_timestep_group, an upper bound on the parameter-weighted average of the widths
            run (over timestep groups): the weight traffic. Under the memory budget alone every group runs the stored
            width; this budget is what makes the groups differ.
        act_candidate_bits: activation bit-widths the "layer" allocation chooses from for linears (MixDQ): 8, 4
            (static activations on a 4-bit grid, run by the int8 kernels) and 16 (no activation quantization: the
            layer runs its dequantized weights in the model's dtype). [8] = every layer A8.
        act_target_bits: with several act_candidate_bits, the in_features-weighted average activation bits of the
            quantized linears must not exceed this (activation bytes per token).
        attention: quantize the attention matmuls (SageAttention-style, fxquant.attention): "int8" = Q K^T on int8
            per-token Q and K (K minus its mean over tokens), P V in the model's dtype; "int8-fp8" = the same with
            P and V in float8 e4m3 (V scaled per channel); "fp8-static" = Q, K, V in float8 e4m3 with one calibrated
            scale each (absmax / 448 per timestep group), Q K^T and P V in fp8: their quantization needs no
            reduction, so it fuses into whatever produces Q, K and V. None keeps attention in full precision.
            Calls with a mask, dropout, causal masking, grouped heads or heads narrower than 16 keep the model's own
            attention.
        content_metric: how mixed precision scores content layers (cross-attention; MixDQ also feed-forward):
            "proxy" = the guidance direction of the denoiser output on the recorded calls; "render" = SSIM of samples
            the pipeline generates with the unit quantized against full precision (MixDQ's metric; needs
            fxquant.quantize_pipeline, which provides the sampler; one generation of render_prompts prompts per
            probe; not with timestep_groups).
        render_prompts: calibration prompts (the first ones) generated per rendered probe.
        sensitivity_calls: recorded calibration calls (the full-precision trajectory) the probes replay.
        sensitivity_rows: samples of each recorded call the probes replay (a guidance batch keeps both halves).
        sensitivity_replay: probes of a unit replay the full-precision output of the block before it instead of
            rerunning the blocks before (checked per block against the full-precision output; t2i-dit: 2.65x faster).
            False reruns the whole model per probe.
        sensitivity_cache: a JSON file each probe's damage is written to as soon as it is measured; a run that
            crashed or was stopped resumes from it, and a rerun that changes only target_bits / executed_bits /
            act_target_bits probes no unit again. A file made for another model, calibration or recipe is refused.
    """

    weight_bits: int = 8
    weight_granularity: str = "per_channel"
    weight_group_size: int = 128
    act_bits: int = 8
    act_mode: str = "dynamic_per_token"
    static_hidden_activations: bool = False
    static_attention_outputs: bool = False
    static_conv_activations: bool = False
    keep_condition_layers: bool = True
    keep_io_layers: bool = True
    keep_full_precision: dict[str, str] = field(default_factory=dict)
    smooth_alpha: float | None = None
    rotate: bool = False
    balance_threshold: float = 0.0
    seed: int = 0
    timestep_groups: list[float] = field(default_factory=list)
    fp8: bool = False
    bos_aware: bool = False
    bos_ratio: float = 2.0
    mixed_precision: str | None = None
    share_bits_across_blocks: bool = False
    candidate_bits: list[int] = field(default_factory=lambda: [4, 8])
    target_bits: float = 8.0
    bits_per_timestep_group: bool = False
    executed_bits: float | None = None
    act_candidate_bits: list[int] = field(default_factory=lambda: [8])
    act_target_bits: float | None = None
    attention: str | None = None
    content_metric: str = "proxy"
    render_prompts: int = 4
    sensitivity_calls: int = 20
    sensitivity_rows: int = 4
    sensitivity_replay: bool = True
    sensitivity_cache: str | None = None
    version: int = 1

    recipe_name: ClassVar[str] = "custom"

    def __post_init__(self):
        for switch in (f.name for f in dataclasses.fields(self) if f.type == "bool"):
            if not isinstance(getattr(self, switch), bool):
                raise RecipeError(f"{switch}={getattr(self, switch)!r} must be true or false.")
        if self.weight_bits not in WEIGHT_BITS:
            raise RecipeError(f"weight_bits={self.weight_bits} is not supported; use one of {WEIGHT_BITS}.")
        if self.act_bits != 8:
            raise RecipeError(f"act_bits={self.act_bits} is not supported yet; use act_bits=8.")
        if self.act_mode not in ACT_MODES:
            raise RecipeError(f"act_mode={self.act_mode!r} is unknown; use one of {ACT_MODES}.")
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            raise RecipeError(
                f"weight_granularity={self.weight_granularity!r} is unknown; use one of {WEIGHT_GRANULARITIES}."
            )
        if self.weight_granularity == "per_group":
            size = self.weight_group_size
            if not (isinstance(size, int) and 32 <= size <= 1024 and size & (size - 1) == 0):
                raise RecipeError(f"weight_group_size={size!r} must be a power of two from 32 to 1024.")
            if self.weight_bits == 8 and not self.mixed_precision:
                raise RecipeError("weight_granularity='per_group' applies to 4- / 2-bit weights; use weight_bits=4 or "
                                  "2, or a mixed_precision setting.")
            if self.bits_per_timestep_group:
                raise RecipeError("weight_granularity='per_group' takes one weight plane per layer; nested planes "
                                  "(bits_per_timestep_group) keep per-channel scales.")
        if self.balances and (self.act_mode != "dynamic_per_token" or self.static_hidden_activations
                              or self.static_attention_outputs):
            raise RecipeError("Channel balancing (smooth_alpha / rotate) needs act_mode='dynamic_per_token' and "
                              "static_hidden_activations=False, static_attention_outputs=False.")
        self.timestep_groups = [float(b) for b in self.timestep_groups]
        static = self.act_mode == "static_per_tensor" or self.static_hidden_activations or (
            self.static_attention_outputs or self.static_conv_activations)
        if self.timestep_groups and not static and not self.bits_per_timestep_group:
            raise RecipeError("timestep_groups select static activation scales or per-group weight bits; use "
                              "act_mode='static_per_tensor', static_hidden_activations=True, "
                              "static_attention_outputs=True, static_conv_activations=True or "
                              "bits_per_timestep_group=True (per-token activations need no per-group scales).")
        if self.mixed_precision not in MIXED_PRECISION:
            raise RecipeError(f"mixed_precision={self.mixed_precision!r} is unknown; use one of {MIXED_PRECISION}.")
        self.candidate_bits = sorted(set(int(b) for b in self.candidate_bits))
        if not self.candidate_bits or any(b not in CANDIDATE_BITS for b in self.candidate_bits):
            raise RecipeError(f"candidate_bits={self.candidate_bits} must be a non-empty subset of {CANDIDATE_BITS}.")
        if self.mixed_precision and not (min(self.candidate_bits) <= self.target_bits <= max(self.candidate_bits)):
            raise RecipeError(f"target_bits={self.target_bits} lies outside candidate_bits {self.candidate_bits}.")
        if self.share_bits_across_blocks and not self.mixed_precision:
            raise RecipeError("share_bits_across_blocks needs a mixed_precision setting.")
        if self.bits_per_timestep_group and (not self.timestep_groups or not self.mixed_precision):
            raise RecipeError("bits_per_timestep_group needs timestep_groups and a mixed_precision setting.")
        if self.executed_bits is not None and not (self.bits_per_timestep_group and
                                                   min(self.candidate_bits) <= self.executed_bits <= self.target_bits):
            raise RecipeError(f"executed_bits={self.executed_bits} needs bits_per_timestep_group and must lie between "
                              f"the smallest candidate ({min(self.candidate_bits)}) and target_bits "
                              f"({self.target_bits}).")
        if self.bits_per_timestep_group and 2 in self.candidate_bits:
            raise RecipeError("2-bit weights cannot vary per timestep group; use candidate_bits from 4, 6, 8.")
        self.act_candidate_bits = sorted(set(int(b) for b in self.act_candidate_bits))
        if not self.act_candidate_bits or any(b not in ACT_CANDIDATE_BITS for b in self.act_candidate_bits):
            raise RecipeError(f"act_candidate_bits={self.act_candidate_bits} must be a non-empty subset of "
                              f"{ACT_CANDIDATE_BITS}.")
        if self.act_candidate_bits != [8]:
            if self.mixed_precision != "layer" or self.bits_per_timestep_group or 8 not in self.candidate_bits:
                raise RecipeError("act_candidate_bits other than [8] need mixed_precision='layer' without "
                                  "bits_per_timestep_group, and 8 among candidate_bits (the W8A8 probe is shared).")
            if 4 in self.act_candidate_bits and self.act_mode != "static_per_tensor":
                raise RecipeError("4-bit activations are static per tensor; use act_mode='static_per_tensor' or "
                                  "act_candidate_bits from 8, 16.")
            if self.act_target_bits is None or not (min(self.act_candidate_bits) <= self.act_target_bits
                                                     <= max(self.act_candidate_bits)):
                raise RecipeError(f"act_target_bits={self.act_target_bits} must lie within act_candidate_bits "
                                  f"{self.act_candidate_bits}.")
        if self.attention not in ATTENTION_FORMATS:
            raise RecipeError(f"attention={self.attention!r} is unknown; use one of {ATTENTION_FORMATS}.")
        if self.content_metric not in CONTENT_METRICS:
            raise RecipeError(f"content_metric={self.content_metric!r} is unknown; use one of {CONTENT_METRICS}.")
        if self.content_metric == "render" and (not self.mixed_precision or self.timestep_groups
                                                or self.render_prompts < 1):
            raise RecipeError("content_metric='render' scores whole generations: it needs a mixed_precision setting, "
                              "no timestep_groups (a probe's generation spans them all), and render_prompts >= 1.")
        if self.mixed_precision and self.fp8 and (self.bits_per_timestep_group or 6 in self.candidate_bits
                                                  or self.act_candidate_bits != [8]):
            raise RecipeError("mixed_precision with fp8 chooses per layer among 2 / 4 / 8 weight bits with 8-bit "
                              "activations (e4m3 holds one plane's codes, not nested planes): use "
                              "bits_per_timestep_group=false, candidate_bits from 2, 4, 8 and act_candidate_bits=[8].")
        if self.sensitivity_calls < 1 or self.sensitivity_rows < 2:
            raise RecipeError(f"sensitivity_calls={self.sensitivity_calls} must be at least 1 and "
                              f"sensitivity_rows={self.sensitivity_rows} at least 2 (a guidance batch keeps both "
                              "halves).")
        if self.bos_ratio <= 1:
            raise RecipeError(f"bos_ratio={self.bos_ratio} must be above 1.")
        if any(not 0 < b < 1000 for b in self.timestep_groups) or self.timestep_groups != sorted(
                set(self.timestep_groups)):
            raise RecipeError(f"timestep_groups={self.timestep_groups} must be increasing boundaries inside (0, 1000).")
        if self.smooth_alpha is not None and not 0 <= self.smooth_alpha <= 1:
            raise RecipeError(f"smooth_alpha={self.smooth_alpha} must lie in [0, 1].")
        for pattern in self.keep_full_precision:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    raise RecipeError(f"keep_full_precision pattern {pattern!r} is not a valid regex: {err}") from err

    label: ClassVar[str | None] = None  # the recipe string with overrides that made this config, if any

    @property
    def name(self) -> str:
        """The recipe name, with its overrides when get_config parsed any (e.g. "mixdq-w4a8-mp:target_bits=5")."""
        return self.label or self.recipe_name

    @property
    def balances(self) -> bool:
        """True when this config applies channel balancing (smoothing and / or rotation)."""
        return self.smooth_alpha is not None or self.rotate

    def keep_reason(self, fqn: str) -> str | None:
        """The user's reason to keep `fqn` in full precision, or None. Exact names first, then regexes in order."""
        if fqn in self.keep_full_precision:
            return self.keep_full_precision[fqn]
        for pattern, reason in self.keep_full_precision.items():
            if pattern.startswith("re:") and re.search(pattern[3:], fqn):
                return reason
        return None


@dataclass
class W8A8DynamicConfig(QuantConfig):
    """Int8 symmetric per-channel weights, int8 asymmetric dynamic per-token activations (ViDiT-Q's base quantizer)."""

    recipe_name: ClassVar[str] = "w8a8"


@dataclass
class W8A8StaticConfig(QuantConfig):
    """Int8 per-channel weights, int8 static per-tensor activations from calibration (the naive baseline)."""

    act_mode: str = "static_per_tensor"
    recipe_name: ClassVar[str] = "w8a8-static"


@dataclass
class SmoothQuantW8A8Config(QuantConfig):
    """W8A8 per-token with SmoothQuant's static smoothing (alpha 0.5) on every quantized linear."""

    smooth_alpha: float | None = 0.5
    recipe_name: ClassVar[str] = "smoothquant-w8a8"


@dataclass
class ViditqW8A8Config(QuantConfig):
    """W8A8 per-token with ViDiT-Q's static-dynamic channel balancing (smoothing + Hadamard rotation) on linears
    whose channel outlier ratio is at least balance_threshold."""

    smooth_alpha: float | None = 0.5
    rotate: bool = True
    balance_threshold: float = 4.0
    recipe_name: ClassVar[str] = "viditq-w8a8"


@dataclass
class W4A8DynamicConfig(QuantConfig):
    """Int4 per-channel weights (packed two per byte), int8 per-token activations, no balancing (the baseline
    that ViDiT-Q's W4A8 improves on)."""

    weight_bits: int = 4
    recipe_name: ClassVar[str] = "w4a8"


@dataclass
class ViditqW4A8Config(ViditqW8A8Config):
    """Int4 per-channel weights with ViDiT-Q's channel balancing, int8 per-token activations."""

    weight_bits: int = 4
    recipe_name: ClassVar[str] = "viditq-w4a8"


@dataclass
class W8A8Fp8Config(QuantConfig):
    """Float8 e4m3 per-channel weights and per-token activations on linears (convolutions int8)."""

    fp8: bool = True
    recipe_name: ClassVar[str] = "w8a8-fp8"


@dataclass
class W4A8Fp8Config(QuantConfig):
    """Int4 per-channel weight codes (packed two per byte, unpacked into float8 e4m3, which holds them exactly)
    against float8 e4m3 per-token activations on linears: W4A8's weight memory at the fp8 path's speed."""

    weight_bits: int = 4
    fp8: bool = True
    recipe_name: ClassVar[str] = "w4a8-fp8"


@dataclass
class ViditqW4A8MPConfig(ViditqW8A8Config):
    """ViDiT-Q-MP: channel balancing, per-token activations, weight bits 4 / 6 / 8 chosen per block x layer group
    and per timestep group (two groups, split at t = 500) by metric-decoupled sensitivity and integer programming,
    at most 5 average weight bits."""

    timestep_groups: list[float] = field(default_factory=lambda: [500.0])
    mixed_precision: str | None = "block-group"
    candidate_bits: list[int] = field(default_factory=lambda: [4, 6, 8])
    target_bits: float = 4.98
    bits_per_timestep_group: bool = True
    recipe_name: ClassVar[str] = "viditq-w4a8-mp"


@dataclass
class MixdqW8A8Config(QuantConfig):
    """MixDQ's W8A8: int8 per-channel weights, static per-tensor activations, BOS-aware text key / value
    projections."""

    act_mode: str = "static_per_tensor"
    bos_aware: bool = True
    recipe_name: ClassVar[str] = "mixdq-w8a8"


@dataclass
class MixdqW4A8MPConfig(MixdqW8A8Config):
    """MixDQ's mixed precision: weight bits 2 / 4 / 8 per linear from metric-decoupled sensitivity and integer
    programming at target_bits average (4.0 by default), 8-bit static activations, BOS-aware."""

    mixed_precision: str | None = "layer"
    candidate_bits: list[int] = field(default_factory=lambda: [2, 4, 8])
    target_bits: float = 4.0
    recipe_name: ClassVar[str] = "mixdq-w4a8-mp"


_ALL_CONFIGS = (QuantConfig, W8A8DynamicConfig, W8A8StaticConfig, SmoothQuantW8A8Config, ViditqW8A8Config,
                W4A8DynamicConfig, ViditqW4A8Config, W8A8Fp8Config, W4A8Fp8Config, ViditqW4A8MPConfig,
                MixdqW8A8Config, MixdqW4A8MPConfig)
_CONFIG_CLASSES: dict[str, type[QuantConfig]] = {cls.__name__: cls for cls in _ALL_CONFIGS}
RECIPES: dict[str, type[QuantConfig]] = {cls.recipe_name: cls for cls in _ALL_CONFIGS[1:]}


def get_config(recipe: str | QuantConfig) -> QuantConfig:
    """A recipe name, optionally with overrides ("mixdq-w4a8-mp:target_bits=5.0,bos_aware=false"), or a config ->
    the config. Raises RecipeError naming the known recipes, or the fields when an override is unknown."""
    if isinstance(recipe, QuantConfig):
        return recipe
    name, _, overrides = recipe.partition(":") if isinstance(recipe, str) else (recipe, "", "")
    if name not in RECIPES:
        raise RecipeError(
            f"Unknown recipe {recipe!r}. Known recipes: {', '.join(sorted(RECIPES))}; "
            "or pass a fxquant.QuantConfig."
        )
    config = RECIPES[name]()
    if not overrides:
        return config
    fields = {f.name for f in dataclasses.fields(config)}
    values = {}
    for item in re.split(r",(?![^\[]*\])", overrides):  # commas inside [...] belong to a list value
        key, _, text = item.partition("=")
        if key.strip() not in fields:
            raise RecipeError(f"Recipe override {key.strip()!r} is not a config field; fields: {sorted(fields)}.")
        try:
            values[key.strip()] = json.loads(text.strip().lower() if text.strip().lower() in ("true", "false",
                                                                                               "null") else text)
        except json.JSONDecodeError:
            values[key.strip()] = text.strip()
    config = dataclasses.replace(config, **values)
    config.label = recipe
    return config


def config_to_dict(config: QuantConfig) -> dict[str, Any]:
    return {"_type": type(config).__name__, "_version": config.version, "_data": dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any]) -> QuantConfig:
    """Inverse of config_to_dict; only fxquant config classes are accepted."""
    type_name = data.get("_type")
    if type_name not in _CONFIG_CLASSES:
        raise RecipeError(f"Config type {type_name!r} is not an fxquant config; allowed: {sorted(_CONFIG_CLASSES)}.")
    return _CONFIG_CLASSES[type_name](**data["_data"])

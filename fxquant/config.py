"""Quantization configs and the recipe registry.

A recipe is data: a `QuantConfig` dataclass named for what it does, validated in `__post_init__`, serialised as
`{"_type", "_version", "_data"}` and loaded back only into classes of this module (`config_from_dict`).
`get_config("w8a8")` turns a recipe name into its config; an unknown name gets an error listing the known ones.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import RecipeError

ACT_MODES = ("dynamic_per_token", "static_per_tensor")
WEIGHT_GRANULARITIES = ("per_channel",)


@dataclass
class QuantConfig:
    """Base config; every recipe is a subclass with its own defaults.

    Args:
        weight_bits: bits of the weights of quantized layers (8 in this release).
        weight_granularity: "per_channel" (one symmetric scale per output channel).
        act_bits: bits of the activations entering quantized layers (8).
        act_mode: "dynamic_per_token" (asymmetric int8, a scale and zero point per token computed at run time;
            convolutions use one per kernel patch) or "static_per_tensor" (one per layer from calibrated min / max).
        keep_condition_layers: keep condition-only layers outside attention (timestep MLP, adaLN modulation,
            caption / context projection) in full precision.
        keep_io_layers: keep the first and the last latent-path layer (patch embedding, output projection) in
            full precision.
        keep_full_precision: extra layers to keep, pattern -> reason. A pattern is an exact module FQN or
            "re:<regex>" (searched); exact names win over regexes, the first matching regex wins.
    """

    weight_bits: int = 8
    weight_granularity: str = "per_channel"
    act_bits: int = 8
    act_mode: str = "dynamic_per_token"
    keep_condition_layers: bool = True
    keep_io_layers: bool = True
    keep_full_precision: dict[str, str] = field(default_factory=dict)
    version: int = 1

    recipe_name: ClassVar[str] = "custom"

    def __post_init__(self):
        if self.weight_bits != 8:
            raise RecipeError(f"weight_bits={self.weight_bits} is not supported yet; use weight_bits=8.")
        if self.act_bits != 8:
            raise RecipeError(f"act_bits={self.act_bits} is not supported yet; use act_bits=8.")
        if self.act_mode not in ACT_MODES:
            raise RecipeError(f"act_mode={self.act_mode!r} is unknown; use one of {ACT_MODES}.")
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            raise RecipeError(
                f"weight_granularity={self.weight_granularity!r} is unknown; use one of {WEIGHT_GRANULARITIES}."
            )
        for pattern in self.keep_full_precision:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    raise RecipeError(f"keep_full_precision pattern {pattern!r} is not a valid regex: {err}") from err

    @property
    def name(self) -> str:
        return self.recipe_name

    @property
    def needs_static_scales(self) -> bool:
        return self.act_mode == "static_per_tensor"

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


_CONFIG_CLASSES: dict[str, type[QuantConfig]] = {
    cls.__name__: cls for cls in (QuantConfig, W8A8DynamicConfig, W8A8StaticConfig)
}
RECIPES: dict[str, type[QuantConfig]] = {cls.recipe_name: cls for cls in (W8A8DynamicConfig, W8A8StaticConfig)}


def get_config(recipe: str | QuantConfig) -> QuantConfig:
    """A recipe name or a config -> the config. Raises RecipeError naming the known recipes."""
    if isinstance(recipe, QuantConfig):
        return recipe
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise RecipeError(
            f"Unknown recipe {recipe!r}. Known recipes: {', '.join(sorted(RECIPES))}; "
            "or pass a fxquant.QuantConfig."
        )
    return RECIPES[recipe]()


def config_to_dict(config: QuantConfig) -> dict[str, Any]:
    return {"_type": type(config).__name__, "_version": config.version, "_data": dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any]) -> QuantConfig:
    """Inverse of config_to_dict; only fxquant config classes are accepted."""
    type_name = data.get("_type")
    if type_name not in _CONFIG_CLASSES:
        raise RecipeError(f"Config type {type_name!r} is not an fxquant config; allowed: {sorted(_CONFIG_CLASSES)}.")
    return _CONFIG_CLASSES[type_name](**data["_data"])

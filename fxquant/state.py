"""QuantState: what the passes read and write between `prepare` and `convert`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .capture import CapturedGraph
from .config import QuantConfig
from .attention import AttentionObserver
from .observers import ActivationObserver
from .plan import QuantPlan


@dataclass
class QuantState:
    """The model being quantized (modified in place by `lower`), its captured graph, the config and the plan.

    observers: module FQN -> its calibration statistics; attention_observers: attention module FQN -> its Q / K / V
    maxima (static-format attention); hooks: the handles that attach them to the model.
    passes_run: names of the passes already applied, in order; timestep_group: the timestep group of the
    calibration call in progress; recorded_calls: (args, kwargs, timestep group) of the first calibration calls,
    kept for sensitivity probing when the config is mixed precision. render: generates a fixed small batch of
    samples with the model as it is at the time of the call (set by quantize_pipeline; the rendered content metric
    uses it); rendering: True while it runs, so the prepared model passes calls through without recording them.
    """

    model: torch.nn.Module
    config: QuantConfig
    captured: CapturedGraph | None = None
    plan: QuantPlan | None = None
    observers: dict[str, ActivationObserver] = field(default_factory=dict)
    attention_observers: dict[str, AttentionObserver] = field(default_factory=dict)
    hooks: list = field(default_factory=list)
    passes_run: list[str] = field(default_factory=list)
    timestep_group: int = 0
    recorded_calls: list = field(default_factory=list)
    render: Callable[[], torch.Tensor] | None = None
    rendering: bool = False

    @property
    def graph(self) -> torch.fx.Graph:
        return self.captured.graph

"""The pass interface: `requires` (preconditions), `call` (the work), `ensures` (postconditions)."""

from __future__ import annotations

from dataclasses import dataclass

from fxquant.state import QuantState


@dataclass
class PassResult:
    """What a pass did: `modified` is True when it changed the graph, the plan or the model."""

    modified: bool


class QuantPass:
    """One pass, one job. Subclasses set `name`, implement `call`, and may check `requires` / `ensures`."""

    name: str = "pass"

    def requires(self, state: QuantState) -> None:
        """Raise AssertionError if the state is not ready for this pass."""

    def call(self, state: QuantState) -> PassResult:
        raise NotImplementedError

    def ensures(self, state: QuantState) -> None:
        """Raise AssertionError if the pass left the state inconsistent."""

    def __call__(self, state: QuantState) -> PassResult:
        self.requires(state)
        result = self.call(state)
        self.ensures(state)
        return result

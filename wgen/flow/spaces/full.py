"""The ``full`` weight space: a member's whole normalised raw vector."""

from __future__ import annotations

from typing import Any

import torch

from .base import FitContext, Layout, Normalization, StateDict, WeightSpace, load_layout, saved_layout


class FullSpace(WeightSpace):
    """Every modelled value, centred on the zoo mean and scaled per tensor."""

    def __init__(self, layout: Layout, norm: Normalization) -> None:
        super().__init__(layout)
        self.norm = norm

    @classmethod
    def fit(cls, states: list[StateDict], options: Any, context: FitContext) -> FullSpace:
        layout = Layout.from_state(states[0])
        norm, _ = Normalization.fit(layout.stack(states).to(context.device), layout)
        return cls(layout, norm)

    @classmethod
    def load(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> FullSpace:
        return cls(load_layout(config, tensors), Normalization(tensors["mean"], tensors["scale"]))

    def saved(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return saved_layout(self.kind, self.layout, self.norm, {"dim": self.layout.dim})

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.layout.dim,)

    def encode(self, states: list[StateDict]) -> torch.Tensor:
        return self.norm.apply(self.layout.stack(states))

    def vectors(self, coords: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm.invert_(coords.clone() if out is None else out.copy_(coords))


"""The ``none`` velocity net: zero velocity, so a sample's end point is its noise (for ``drawn`` spaces)."""

from __future__ import annotations

from typing import Any

import torch

from ...errors import WgenError
from ..spaces.base import WeightSpace
from .base import VelocityNet


class NoFlow(VelocityNet):
    """No parameters and no flow: the net of a space whose noise already is a sample (``space.drawn``)."""

    def __init__(self, space: WeightSpace, options: Any) -> None:
        if not space.drawn:
            raise WgenError(f"--net none leaves every sample at its noise, and the {space.kind} space needs a flow",
                            "use --net mlp (or graph), or a space whose samples are drawn (subspace)")
        super().__init__(options)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

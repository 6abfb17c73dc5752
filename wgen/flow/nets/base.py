"""What every velocity net shares: the interface and the time embedding."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, ClassVar

import torch
from torch import nn

from ...registry import NoOptions


class VelocityNet(nn.Module):
    """v(x, t): velocities ``[B, *space.shape]`` at points ``x`` of that shape and times ``t``.

    ``t`` is ``[B]``, or ``[1]`` for one time shared by the batch (the ODE solver's case: the time
    embedding is then computed once). Subclasses register in ``flow/nets/__init__.py`` and take
    ``(space, options)``.
    """

    kind: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any) -> None:
        super().__init__()
        self.options = options

    def config(self) -> dict[str, Any]:
        """Return the net's JSON config: its kind and settings."""
        return {"kind": self.kind, **asdict(self.options)}

    def parameter_count(self) -> int:
        """Return the number of parameters."""
        return sum(p.numel() for p in self.parameters())


class SinusoidalTime(nn.Module):
    """Fixed sinusoidal embedding of t in [0, 1] (frequencies as in transformer positions)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = 1000.0 * t[:, None].float() * self.freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

"""The ``mlp`` velocity net: residual MLP blocks on the flat coordinates, conditioned on time."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...limits import check_all
from ..spaces.base import WeightSpace
from .base import SinusoidalTime, VelocityNet


@dataclass(frozen=True)
class MLPOptions:
    """Size of the velocity MLP: hidden width, residual blocks, time-embedding width, dropout."""

    width: int = 512
    depth: int = 3
    time_dim: int = 128
    dropout: float = 0.0

    def check(self) -> None:
        """Raise a WgenError for a size out of its range."""
        check_all({"--width": self.width, "--depth": self.depth, "--time-dim": self.time_dim, "--dropout": self.dropout})


class ResidualBlock(nn.Module):
    """LayerNorm -> Linear -> SiLU -> Linear, with a time-conditioned scale and shift."""

    def __init__(self, width: int, cond_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.film = nn.Linear(cond_dim, 2 * width)
        self.fc1 = nn.Linear(width, width * 2)
        self.fc2 = nn.Linear(width * 2, width)
        self.drop = nn.Dropout(dropout)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(cond).chunk(2, dim=1)
        x = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(self.drop(self.act(self.fc1(x))))


class VelocityMLP(VelocityNet):
    """An MLP on the flattened coordinates: sinusoidal time embedding, residual blocks, zero-initialised output."""

    Options = MLPOptions

    def __init__(self, space: WeightSpace, options: MLPOptions) -> None:
        super().__init__(options)
        dim, width = space.numel, options.width
        self.time = nn.Sequential(SinusoidalTime(options.time_dim), nn.Linear(options.time_dim, width),
                                  nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, width, options.dropout) for _ in range(options.depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)  # v = 0 at start: training begins from the identity flow
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = self.time(t)
        h = self.inp(x.flatten(1)) + cond
        for block in self.blocks:
            h = block(h, cond)
        return self.out(self.out_norm(h)).view_as(x)

"""Velocity networks v(x, t) for flow matching in weight space."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class NetConfig:
    """Size of the velocity MLP: hidden width, residual blocks, time-embedding width, dropout."""

    width: int = 512
    depth: int = 3
    time_dim: int = 128
    dropout: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """Return the config as JSON."""
        return asdict(self)


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


class VelocityMLP(nn.Module):
    """An MLP v(x, t) with sinusoidal time embedding, residual blocks and a zero-initialised output."""

    def __init__(self, dim: int, config: NetConfig) -> None:
        super().__init__()
        self.time = nn.Sequential(SinusoidalTime(config.time_dim), nn.Linear(config.time_dim, config.width),
                                  nn.SiLU(), nn.Linear(config.width, config.width))
        self.inp = nn.Linear(dim, config.width)
        self.blocks = nn.ModuleList(ResidualBlock(config.width, config.width, config.dropout)
                                    for _ in range(config.depth))
        self.out_norm = nn.LayerNorm(config.width)
        self.out = nn.Linear(config.width, dim)
        nn.init.zeros_(self.out.weight)  # v = 0 at start: training begins from the identity flow
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Return the velocity ``[B, dim]`` at points ``x`` ``[B, dim]`` and times ``t`` (``[B]``, or ``[1]`` for all)."""
        cond = self.time(t)
        h = self.inp(x) + cond
        for block in self.blocks:
            h = block(h, cond)
        return self.out(self.out_norm(h))


def parameter_count(module: nn.Module) -> int:
    """Return the number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())

"""Baselines a generator must beat, built from the zoo's training members with the samples' count.

- ``noise S``: a random training member plus Gaussian noise, per tensor, at ``S`` times the tensor's RMS;
- ``interpolation``: a random point on the straight line between two random aligned members;
- ``soup of k``: the uniform average of ``k`` random aligned members.

Averaged weights come with averaged BatchNorm statistics, which fit neither parent: interpolations
and soups get theirs re-estimated on the train split, as the canonicalize barrier does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .checkpoints import ModelSpec
from .data import SplitData
from .metrics import recalibrated

StateDict = dict[str, torch.Tensor]


def noisy(train: list[StateDict], count: int, scale: float, keys: list[str], generator: torch.Generator) -> list[StateDict]:
    """Return ``count`` random training members with noise of ``scale`` x each tensor's RMS on tensors ``keys``."""
    out = []
    for _ in range(count):
        base = train[int(torch.randint(len(train), (1,), generator=generator))]
        state = dict(base)
        for key in keys:
            value = base[key]
            rms = value.pow(2).mean().sqrt()
            state[key] = value + scale * rms * torch.randn(value.shape, generator=generator)
        out.append(state)
    return out


def interpolations(train: list[StateDict], count: int, generator: torch.Generator) -> list[StateDict]:
    """Return ``count`` points drawn uniformly on the lines between random pairs of training members."""
    out = []
    for _ in range(count):
        i, j = torch.randperm(len(train), generator=generator)[:2].tolist()
        t = float(torch.rand(1, generator=generator))
        out.append({k: ((1 - t) * v + t * train[j][k]) if v.is_floating_point() else v for k, v in train[i].items()})
    return out


def soups(train: list[StateDict], count: int, k: int, generator: torch.Generator) -> list[StateDict]:
    """Return ``count`` uniform averages of ``k`` random training members."""
    out = []
    for _ in range(count):
        chosen = [train[i] for i in torch.randperm(len(train), generator=generator)[:k].tolist()]
        out.append({key: (sum(s[key] for s in chosen) / k) if value.is_floating_point() else value
                    for key, value in chosen[0].items()})
    return out


def baseline_builders(train: list[StateDict], count: int, noise_scales: tuple[float, ...], soup_k: int,
                      keys: list[str], spec: ModelSpec, data: SplitData, device: torch.device,
                      generator: torch.Generator) -> Iterator[tuple[str, Callable[[], list[StateDict]]]]:
    """Yield ``(name, build)`` for every baseline; ``build()`` returns its ``count`` state dicts (built lazily)."""
    for scale in noise_scales:
        yield f"noise {scale:g}", lambda scale=scale: noisy(train, count, scale, keys, generator)
    yield "interpolation", lambda: recalibrated(spec, interpolations(train, count, generator), data, device)
    k = min(soup_k, len(train))
    yield f"soup of {k}", lambda: recalibrated(spec, soups(train, count, k, generator), data, device)

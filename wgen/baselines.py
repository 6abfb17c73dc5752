"""Baselines a generator must beat, built from the zoo's training members with the samples' count.

- ``noise S``: a random training member plus Gaussian noise, per tensor, at ``S`` times the tensor's RMS;
- ``interpolation``: a random point on the straight line between two random aligned members;
- ``soup of k``: the uniform average of ``k`` random aligned members;
- ``gaussian``: every value drawn independently from a Gaussian fitted to the aligned members
  (per-value mean and standard deviation).

Each is built as it is; the eval command also measures it with BatchNorm statistics re-estimated on
the train split (averaged weights come with averaged statistics, which fit neither parent).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

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


def gaussian(train: list[StateDict], count: int, generator: torch.Generator) -> list[StateDict]:
    """Return ``count`` states drawn value by value from a Gaussian fitted to the training members."""
    out = []
    floats = [k for k, v in train[0].items() if v.is_floating_point()]
    mean = {k: torch.stack([s[k] for s in train]).mean(dim=0) for k in floats}
    std = {k: torch.stack([s[k] for s in train]).std(dim=0) for k in floats}
    for _ in range(count):
        state = dict(train[0])
        for k in floats:
            state[k] = mean[k] + std[k] * torch.randn(mean[k].shape, generator=generator)
            if k.endswith("running_var"):
                state[k] = state[k].clamp_min(1e-5)  # a variance must stay positive
        out.append(state)
    return out


def baseline_builders(train: list[StateDict], count: int, noise_scales: tuple[float, ...], soup_k: int,
                      keys: list[str], generator: torch.Generator) -> Iterator[tuple[str, Callable[[], list[StateDict]]]]:
    """Yield ``(name, build)`` for every baseline; ``build()`` returns its ``count`` state dicts (built lazily)."""
    for scale in noise_scales:
        yield f"noise {scale:g}", lambda scale=scale: noisy(train, count, scale, keys, generator)
    yield "gaussian", lambda: gaussian(train, count, generator)
    yield "interpolation", lambda: interpolations(train, count, generator)
    k = min(soup_k, len(train))
    yield f"soup of {k}", lambda: soups(train, count, k, generator)

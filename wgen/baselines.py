"""Baselines a generator must beat, built from the zoo's training members with the samples' count.

- ``noise S``: a random training member plus Gaussian noise, per tensor, at ``S`` times the tensor's RMS;
- ``interpolation``: a random point on the straight line between two random aligned members;
- ``soup of k``: the uniform average of ``k`` random aligned members;
- ``gaussian``: every value drawn independently from a Gaussian fitted to the aligned members
  (per-value mean and standard deviation);
- ``unit mosaic``: every unit (a channel's fan-in, bias, norm and statistics; an attention head's rows)
  copied from a random aligned member, so that each piece is trained but the pieces never trained
  together: the recombination a per-unit generator has to beat.

Each is built as it is; the eval command also measures it with BatchNorm statistics re-estimated on
the train split (averaged weights come with averaged statistics, which fit neither parent).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .permute.groups import PermSpec

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


def unit_mosaics(train: list[StateDict], count: int, spec: PermSpec, generator: torch.Generator) -> list[StateDict]:
    """Return ``count`` states whose every unit comes from a random aligned training member.

    A unit's values are its slices along the first permuted axis of each tensor: a channel's fan-in row,
    bias, norm and BatchNorm statistics, or an attention head's q, k and v rows; a tensor with no permuted
    axis (the classifier's bias, integer buffers) comes whole from one random member per state.
    """
    owners = _unit_owners(spec)
    stacked = {key: torch.stack([s[key] for s in train]).movedim(axis + 1, 1) for key, (axis, _, _) in owners.items()}
    units = {}
    for _, group, unit in owners.values():
        units[group] = max(units.get(group, 0), int(unit.max()) + 1)
    out = []
    for _ in range(count):
        donors = {group: torch.randint(len(train), (n,), generator=generator) for group, n in units.items()}
        state = dict(train[int(torch.randint(len(train), (1,), generator=generator))])
        for key, (axis, group, unit) in owners.items():
            picked = stacked[key][donors[group][unit], torch.arange(len(unit))]  # [axis length, other axes...]
            state[key] = picked.movedim(0, axis).contiguous()
        out.append(state)
    return out


def _unit_owners(spec: PermSpec) -> dict[str, tuple[int, str, torch.Tensor]]:
    """Return, per tensor with a permuted axis, its first such axis, the group that permutes it and the unit
    of every index along it (a head's index for attention; the q/k norms shared by all heads are one unit)."""
    candidates: dict[str, list[tuple[int, str, torch.Tensor]]] = {}
    for group in spec.groups:
        for key, axis in group.axes:
            candidates.setdefault(key, []).append((axis, group.name, torch.arange(group.size)))
    for head in spec.heads:
        H, D = head.num_heads, head.head_dim
        for key, axis, layout in head.axes:
            unit = torch.cat([torch.full((D,), H) if kind == "qk_norm" else torch.arange(H * D) // D for kind in layout])
            candidates.setdefault(key, []).append((axis, head.name, unit))
    return {key: min(options, key=lambda option: option[0]) for key, options in candidates.items()}


def baseline_builders(train: list[StateDict], count: int, noise_scales: tuple[float, ...], soup_k: int,
                      keys: list[str], generator: torch.Generator,
                      spec: PermSpec | None = None) -> Iterator[tuple[str, Callable[[], list[StateDict]]]]:
    """Yield ``(name, build)`` for every baseline; ``build()`` returns its ``count`` state dicts (built lazily).
    The unit mosaic needs the permutation groups ``spec``."""
    for scale in noise_scales:
        yield f"noise {scale:g}", lambda scale=scale: noisy(train, count, scale, keys, generator)
    yield "gaussian", lambda: gaussian(train, count, generator)
    yield "interpolation", lambda: interpolations(train, count, generator)
    k = min(soup_k, len(train))
    yield f"soup of {k}", lambda: soups(train, count, k, generator)
    if spec is not None and (spec.groups or spec.heads):
        yield "unit mosaic", lambda: unit_mosaics(train, count, spec, generator)

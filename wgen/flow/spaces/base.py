"""What every weight space shares: the raw vector of a member (``Layout``), its normalisation, the interface.

A weight space turns the state dicts of a zoo's members into the tensors a velocity net is trained
on (one tensor of ``shape`` a member: a flat vector, a set of tokens, ...) and turns a batch of
generated tensors back into weights. Every space goes through the same *raw vector* of a member:
every floating-point tensor of the state dict, sorted by name (the order safetensors stores them
in, so a raw vector is already the data of a sample's file), with BatchNorm's ``running_var`` as its
logarithm so that any decoded value is a valid variance. Integer buffers (``num_batches_tracked``)
are not modelled: they are restored from the first training member.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...progress import SILENT
from ...registry import NoOptions

StateDict = dict[str, torch.Tensor]
MIN_SCALE = 1e-8


@dataclass(frozen=True)
class Slot:
    """Where one state-dict tensor sits in the raw vector."""

    key: str
    shape: tuple[int, ...]
    offset: int
    log: bool  # stored as log (running_var)

    @property
    def size(self) -> int:
        """Return the number of values of the tensor."""
        return math.prod(self.shape)


class Layout:
    """The order of modelled tensors in the raw vector, and the integer buffers restored as they are."""

    def __init__(self, slots: list[Slot], fixed: StateDict) -> None:
        self.slots = slots
        self.fixed = fixed  # integer buffers, copied into every decoded state dict
        self.dim = sum(s.size for s in slots)

    @classmethod
    def from_state(cls, state: StateDict) -> Layout:
        """Return the layout of ``state``: its float tensors sorted by name, its integer buffers fixed."""
        slots, fixed, offset = [], {}, 0
        for key, value in sorted(state.items()):
            if value.is_floating_point():
                slot = Slot(key, tuple(value.shape), offset, key.endswith("running_var"))
                slots.append(slot)
                offset += slot.size
            else:
                fixed[key] = value.clone()
        return cls(slots, fixed)

    def flatten(self, state: StateDict) -> torch.Tensor:
        """Return the raw vector of ``state`` (float32, running_var as log)."""
        parts = []
        for slot in self.slots:
            value = state[slot.key].reshape(-1).float()
            parts.append(value.clamp_min(1e-12).log() if slot.log else value)
        return torch.cat(parts)

    def stack(self, states: list[StateDict]) -> torch.Tensor:
        """Return the raw vectors ``[N, dim]`` of ``states``."""
        return torch.stack([self.flatten(s) for s in states])

    def unflatten(self, vector: torch.Tensor) -> StateDict:
        """Return the state dict of a raw vector (integer buffers from the layout)."""
        state = {}
        for slot in self.slots:
            value = vector[slot.offset:slot.offset + slot.size].reshape(slot.shape)
            state[slot.key] = value.exp() if slot.log else value
        for key, value in self.fixed.items():
            state[key] = value.clone()
        return state

    def to_json(self) -> dict[str, Any]:
        """Return the slots as JSON (integer buffers travel in safetensors)."""
        return {"slots": [{"key": s.key, "shape": list(s.shape), "offset": s.offset, "log": s.log}
                          for s in self.slots]}

    @classmethod
    def from_json(cls, value: dict[str, Any], fixed: StateDict) -> Layout:
        """Return the layout stored by ``to_json``."""
        return cls([Slot(s["key"], tuple(s["shape"]), int(s["offset"]), bool(s["log"])) for s in value["slots"]],
                   fixed)


@dataclass
class Normalization:
    """The zoo mean of the raw vector and one scale per tensor (its spread across the zoo).

    Centring on the mean and dividing by the scale makes small tensors weigh as much as large ones.
    """

    mean: torch.Tensor  # [dim]
    scale: torch.Tensor  # [dim], constant over each slot

    @classmethod
    def fit(cls, raw: torch.Tensor, layout: Layout) -> tuple[Normalization, torch.Tensor]:
        """Return the normalisation of raw vectors ``[N, dim]`` and the centred (not yet scaled) rows."""
        mean = raw.mean(dim=0)
        centred = raw - mean
        scale = torch.empty_like(mean)
        for slot in layout.slots:
            part = centred[:, slot.offset:slot.offset + slot.size]
            scale[slot.offset:slot.offset + slot.size] = part.pow(2).mean().sqrt().clamp_min(MIN_SCALE)
        return cls(mean, scale), centred

    def apply(self, raw: torch.Tensor) -> torch.Tensor:
        """Return normalised rows of raw vectors ``[N, dim]``."""
        return (raw.to(self.mean.device) - self.mean) / self.scale

    def invert_(self, normalized: torch.Tensor) -> torch.Tensor:
        """Turn normalised rows back into raw vectors, in place; return them."""
        return normalized.mul_(self.scale.to(normalized.device)).add_(self.mean.to(normalized.device))


@dataclass(frozen=True)
class FitContext:
    """What a space may use beyond the members' weights: where to compute, and the networks they are."""

    device: torch.device
    spec: Any = None  # the zoo's ModelSpec (structure-aware spaces trace it)
    input_size: tuple[int, int, int] | None = None
    data: Any = None  # the zoo's SplitData, for spaces that train on it (``needs_data``)
    seed: int = 0
    progress: Any = SILENT
    checkpoints: Path | None = None  # where a space that trains keeps its resumable state ...
    meta: dict[str, Any] = field(default_factory=dict)  # ... with what the run was started with
    stop_after: int | None = None  # end the fit after this many steps as if killed (raise FitStopped)


class FitStopped(Exception):
    """Raised by a space's ``fit`` cut short by ``FitContext.stop_after`` (its checkpoint is written)."""


@dataclass
class EndPoints:
    """Flow end points settled by their space: possibly moved, with per-sample notes and rejections."""

    coords: torch.Tensor  # [N, *shape]
    notes: list[dict[str, Any]] = field(default_factory=list)  # recorded per sample in the manifest
    rejected: list[str | None] = field(default_factory=list)  # why a sample is not written (None: kept)

    @classmethod
    def as_they_are(cls, coords: torch.Tensor) -> EndPoints:
        """Return end points left where the flow put them: no notes, none rejected."""
        return cls(coords, [{} for _ in coords], [None for _ in coords])

    def __getitem__(self, part: slice) -> EndPoints:
        return EndPoints(self.coords[part], self.notes[part], self.rejected[part])


class WeightSpace:
    """State dicts <-> the tensors a velocity net consumes; subclasses choose the coordinates.

    A subclass registers in ``flow/spaces/__init__.py`` (or with ``SPACES.register``) and implements
    ``fit``, ``load``, ``shape``, ``encode``, ``vectors`` and ``saved``; ``settle`` and ``describe``
    are optional.
    """

    kind: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    drawn: ClassVar[bool] = False  # coordinates are the noise itself: no velocity net to train (net ``none``)
    calibrates: ClassVar[bool] = False  # decoded BatchNorm statistics must be re-estimated on the train split
    needs_data: ClassVar[bool] = False  # ``fit`` trains on the zoo's data (``FitContext.data``)

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    @classmethod
    def fit(cls, states: list[StateDict], options: Any, context: FitContext) -> WeightSpace:
        """Return the space fitted on the training members ``states`` (with this kind's ``Options``)."""
        raise NotImplementedError

    @classmethod
    def load(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> WeightSpace:
        """Return the space stored by :meth:`saved`."""
        raise NotImplementedError

    def saved(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Return the space's JSON config (``kind`` and ``values`` included) and its tensors, to store."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...]:
        """Return the shape of one member's coordinates: what the velocity net consumes and returns."""
        raise NotImplementedError

    @property
    def numel(self) -> int:
        """Return the number of coordinates of one member."""
        return math.prod(self.shape)

    def encode(self, states: list[StateDict]) -> torch.Tensor:
        """Return the coordinates ``[N, *shape]`` of ``states``."""
        raise NotImplementedError

    def vectors(self, coords: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Return the raw vectors ``[N, layout.dim]`` (``Layout.flatten`` form) of coordinates ``[N, *shape]``.

        Written into ``out`` when given: a buffer reused batch after batch is not page-faulted anew.
        """
        raise NotImplementedError

    def decode(self, coords: torch.Tensor) -> list[StateDict]:
        """Return the state dicts of coordinates ``[N, *shape]`` (on the coordinates' device)."""
        return [self.layout.unflatten(v) for v in self.vectors(coords)]

    @property
    def projects(self) -> bool:
        """Return whether the space knows a set every training member lies on (``settle`` uses it)."""
        return False

    def settle(self, ends: torch.Tensor, min_radius: float) -> EndPoints:
        """Return flow end points ``[N, *shape]`` settled onto the members' set (spaces that ``project``)."""
        return EndPoints.as_they_are(ends)

    def describe(self) -> str:
        """Return one line saying what the space is, for people."""
        return f"{self.kind} space, {self.numel:,} coordinates over {self.layout.dim:,} weights"

    def to(self, device: torch.device | str) -> WeightSpace:
        """Move the space's tensors to ``device`` (in place); return the space."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
            elif isinstance(value, Normalization):
                setattr(self, name, Normalization(value.mean.to(device), value.scale.to(device)))
        return self


def load_layout(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Layout:
    """Return the layout stored by :func:`saved_layout` (integer buffers under ``fixed.``)."""
    fixed = {k[len("fixed."):]: v for k, v in tensors.items() if k.startswith("fixed.")}
    return Layout.from_json(config, fixed)


def saved_layout(kind: str, layout: Layout, norm: Normalization | None, extra: dict[str, Any]
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return the JSON config and tensors every space stores: kind, layout, integer buffers, and the mean
    and scale of a normalised space (``norm`` given)."""
    config = {"kind": kind, **extra, "values": layout.dim, **layout.to_json()}
    tensors = {} if norm is None else {"mean": norm.mean.cpu().contiguous(), "scale": norm.scale.cpu().contiguous()}
    tensors.update({f"fixed.{k}": v.contiguous() for k, v in layout.fixed.items()})
    return config, tensors

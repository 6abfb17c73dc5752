"""Weight spaces: a state dict <-> a normalised vector the flow is trained in.

The vector holds every floating-point parameter and BatchNorm's running statistics (``running_var``
as its logarithm, so that any decoded value is a valid variance). Integer buffers
(``num_batches_tracked``) are not modelled: they are restored from the first training member.
Every coordinate is centred on the zoo mean and divided by one scale per tensor (the spread of
that tensor across the zoo), so that small tensors weigh as much as large ones.

Two spaces implement :class:`WeightSpace`:

- ``full``: the whole normalised vector (dimension = number of modelled values);
- ``pca``: the first ``k`` principal components of the normalised training members
  (``k <= members - 1``), each coefficient scaled to unit variance. With the default
  ``k = members - 1`` every training member lies at the same distance from the zoo mean in these
  coordinates (``(N - 1) / sqrt(N)`` for N members): the zoo is a sphere, and
  :meth:`WeightSpace.project` puts a flow's end point back on it (see ``PCASpace.radius``).

``auto`` picks ``full`` up to :data:`FULL_SPACE_MAX_DIM` values, ``pca`` above: a velocity net on
a full vector of a few hundred thousand values would be larger than the zoo itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import WgenError

StateDict = dict[str, torch.Tensor]
SPACES = ("auto", "full", "pca")
FULL_SPACE_MAX_DIM = 50_000
_MIN_SCALE = 1e-8


@dataclass(frozen=True)
class Slot:
    """Where one state-dict tensor sits in the vector."""

    key: str
    shape: tuple[int, ...]
    offset: int
    log: bool  # stored as log (running_var)

    @property
    def size(self) -> int:
        """Return the number of values of the tensor."""
        n = 1
        for s in self.shape:
            n *= s
        return n


class Layout:
    """The order of modelled tensors in the vector, and the integer buffers restored as they are."""

    def __init__(self, slots: list[Slot], fixed: StateDict) -> None:
        self.slots = slots
        self.fixed = fixed  # integer buffers, copied into every decoded state dict
        self.dim = sum(s.size for s in slots)

    @classmethod
    def from_state(cls, state: StateDict) -> Layout:
        """Return the layout of ``state``: its float tensors sorted by name, its integer buffers fixed.

        Sorted by name is the order ``safetensors`` stores them in, so a decoded vector is already
        the data of a sample's file (see ``writer.PackedLayout``).
        """
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


class WeightSpace:
    """State dict <-> normalised vector. Subclasses choose the coordinates the flow sees."""

    kind = "base"

    def __init__(self, layout: Layout, mean: torch.Tensor, scale: torch.Tensor) -> None:
        self.layout, self.mean, self.scale = layout, mean, scale

    @property
    def dim(self) -> int:
        """Return the dimension of the coordinates the flow is trained in."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> WeightSpace:
        """Move the space's tensors to ``device`` (in place); return the space."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    def encode(self, states: list[StateDict]) -> torch.Tensor:
        """Return ``[N, dim]`` coordinates of ``states``."""
        raise NotImplementedError

    def normalized(self, states: list[StateDict]) -> torch.Tensor:
        """Return ``[N, layout.dim]`` vectors centred on the zoo mean, scaled per tensor."""
        raw = torch.stack([self.layout.flatten(s) for s in states]).to(self.mean.device)
        return (raw - self.mean) / self.scale

    def vectors(self, coords: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Return the raw ``[N, layout.dim]`` vectors (``Layout.flatten`` form) of ``[N, dim]`` coordinates.

        Written into ``out`` when given: a buffer reused batch after batch is not page-faulted anew.
        """
        if out is None:
            out = torch.empty(len(coords), self.layout.dim, dtype=coords.dtype, device=coords.device)
        return self.to_normalized(coords, out).mul_(self.scale.to(coords.device)).add_(self.mean.to(coords.device))

    def to_normalized(self, coords: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write the normalised vectors ``[N, layout.dim]`` of coordinates into ``out``; return it."""
        raise NotImplementedError

    @property
    def projects(self) -> bool:
        """Return whether :meth:`project` moves points (the space knows a set all training members lie on)."""
        return False

    def project(self, coords: torch.Tensor) -> torch.Tensor:
        """Return ``coords`` moved onto the set every training member lies on (unchanged if the space knows none)."""
        return coords

    def relative_radius(self, coords: torch.Tensor) -> torch.Tensor:
        """Return ``[N]``: each point's distance from the zoo mean over the training members' (1 on their set)."""
        raise NotImplementedError(f"the {self.kind} space knows no set its members lie on")

    def decode(self, coords: torch.Tensor) -> list[StateDict]:
        """Return the state dicts of ``[N, dim]`` coordinates (on the coordinates' device)."""
        return [self.layout.unflatten(v) for v in self.vectors(coords)]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Return everything to store in ``space.safetensors``."""
        out = {"mean": self.mean.cpu().contiguous(), "scale": self.scale.cpu().contiguous()}
        out.update({f"fixed.{k}": v.contiguous() for k, v in self.layout.fixed.items()})
        return out

    def to_json(self) -> dict[str, Any]:
        """Return the space's config (kind, dimensions, layout)."""
        return {"kind": self.kind, "dim": self.dim, "values": self.layout.dim, **self.layout.to_json()}


class FullSpace(WeightSpace):
    """The whole normalised vector."""

    kind = "full"

    @property
    def dim(self) -> int:
        return self.layout.dim

    def encode(self, states: list[StateDict]) -> torch.Tensor:
        return self.normalized(states)

    def to_normalized(self, coords: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(coords)


class PCASpace(WeightSpace):
    """The first ``k`` principal components of the normalised zoo, scaled to unit variance.

    ``radius`` is the norm every training member has in these coordinates, or None when their norms
    differ (``k < members - 1``). A flow's end point inside that sphere is a blend: of a member with
    the zoo mean (a 50/50 blend of two members sits at 0.69 of the radius), where averaged weights
    lose their function (the variance collapse of weight averaging). :meth:`relative_radius` measures
    it; :meth:`project` rescales end points to ``radius``, which leaves every training member unchanged.
    """

    kind = "pca"

    def __init__(self, layout: Layout, mean: torch.Tensor, scale: torch.Tensor, basis: torch.Tensor,
                 coef_std: torch.Tensor, radius: float | None = None) -> None:
        super().__init__(layout, mean, scale)
        self.basis, self.coef_std = basis, coef_std  # [k, values], [k]
        self.radius = radius

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    def encode(self, states: list[StateDict]) -> torch.Tensor:
        return self.coordinates(self.normalized(states))

    def coordinates(self, normalized: torch.Tensor) -> torch.Tensor:
        """Return the ``[N, k]`` coordinates of normalised vectors ``[N, layout.dim]``."""
        return (normalized @ self.basis.T) / self.coef_std

    def to_normalized(self, coords: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.mm(coords * self.coef_std.to(coords.device), self.basis.to(coords.device), out=out)

    @property
    def projects(self) -> bool:
        return self.radius is not None

    def project(self, coords: torch.Tensor) -> torch.Tensor:
        if self.radius is None:
            return coords
        return coords / self.relative_radius(coords).clamp_min(_MIN_SCALE)[:, None]

    def relative_radius(self, coords: torch.Tensor) -> torch.Tensor:
        if self.radius is None:
            return super().relative_radius(coords)
        return coords.norm(dim=1) / self.radius

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "radius": self.radius}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**super().tensors(), "basis": self.basis.cpu().contiguous(), "coef_std": self.coef_std.cpu().contiguous()}


def fit_space(kind: str, states: list[StateDict], components: int | None, device: torch.device) -> WeightSpace:
    """Return a space of ``kind`` (auto|full|pca) fitted on the training members ``states``.

    The principal directions of the PCA space are computed on ``device``; ``components`` defaults to ``members - 1``.
    """
    if kind not in SPACES:
        raise WgenError(f"unknown --space {kind!r}", f"use one of {', '.join(SPACES)}")
    if len(states) < 2:
        raise WgenError(f"a generator needs at least 2 training members, got {len(states)}",
                        "train a larger zoo, or lower --holdout")
    layout = Layout.from_state(states[0])
    raw = torch.stack([layout.flatten(s) for s in states]).to(device)
    mean = raw.mean(dim=0)
    centred = raw - mean
    scale = torch.empty_like(mean)
    for slot in layout.slots:
        part = centred[:, slot.offset:slot.offset + slot.size]
        scale[slot.offset:slot.offset + slot.size] = part.pow(2).mean().sqrt().clamp_min(_MIN_SCALE)
    if kind == "auto":
        kind = "full" if layout.dim <= FULL_SPACE_MAX_DIM else "pca"
    if kind == "full":
        return FullSpace(layout, mean, scale)
    k = components if components is not None else len(states) - 1
    if not 1 <= k <= len(states) - 1:
        raise WgenError(f"--components {k} must be between 1 and training members - 1 ({len(states) - 1})",
                        "PCA on N members has at most N - 1 directions")
    normalized = centred.div_(scale)
    basis, singular = _principal_directions(normalized, k)
    coef_std = (singular / (len(states) - 1) ** 0.5).clamp_min(_MIN_SCALE)
    space = PCASpace(layout, mean, scale, basis, coef_std)
    space.radius = _common_norm(space.coordinates(normalized))
    return space


def _common_norm(coords: torch.Tensor, tolerance: float = 1e-3) -> float | None:
    """Return the norm all rows of ``coords`` share (to ``tolerance`` relative), else None."""
    norms = coords.norm(dim=1)
    if float(norms.max() - norms.min()) > tolerance * float(norms.mean()):
        return None
    return float(norms.mean())


def _principal_directions(rows: torch.Tensor, k: int, chunk: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the top-``k`` right singular vectors ``[k, D]`` and singular values of ``rows`` ``[N, D]``.

    Works through the N x N Gram matrix accumulated in float64 over column chunks: exact to float32
    precision for N << D, with memory for one chunk in float64 only.
    """
    gram = torch.zeros(len(rows), len(rows), dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[1], chunk):
        block = rows[:, start:start + chunk].double()
        gram += block @ block.T
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    order = eigenvalues.argsort(descending=True)[:k]
    singular = eigenvalues[order].clamp_min(0).sqrt()
    left = eigenvectors[:, order] / singular.clamp_min(1e-30)
    basis = torch.empty(k, rows.shape[1], dtype=rows.dtype, device=rows.device)
    for start in range(0, rows.shape[1], chunk):
        basis[:, start:start + chunk] = (left.T @ rows[:, start:start + chunk].double()).to(rows.dtype)
    return basis, singular.to(rows.dtype)


def load_space(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> WeightSpace:
    """Return the space stored by ``WeightSpace.to_json`` and ``tensors``."""
    fixed = {k[len("fixed."):]: v for k, v in tensors.items() if k.startswith("fixed.")}
    layout = Layout.from_json(config, fixed)
    if config["kind"] == "full":
        return FullSpace(layout, tensors["mean"], tensors["scale"])
    if config["kind"] == "pca":
        return PCASpace(layout, tensors["mean"], tensors["scale"], tensors["basis"], tensors["coef_std"],
                        config.get("radius"))  # absent from wgen 0.1 generators: no projection
    raise WgenError(f"unknown weight space {config['kind']!r} in the generator", "re-train it with this wgen")

"""The ``pca`` weight space: the first k principal components of the normalised zoo, at unit variance.

With the default ``k = members - 1`` every training member lies at the same distance from the zoo
mean in these coordinates (``(N - 1) / sqrt(N)`` for N members): the zoo is a sphere. A flow's end
point inside it is a blend: of a member with the zoo mean, or of two members (a 50/50 blend sits at
0.69 of the radius), where averaged weights lose their function (the variance collapse of weight
averaging). :meth:`PCASpace.settle` rejects end points inside ``min_radius`` of the sphere and puts
the others back on it, which leaves every training member unchanged. The same geometry says what
the space cannot do: it is the affine hull of the training members, so every sample is a blend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import WgenError
from ...limits import check_all
from .base import MIN_SCALE, EndPoints, FitContext, Layout, Normalization, StateDict, WeightSpace, load_layout, saved_layout

BLEND = "a blend of members"  # why an end point inside --min-radius is rejected


@dataclass(frozen=True)
class PCAOptions:
    """Settings of the pca space."""

    components: int | None = None  # default: training members - 1

    def check(self) -> None:
        """Raise a WgenError for a setting out of its range (the upper bound depends on the zoo)."""
        check_all({"--components": self.components})


class PCASpace(WeightSpace):
    """The first ``k`` principal components of the normalised zoo, each coefficient at unit variance.

    ``radius`` is the norm every training member has in these coordinates, or None when their norms
    differ (``k < members - 1``, or a generator of wgen 0.1): then end points are left as they are.
    """

    Options = PCAOptions

    def __init__(self, layout: Layout, norm: Normalization, basis: torch.Tensor, coef_std: torch.Tensor,
                 radius: float | None = None) -> None:
        super().__init__(layout)
        self.norm, self.basis, self.coef_std = norm, basis, coef_std  # basis [k, values], coef_std [k]
        self.radius = radius

    @classmethod
    def fit(cls, states: list[StateDict], options: PCAOptions, context: FitContext) -> PCASpace:
        k = options.components if options.components is not None else len(states) - 1
        if not 1 <= k <= len(states) - 1:
            raise WgenError(f"--components {k} must be between 1 and training members - 1 ({len(states) - 1})",
                            "PCA on N members has at most N - 1 directions")
        layout = Layout.from_state(states[0])
        norm, centred = Normalization.fit(layout.stack(states).to(context.device), layout)
        normalized = centred.div_(norm.scale)
        basis, singular = principal_directions(normalized, k)
        coef_std = (singular / (len(states) - 1) ** 0.5).clamp_min(MIN_SCALE)
        space = cls(layout, norm, basis, coef_std)
        space.radius = _common_norm(space.coordinates(normalized))
        return space

    @classmethod
    def load(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PCASpace:
        norm = Normalization(tensors["mean"], tensors["scale"])
        return cls(load_layout(config, tensors), norm, tensors["basis"], tensors["coef_std"], config.get("radius"))

    def saved(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config, tensors = saved_layout(self.kind, self.layout, self.norm, {"dim": self.numel, "radius": self.radius})
        return config, {**tensors, "basis": self.basis.cpu().contiguous(), "coef_std": self.coef_std.cpu().contiguous()}

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self.basis.shape[0]),)

    def encode(self, states: list[StateDict]) -> torch.Tensor:
        return self.coordinates(self.norm.apply(self.layout.stack(states)))

    def coordinates(self, normalized: torch.Tensor) -> torch.Tensor:
        """Return the ``[N, k]`` coordinates of normalised vectors ``[N, layout.dim]``."""
        return (normalized @ self.basis.T) / self.coef_std

    def vectors(self, coords: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(len(coords), self.layout.dim, dtype=coords.dtype, device=coords.device)
        torch.mm(coords * self.coef_std.to(coords.device), self.basis.to(coords.device), out=out)
        return self.norm.invert_(out)

    @property
    def projects(self) -> bool:
        return self.radius is not None

    def relative_radius(self, coords: torch.Tensor) -> torch.Tensor:
        """Return ``[N]``: each point's distance from the zoo mean over the training members' (1 on the sphere)."""
        if self.radius is None:
            raise ValueError("this pca space knows no sphere its members lie on")
        return coords.norm(dim=1) / self.radius

    def settle(self, ends: torch.Tensor, min_radius: float) -> EndPoints:
        radii = self.relative_radius(ends)
        rejected = [f"{BLEND} (radius {r:.2f} < --min-radius {min_radius})" if r < min_radius else None
                    for r in radii.tolist()]
        notes = [{"radius": round(r, 4)} for r in radii.tolist()]
        return EndPoints(ends / radii.clamp_min(MIN_SCALE)[:, None], notes, rejected)

    def describe(self) -> str:
        sphere = f"; members on a sphere of radius {self.radius:.3f}" if self.radius else ""
        return f"pca space, {self.numel} dims over {self.layout.dim:,} weights{sphere}"


def _common_norm(coords: torch.Tensor, tolerance: float = 1e-3) -> float | None:
    """Return the norm all rows of ``coords`` share (to ``tolerance`` relative), else None."""
    norms = coords.norm(dim=1)
    if float(norms.max() - norms.min()) > tolerance * float(norms.mean()):
        return None
    return float(norms.mean())


def principal_directions(rows: torch.Tensor, k: int, chunk: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
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

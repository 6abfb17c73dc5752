"""The probability path of conditional flow matching, for coordinates of any shape.

The straight (conditional optimal-transport) path from noise ``x0`` at t=0 to data ``x1`` at t=1:
``x_t = (1 - t) x0 + t x1`` with target velocity ``x1 - x0``. Noise and data of a minibatch may be
paired by an optimal assignment first (minibatch OT coupling), which straightens the paths.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

TIME_SAMPLING = ("uniform", "logit-normal")


def point_and_velocity(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``x_t`` and the target velocity at times ``t`` ``[B]`` between ``x0`` and ``x1`` ``[B, ...]``."""
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * x1, x1 - x0


def sample_times(n: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Return ``n`` training times in (0, 1): ``uniform``, or ``logit-normal`` (fewer near 0 and 1)."""
    if kind == "uniform":
        return torch.rand(n, generator=generator)
    return torch.sigmoid(torch.randn(n, generator=generator))


def ot_pairing(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Return the order of noise rows ``x0`` that minimises the summed squared distance to data rows ``x1``."""
    cost = torch.cdist(x1.flatten(1).float(), x0.flatten(1).float()).pow(2).cpu().numpy()
    _, cols = linear_sum_assignment(cost)
    return torch.as_tensor(cols, device=x0.device)

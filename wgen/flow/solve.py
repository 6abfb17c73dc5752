"""ODE integration of a velocity field from t=0 to t=1 (torchdiffeq's solvers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchdiffeq import odeint

SOLVERS = ("euler", "midpoint", "rk4", "dopri5")  # fixed steps, and one adaptive
ADAPTIVE_TOLERANCE = 1e-5

Velocity = Callable[..., torch.Tensor]


def integrate(velocity: Velocity, x0: torch.Tensor, solver: str = "rk4", steps: int = 5,
              **extras: Any) -> torch.Tensor:
    """Return the end point at t=1 of the flow ``dx/dt = velocity(x, t, **extras)`` from ``x0`` at t=0.

    ``t`` reaches ``velocity`` as ``[1]``, one time for the whole batch. Fixed-step solvers take
    ``steps`` steps; ``dopri5`` adapts its steps to tolerance 1e-5.
    """
    def field(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return velocity(x, t.reshape(1), **extras)

    times = torch.tensor([0.0, 1.0], device=x0.device)
    if solver == "dopri5":
        options, tolerances = None, {"rtol": ADAPTIVE_TOLERANCE, "atol": ADAPTIVE_TOLERANCE}
    else:
        options, tolerances = {"step_size": 1.0 / steps}, {}
    with torch.no_grad():
        return odeint(field, x0, times, method=solver, options=options, **tolerances)[-1]

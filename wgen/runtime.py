"""Device selection and seeding shared by every command."""

from __future__ import annotations

import random

import numpy as np
import torch

from .errors import WgenError

def resolve_device(name: str) -> torch.device:
    """Return the torch device for ``auto|cpu|cuda|cuda:N`` (auto = cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise WgenError(f"--device {name} was asked for but no CUDA device is available",
                            "use --device cpu or --device auto")
        return torch.device(name)
    raise WgenError(f"unknown device {name!r}", "use one of auto, cpu, cuda, cuda:N")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)

"""Devices, CPU threads and seeding shared by every command."""

from __future__ import annotations

import os
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


def default_threads(shards: int = 1) -> int:
    """Return the CPU threads a process should use: ``OMP_NUM_THREADS`` if set, else the cores this process
    may run on divided among ``shards`` processes on this host."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // shards)


def set_threads(threads: int | None, shards: int = 1) -> int:
    """Make torch use ``threads`` CPU threads (None: :func:`default_threads`); return the number used.

    Two processes with a thread per core each on one machine run more than ten times slower than
    one: processes sharing a host must share its cores.
    """
    from .limits import check

    if threads is not None:
        check("--threads", threads)
    threads = threads or default_threads(shards)
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)

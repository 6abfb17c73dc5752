"""Running ``wgen train`` under torchrun: the process group, the ranks, errors raised on every rank.

Under ``torchrun --nproc-per-node N -m wgen train ...`` the net is wrapped in DistributedDataParallel
(gloo on CPU, NCCL on GPU); every rank draws its own noise and rank 0 writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from ..errors import WgenError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's rank and the number of processes (1 outside torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Return whether this process writes (rank 0)."""
        return self.rank == 0


def is_main_process() -> bool:
    """Return whether this process is rank 0 of a torchrun job, or not under torchrun at all."""
    return os.environ.get("RANK", "0") == "0"


def init_distributed(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the torchrun process group if there is one; return the ranks and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def on_main_then_all(ranks: Ranks, action: Callable[[], T]) -> T:
    """Run ``action`` on rank 0 and return its result on every rank; every rank raises the WgenError it raised."""
    message, result = None, None
    if ranks.main:
        try:
            result = action()
        except WgenError as exc:
            message = [exc.message, exc.hint]
    if ranks.world > 1:
        box = [message, result]
        dist.broadcast_object_list(box, src=0)
        message, result = box
    if message is not None:
        finish_distributed(ranks)
        raise WgenError(*message)
    return result  # type: ignore[return-value]


def gather_to_main(ranks: Ranks, value: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Return ``value`` of every rank (on CPU), gathered through ``device`` (NCCL gathers CUDA tensors only)."""
    if ranks.world == 1:
        return [value]
    gathered = [torch.empty_like(value, device=device) for _ in range(ranks.world)]
    dist.all_gather(gathered, value.to(device))
    return [g.cpu() for g in gathered]


def finish_distributed(ranks: Ranks) -> None:
    """Wait for every rank and leave the process group (nothing outside torchrun)."""
    if ranks.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

"""The resumable state of a training run: saved every few steps, restored bit for bit (safetensors + JSON).

``checkpoint/state.safetensors`` holds the velocity net (``model.*``), its EMA (``ema.*``, under
parameter names), the optimizer state (``opt.*``) and every rank's random generator (``rng.*``);
``checkpoint/state.json`` the step, loss history, seconds so far and what the run was started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ..checkpoints import read_json
from ..errors import WgenError
from ..outputs import atomic_dir, atomic_write_json
from .distributed import Ranks, gather_to_main
from .nets.base import VelocityNet

CHECKPOINT_DIR = "checkpoint"
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"


@dataclass
class TrainState:
    """Everything a training run changes as it goes: net, EMA weights, optimizer, random generator, progress."""

    net: VelocityNet
    ema: dict[str, torch.Tensor]  # parameter name -> EMA of that parameter
    optimizer: torch.optim.Optimizer
    rng: torch.Generator
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    earlier_seconds: float = 0.0  # training seconds of the segments before a resume


def save_checkpoint(folder: Path, state: TrainState, ranks: Ranks, meta: dict[str, Any]) -> None:
    """Write ``state`` (and ``meta``: what the run was started with) to ``folder`` atomically; rank 0 writes."""
    device = next(state.net.parameters()).device
    rngs = gather_to_main(ranks, state.rng.get_state(), device)
    if not ranks.main:
        return
    tensors = {f"model.{k}": v.detach().cpu() for k, v in state.net.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu() for k, v in state.ema.items()})
    opt_tensors, param_groups = optimizer_tensors(state.optimizer)
    tensors.update(opt_tensors)
    tensors.update({f"rng.{r}": g for r, g in enumerate(rngs)})
    info = {"step": state.step, "world_size": ranks.world, "param_groups": param_groups,
            "history": state.history, **meta}
    write_state(folder, tensors, info)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Return an optimizer's state as CPU tensors named ``opt.<index>.<name>``, and its param groups (JSON)."""
    opt = optimizer.state_dict()
    tensors = {}
    for index, values in opt["state"].items():
        for name, value in values.items():
            tensors[f"opt.{index}.{name}"] = value.detach().cpu() if torch.is_tensor(value) else torch.tensor(value)
    return tensors, opt["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                   param_groups: list[dict[str, Any]], device: torch.device) -> None:
    """Restore the state :func:`optimizer_tensors` returned into ``optimizer`` (its tensors on ``device``)."""
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in part(tensors, "opt.").items():
        index, name = key.split(".", 1)
        opt_state.setdefault(int(index), {})[name] = value.to(device) if name != "step" else value
    optimizer.load_state_dict({"state": opt_state, "param_groups": param_groups})


def write_state(folder: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Write a checkpoint (``tensors`` and the JSON ``info``) to ``folder`` atomically."""
    with atomic_dir(folder) as tmp:
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
        atomic_write_json(tmp / STATE_JSON, info)


def read_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Return the tensors and JSON of the checkpoint in ``folder``, or None when there is none."""
    info = read_checkpoint_meta(folder)
    return None if info is None else (safetensors.torch.load_file(str(folder / STATE_TENSORS)), info)


def read_checkpoint_meta(folder: Path) -> dict[str, Any] | None:
    """Return the ``state.json`` of the checkpoint in ``folder``, or None when there is none."""
    return read_json(folder / STATE_JSON) if (folder / STATE_JSON).is_file() else None


def load_checkpoint(folder: Path, state: TrainState, ranks: Ranks) -> None:
    """Restore the checkpoint in ``folder`` into ``state`` (net, EMA, optimizer, this rank's generator, progress)."""
    info = read_json(folder / STATE_JSON)
    if int(info.get("world_size", 1)) != ranks.world:
        raise WgenError(f"{folder}: saved with {info.get('world_size')} processes, resumed with {ranks.world}",
                        "resume with the same number of processes")
    tensors = safetensors.torch.load_file(str(folder / STATE_TENSORS))
    device = next(state.net.parameters()).device
    state.net.load_state_dict(part(tensors, "model."))
    for name, value in part(tensors, "ema.").items():
        state.ema[name].copy_(value.to(device))
    load_optimizer(state.optimizer, tensors, info["param_groups"], device)
    state.rng.set_state(tensors[f"rng.{ranks.rank}"])
    state.step, state.history = int(info["step"]), list(info["history"])
    state.earlier_seconds = float(info.get("seconds", 0.0))


def part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Return the tensors whose names start with ``prefix``, under the rest of their names."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

"""Conditional flow matching in weight space: training loop, checkpoints, resume, DDP.

Path: x_t = (1 - t) x0 + t x1 with x0 ~ N(0, I) noise (fresh every step) and x1 a training member's
coordinates; the velocity net regresses x1 - x0. Noise and data of a minibatch are paired by an
optimal assignment (minibatch OT coupling), which straightens the paths. All randomness comes from
one torch.Generator whose state is checkpointed, so ``resume`` continues bit for bit.

Under ``torchrun --nproc-per-node N -m wgen train ...`` the net is wrapped in DistributedDataParallel
(gloo on CPU, NCCL on GPU); every rank draws its own noise and rank 0 writes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment

from .. import __version__
from ..checkpoints import CONFIG_NAME, WEIGHTS_NAME, Zoo, atomic_dir, atomic_write_json, read_json, zoo_fingerprint
from ..errors import WgenError
from .nets import NetConfig, VelocityMLP, parameter_count
from .space import WeightSpace, fit_space

SPACE_NAME = "space.safetensors"
CHECKPOINT_DIR = "checkpoint"
GENERATOR_FORMAT = "wgen.generator/1"
TIME_SAMPLING = ("uniform", "logit-normal")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting that decides the trained generator (the device does not)."""

    space: str = "auto"
    components: int | None = None
    steps: int = 5000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    time_sampling: str = "uniform"  # logit-normal trains less near t=0 and 1; it left more samples at the zoo mean
    ot_coupling: bool = True
    holdout: float = 0.1
    seed: int = 0
    checkpoint_every: int = 500
    net: NetConfig = field(default_factory=NetConfig)

    def to_json(self) -> dict[str, Any]:
        """Return the config as JSON."""
        return {**asdict(self), "net": self.net.to_json()}


class TrainProgress(Protocol):
    """Receives training events; the CLI renders them."""

    def start(self, total: int, done: int, info: dict[str, Any]) -> None: ...
    def update(self, step: int, loss: float, val_loss: float | None, lr: float) -> None: ...


class _Silent:
    def start(self, total: int, done: int, info: dict[str, Any]) -> None: ...
    def update(self, step: int, loss: float, val_loss: float | None, lr: float) -> None: ...


@dataclass
class _Distributed:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def split_holdout(names: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Return ``(train, holdout)`` member names; the holdout is a seeded random ``fraction``."""
    if not 0 <= fraction < 1:
        raise WgenError(f"--holdout {fraction} must be in [0, 1)", "e.g. --holdout 0.1")
    count = int(math.floor(fraction * len(names) + 0.5)) if fraction > 0 else 0
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(order[:count])
    return [n for i, n in enumerate(names) if i not in held], [names[i] for i in held]


def train_generator(zoo: Zoo, out: Path, config: TrainConfig, device: torch.device, resume: bool = False,
                    force: bool = False, progress: TrainProgress | None = None,
                    stop_after: int | None = None) -> dict[str, Any]:
    """Train a generator on ``zoo`` into ``out``; return its ``config.json`` contents.

    ``resume`` continues from ``out/checkpoint``. ``stop_after`` ends the run after that many steps
    as if it had been killed (for tests): the checkpoint is written, the generator is not.
    """
    progress = progress or _Silent()
    _check_config(config)
    ddp, device = _init_distributed(device)
    names = [m.name for m in zoo.members]
    train_names, holdout_names = split_holdout(names, config.holdout, config.seed)
    states = {m.name: zoo.load(m) for m in zoo.members}
    fingerprint = zoo_fingerprint(zoo, [states[n] for n in names])
    _on_main_then_all(ddp, lambda: _prepare_output(out, resume, force, fingerprint, config))
    space = fit_space(config.space, [states[n] for n in train_names], config.components, device)
    data = space.encode([states[n] for n in train_names]).float()
    held = space.encode([states[n] for n in holdout_names]).float() if holdout_names else None
    del states

    torch.manual_seed(config.seed)
    net = VelocityMLP(space.dim, config.net).to(device)
    ema = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed * 1000 + ddp.rank)
    step, history, earlier_seconds = 0, [], 0.0
    if resume:
        step, history, earlier_seconds = _load_checkpoint(out / CHECKPOINT_DIR, net, ema, optimizer, generator, ddp)
    model = torch.nn.parallel.DistributedDataParallel(net) if ddp.world > 1 else net
    val_noise = _validation_batch(held, config.seed)
    info = {"space": space.kind, "dim": space.dim, "net_parameters": parameter_count(net),
            "train_members": len(train_names), "holdout_members": len(holdout_names), "device": str(device),
            "world_size": ddp.world}
    progress.start(config.steps, step, info)
    started = time.perf_counter()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _nullcontext()
    per_rank = max(1, config.batch_size // ddp.world)
    while step < config.steps:
        x1 = data[torch.randint(len(data), (per_rank,), generator=generator)].to(device)
        x0 = torch.randn(per_rank, space.dim, generator=generator).to(device)
        t = _sample_time(per_rank, config.time_sampling, generator).to(device)
        if config.ot_coupling:
            x0 = x0[_ot_pairing(x0, x1)]
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        with autocast:
            prediction = model(xt, t)
        loss = (prediction.float() - (x1 - x0)).pow(2).mean()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 1 - config.ema_decay)
        step += 1
        val = None
        if step % 50 == 0 or step == config.steps:
            val = _validation_loss(net, ema, held, val_noise, device)
            history.append({"step": step, "loss": loss.item(), "val_loss": val})
            progress.update(step, loss.item(), val, _lr_at(step - 1, config))
        if step % config.checkpoint_every == 0 or step == config.steps or step == stop_after:
            _save_checkpoint(out / CHECKPOINT_DIR, net, ema, optimizer, generator, step, history, ddp,
                             {"source_fingerprint": fingerprint, "config": config.to_json(),
                              "seconds": earlier_seconds + time.perf_counter() - started})
        if stop_after is not None and step >= stop_after:
            _finish_distributed(ddp)
            return {"stopped_at": step}
    seconds = earlier_seconds + time.perf_counter() - started  # all segments of a resumed run
    result = {}
    if ddp.main:
        result = _write_generator(out, zoo, space, net, ema, config, train_names, holdout_names, fingerprint,
                                  history, info, seconds)
    _finish_distributed(ddp)
    return result


def _check_config(config: TrainConfig) -> None:
    if config.time_sampling not in TIME_SAMPLING:
        raise WgenError(f"unknown --time-sampling {config.time_sampling!r}", f"use one of {', '.join(TIME_SAMPLING)}")
    if config.steps < 1 or config.batch_size < 1 or config.lr <= 0:
        raise WgenError("steps and batch size must be >= 1 and lr > 0", "check the training options")
    if config.checkpoint_every < 1 or config.warmup_steps < 0:
        raise WgenError("--checkpoint-every must be >= 1 and --warmup-steps >= 0", "check the training options")
    if not 0 <= config.ema_decay < 1:
        raise WgenError(f"--ema-decay {config.ema_decay} must be in [0, 1)", "e.g. 0.999")


def _prepare_output(out: Path, resume: bool, force: bool, fingerprint: str, config: TrainConfig) -> None:
    state_json = out / CHECKPOINT_DIR / "state.json"
    if resume:
        if not state_json.is_file():
            raise WgenError(f"{out}: has no checkpoint to resume from", "run without --resume")
        saved = read_json(state_json)
        if saved.get("source_fingerprint") != fingerprint:
            raise WgenError(f"{out}: the checkpoint was trained on another zoo", "resume with the same zoo")
        if saved.get("config") != config.to_json():
            differing = sorted(k for k, v in config.to_json().items() if saved.get("config", {}).get(k) != v)
            raise WgenError(f"{out}: the checkpoint was trained with other settings ({', '.join(differing)})",
                            "resume with the same options")
        return
    if out.exists() and any(out.iterdir()):
        if not force:
            hint = "pass --resume to continue it" if state_json.is_file() else "choose another -o"
            raise WgenError(f"{out}: exists", f"{hint}, or pass --force to replace it")
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _sample_time(n: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "uniform":
        return torch.rand(n, generator=generator)
    return torch.sigmoid(torch.randn(n, generator=generator))


def _ot_pairing(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Return the order of noise rows that minimises the summed squared distance to the data rows."""
    cost = torch.cdist(x1.float(), x0.float()).pow(2).cpu().numpy()
    _, cols = linear_sum_assignment(cost)
    return torch.as_tensor(cols, device=x0.device)


def _validation_batch(held: torch.Tensor | None, seed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    if held is None:
        return None
    generator = torch.Generator().manual_seed(seed + 99991)
    repeats = max(1, 256 // len(held))
    x0 = torch.randn(repeats * len(held), held.shape[1], generator=generator)
    t = torch.rand(repeats * len(held), generator=generator)
    return x0, t


@torch.no_grad()
def _validation_loss(net: VelocityMLP, ema: list[torch.Tensor], held: torch.Tensor | None,
                     noise: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device) -> float | None:
    """Flow-matching loss of the EMA net on held-out members (fixed noise and times)."""
    if held is None or noise is None:
        return None
    x0, t = (v.to(device) for v in noise)
    x1 = held.repeat(len(x0) // len(held), 1).to(device)
    with _swapped(net, ema):
        prediction = net((1 - t[:, None]) * x0 + t[:, None] * x1, t)
    return float((prediction - (x1 - x0)).pow(2).mean())


class _swapped:
    """Context manager: the net's parameters replaced by ``weights`` (the EMA) inside the block."""

    def __init__(self, net: torch.nn.Module, weights: list[torch.Tensor]) -> None:
        self.net, self.weights = net, weights

    def __enter__(self) -> None:
        self.saved = [p.detach().clone() for p in self.net.parameters()]
        with torch.no_grad():
            for p, w in zip(self.net.parameters(), self.weights):
                p.copy_(w)

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for p, w in zip(self.net.parameters(), self.saved):
                p.copy_(w)


class _nullcontext:
    def __enter__(self) -> None: ...
    def __exit__(self, *exc: Any) -> None: ...


# ------------------------------------------------------------------------------------------------
# checkpoints (safetensors + JSON, no pickle)


def _save_checkpoint(folder: Path, net: VelocityMLP, ema: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, step: int, history: list[dict[str, Any]], ddp: _Distributed,
                     meta: dict[str, Any]) -> None:
    rng = generator.get_state()
    if ddp.world > 1:  # NCCL gathers CUDA tensors only
        device = next(net.parameters()).device
        gathered = [torch.empty_like(rng, device=device) for _ in range(ddp.world)]
        dist.all_gather(gathered, rng.to(device))
        gathered = [g.cpu() for g in gathered]
    else:
        gathered = [rng]
    if not ddp.main:
        return
    tensors = {f"model.{k}": v.detach().cpu() for k, v in net.state_dict().items()}
    tensors.update({f"ema.{i}": e.detach().cpu() for i, e in enumerate(ema)})
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"opt.{index}.{name}"] = value.detach().cpu() if torch.is_tensor(value) else torch.tensor(value)
    tensors.update({f"rng.{r}": g for r, g in enumerate(gathered)})
    state = {"step": step, "world_size": ddp.world, "param_groups": opt["param_groups"], "history": history,
             **meta}
    with atomic_dir(folder) as tmp:
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        atomic_write_json(tmp / "state.json", state)


def _load_checkpoint(folder: Path, net: VelocityMLP, ema: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, ddp: _Distributed) -> tuple[int, list[dict[str, Any]], float]:
    """Restore a checkpoint into the objects given; return its step, loss history and training seconds so far."""
    state = read_json(folder / "state.json")
    if int(state.get("world_size", 1)) != ddp.world:
        raise WgenError(f"{folder}: saved with {state.get('world_size')} processes, resumed with {ddp.world}",
                        "resume with the same number of processes")
    tensors = safetensors.torch.load_file(str(folder / "state.safetensors"))
    device = next(net.parameters()).device
    net.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, e in enumerate(ema):
        e.copy_(tensors[f"ema.{i}"].to(device))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value.to(device) if name != "step" else value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    generator.set_state(tensors[f"rng.{ddp.rank}"])
    return int(state["step"]), list(state["history"]), float(state.get("seconds", 0.0))


def _write_generator(out: Path, zoo: Zoo, space: WeightSpace, net: VelocityMLP, ema: list[torch.Tensor],
                     config: TrainConfig, train_names: list[str], holdout_names: list[str], fingerprint: str,
                     history: list[dict[str, Any]], info: dict[str, Any], seconds: float) -> dict[str, Any]:
    input_size, mean, std = zoo.preprocessing()
    names = [name for name, _ in net.named_parameters()]
    weights = {name: e.detach().cpu().contiguous() for name, e in zip(names, ema)}
    safetensors.torch.save_file(weights, str(out / f".{WEIGHTS_NAME}.tmp"))
    os.replace(out / f".{WEIGHTS_NAME}.tmp", out / WEIGHTS_NAME)
    safetensors.torch.save_file(space.tensors(), str(out / f".{SPACE_NAME}.tmp"))
    os.replace(out / f".{SPACE_NAME}.tmp", out / SPACE_NAME)
    last = history[-1] if history else {}
    generator_config = {
        "format": GENERATOR_FORMAT, "wgen_version": __version__, **zoo.spec.to_json(),
        "input_size": list(input_size), "mean": list(mean), "std": list(std),
        "data": zoo.info.get("data"), "split": zoo.info.get("split"),
        "source": str(zoo.root), "source_fingerprint": fingerprint,
        "canonical": bool(zoo.info.get("canonical")),
        "members": {"train": train_names, "holdout": holdout_names},
        "space": space.to_json(), "net": config.net.to_json(), "net_parameters": info["net_parameters"],
        "training": {**config.to_json(), "device": info["device"], "world_size": info["world_size"],
                     "seconds": round(seconds, 2), "final_loss": last.get("loss"), "final_val_loss": last.get("val_loss")},
        "history": history,
    }
    atomic_write_json(out / CONFIG_NAME, generator_config)
    return generator_config


# ------------------------------------------------------------------------------------------------
# distributed


def _init_distributed(device: torch.device) -> tuple[_Distributed, torch.device]:
    """Join the torchrun process group if there is one; return the ranks and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Distributed(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Distributed(dist.get_rank(), dist.get_world_size()), device


def _on_main_then_all(ddp: _Distributed, action: Any) -> None:
    """Run ``action`` on rank 0; every rank raises the WgenError it raised, or goes on together."""
    message = None
    if ddp.main:
        try:
            action()
        except WgenError as exc:
            message = [exc.message, exc.hint]
    if ddp.world > 1:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        _finish_distributed(ddp)
        raise WgenError(*message)


def _finish_distributed(ddp: _Distributed) -> None:
    if ddp.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()



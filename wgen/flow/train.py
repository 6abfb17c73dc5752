"""Train a generator: conditional flow matching in a weight space, on one device or under torchrun.

Each step draws training members' coordinates ``x1``, fresh noise ``x0`` and times ``t``, pairs noise
and data by an optimal assignment (minibatch OT coupling), and regresses the velocity net on the
straight path's target (``path.py``). AdamW with warm-up and cosine decay, gradient clipping, an EMA
of the weights (what the generator keeps), bf16 autocast on CUDA. All randomness comes from one
torch.Generator whose state is checkpointed, so a resumed run continues bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from ..checkpoints import Zoo, zoo_fingerprint
from ..data import data_for_zoo
from ..errors import WgenError
from ..limits import check_all
from ..optim import warmup_cosine
from ..outputs import prepare_output
from ..progress import SILENT, Progress
from ..tables import Summary
from .checkpoint import CHECKPOINT_DIR, TrainState, load_checkpoint, read_checkpoint_meta, save_checkpoint
from .distributed import Ranks, finish_distributed, init_distributed, on_main_then_all
from .generator import GeneratorConfig, read_generator_config, write_generator
from .nets import DEFAULT_NET, NETS, create_net
from .nets.base import VelocityNet
from .path import TIME_SAMPLING, ot_pairing, point_and_velocity, sample_times
from .spaces import AUTO, SPACES, fit_space, resolve_kind
from .spaces.base import FitContext, FitStopped, Layout, WeightSpace

REPORT_EVERY = 50  # steps between loss reports (and held-out losses)
VALIDATION_POINTS = 256


@dataclass(frozen=True)
class TrainConfig:
    """Every setting that decides the trained generator (the device does not)."""

    space: str = AUTO
    space_args: dict[str, Any] = field(default_factory=dict)  # the space kind's settings, e.g. {"components": 16}
    net: str = DEFAULT_NET
    net_args: dict[str, Any] = field(default_factory=dict)  # the net kind's settings, e.g. {"width": 512}
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
    data: str | None = None  # spaces that train on data (subspace, codes): the dataset, if not the zoo's recorded one

    def to_json(self) -> dict[str, Any]:
        """Return the config as JSON."""
        return asdict(self)

    def check(self) -> None:
        """Raise a WgenError for a setting out of range or a kind that is not registered."""
        if self.space != AUTO:
            SPACES.options(self.space, self.space_args)
        NETS.options(self.net, self.net_args)
        if self.time_sampling not in TIME_SAMPLING:
            raise WgenError(f"unknown --time-sampling {self.time_sampling!r}", f"use one of {', '.join(TIME_SAMPLING)}")
        check_all({"--steps": self.steps, "--batch-size": self.batch_size, "--lr": self.lr,
                   "--weight-decay": self.weight_decay, "--warmup-steps": self.warmup_steps,
                   "--grad-clip": self.grad_clip, "--ema-decay": self.ema_decay, "--holdout": self.holdout,
                   "--seed": self.seed, "--checkpoint-every": self.checkpoint_every})


def split_holdout(names: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Return ``(train, holdout)`` member names; the holdout is a seeded random ``fraction``."""
    count = int(math.floor(fraction * len(names) + 0.5)) if fraction > 0 else 0
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(order[:count])
    return [n for i, n in enumerate(names) if i not in held], [names[i] for i in held]


def train_generator(zoo: Zoo, out: Path, config: TrainConfig, device: torch.device, force: bool = False,
                    progress: Progress = SILENT, stop_after: int | None = None) -> GeneratorConfig | None:
    """Train a generator on ``zoo`` into folder ``out``; return its config (None on ranks other than 0).

    Re-running the same command on ``out`` resumes from its checkpoint (or returns the finished
    generator). ``stop_after`` ends the run after that many steps as if it had been killed (for
    tests): the checkpoint is written, the generator is not, and None is returned.
    """
    config.check()
    ranks, device = init_distributed(device)
    names = [m.name for m in zoo.members]
    train_names, holdout_names = split_holdout(names, config.holdout, config.seed)
    states = {m.name: zoo.load(m) for m in zoo.members}
    fingerprint = zoo_fingerprint(zoo, [states[n] for n in names])
    has_data = config.data is not None or "data" in zoo.info
    kind = resolve_kind(config.space, Layout.from_state(states[names[0]]).dim, has_data)
    resolved = resolved_settings(config, kind)
    finished = (out / "config.json").is_file()
    resume = on_main_then_all(ranks, lambda: prepare_output(
        out, "generator", [zoo.root], force, lambda folder: _same_run(folder, fingerprint, config, resolved)))
    if resume and finished:
        finish_distributed(ranks)
        return read_generator_config(out) if ranks.main else None
    meta = {"source_fingerprint": fingerprint, "config": config.to_json(), "resolved": resolved}
    context = FitContext(device, zoo.spec, zoo.preprocessing()[0], _space_data(zoo, kind, config, ranks), config.seed,
                         progress, out / CHECKPOINT_DIR, meta, stop_after)
    try:
        space = fit_space(kind, config.space_args, [states[n] for n in train_names], context)
    except FitStopped:
        return None
    if space.drawn:
        finish_distributed(ranks)  # a space that trains on data runs as one process (checked above)
        return _write_drawn_generator(out, zoo, space, config, context, fingerprint, train_names, holdout_names)
    coords = space.encode([states[n] for n in train_names]).float()
    held = space.encode([states[n] for n in holdout_names]).float() if holdout_names else None
    del states
    state = _initial_state(space, config, device, ranks)
    if resume:
        load_checkpoint(out / CHECKPOINT_DIR, state, ranks)
    progress.note(f"{space.describe()}; velocity net {state.net.parameter_count():,} parameters; {len(train_names)} training "
                  f"/ {len(holdout_names)} held-out members; {device}" + (f" x{ranks.world}" if ranks.world > 1 else ""))
    seconds = _fit(state, coords, held, config, device, ranks, out / CHECKPOINT_DIR, meta, progress, stop_after)
    if seconds is None:
        finish_distributed(ranks)
        return None
    result = None
    if ranks.main:
        last = state.history[-1] if state.history else {}
        training = _training_record(config, resolved, device, ranks.world, seconds, last.get("loss"), last.get("val_loss"))
        space_config, space_tensors = space.saved()
        result = _generator_config(zoo, space_config, state.net, state.history, fingerprint, train_names,
                                   holdout_names, training)
        write_generator(out, result, space_tensors, state.ema)
    finish_distributed(ranks)
    return result


def _space_data(zoo: Zoo, kind: str, config: TrainConfig, ranks: Ranks) -> Any:
    """Return the zoo's data for a space that trains on it (None for the others); refuse what it cannot do."""
    cls = SPACES.get(kind)
    if cls.drawn and config.net not in (DEFAULT_NET, "none"):
        raise WgenError(f"the {kind} space draws its samples: it has no use for --net {config.net}", "leave --net out")
    if not cls.needs_data:
        return None
    if ranks.world > 1:
        raise WgenError(f"the {kind} space trains on one device", "run wgen train without torchrun")
    return data_for_zoo(zoo.info, config.data, zoo.preprocessing()[0])


def _write_drawn_generator(out: Path, zoo: Zoo, space: WeightSpace, config: TrainConfig, context: FitContext,
                           fingerprint: str, train_names: list[str], holdout_names: list[str]) -> GeneratorConfig:
    """Write and return the generator of a space that draws its samples (no velocity net is trained)."""
    space_config, space_tensors = space.saved()
    fit = space_config["training"]
    training = _training_record(config, context.meta["resolved"], context.device, 1, fit["seconds"], fit["final_loss"],
                                None)
    result = _generator_config(zoo, space_config, create_net("none", {}, space), [], fingerprint, train_names,
                               holdout_names, training)
    if context.data is not None:  # the data the space trained on, which sampling calibrates on
        result.data, result.split = str(context.data.spec), context.data.record()
    write_generator(out, result, space_tensors, {})
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # the corners are in the generator now
    return result


def resolved_settings(config: TrainConfig, kind: str) -> dict[str, Any]:
    """Return the settings ``config`` stands for with every default made explicit: the space kind (``auto``
    resolved) and the full options of its space and net. Recorded with a run, they tell a resume under a wgen
    whose defaults have changed from a resume of the same run."""
    return {"space": kind, "space_options": asdict(SPACES.options(kind, config.space_args)),
            "net_options": asdict(NETS.options(config.net, config.net_args))}


def _training_record(config: TrainConfig, resolved: dict[str, Any], device: torch.device, world_size: int,
                     seconds: float, final_loss: float | None, final_val_loss: float | None) -> dict[str, Any]:
    """Return the generator config's ``training`` record: the settings (as typed and resolved), where it ran,
    its time and final losses."""
    return {**config.to_json(), "resolved": resolved, "device": str(device), "world_size": world_size,
            "seconds": round(seconds, 2), "final_loss": final_loss, "final_val_loss": final_val_loss}


def _same_run(out: Path, fingerprint: str, config: TrainConfig, resolved: dict[str, Any]) -> bool:
    """Return whether ``out`` holds this run (finished or checkpointed); raise naming what differs."""
    meta = read_checkpoint_meta(out / CHECKPOINT_DIR)
    if (out / "config.json").is_file():
        finished = read_generator_config(out)
        meta = {"source_fingerprint": finished.source_fingerprint, "resolved": finished.training.get("resolved"),
                "config": {k: finished.training.get(k) for k in config.to_json()}}
    if meta is None:
        return False
    if meta.get("source_fingerprint") != fingerprint:
        raise WgenError(f"{out}: holds a generator trained on another zoo", "choose another -o, or pass --force to replace it")
    differing = sorted(k for k, v in config.to_json().items() if meta.get("config", {}).get(k) != v)
    differing += _differing_defaults(meta.get("resolved"), resolved) if not differing else []
    if differing:
        raise WgenError(f"{out}: holds a generator trained with other settings ({', '.join(differing)})",
                        "re-run with the same settings to resume, choose another -o, or pass --force to replace it")
    return True


def _differing_defaults(recorded: dict[str, Any] | None, resolved: dict[str, Any]) -> list[str]:
    """Return the resolved settings that differ from a run's ``recorded`` ones, as ``KIND NAME`` (none when the
    run predates the record): with the same settings typed, a default of this wgen differs from the run's."""
    if recorded is None:
        return []
    if recorded.get("space") != resolved["space"]:
        return [f"space: {recorded.get('space')} vs {resolved['space']}"]
    return [f"{kind} {name}: {recorded[part].get(name)} vs {value}"
            for part, kind in (("space_options", resolved["space"]), ("net_options", "net"))
            for name, value in resolved[part].items() if recorded.get(part, {}).get(name) != value]


def _initial_state(space: WeightSpace, config: TrainConfig, device: torch.device, ranks: Ranks) -> TrainState:
    torch.manual_seed(config.seed)
    net = create_net(config.net, config.net_args, space).to(device)
    ema = {name: p.detach().clone() for name, p in net.named_parameters()}
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return TrainState(net, ema, optimizer, torch.Generator().manual_seed(config.seed * 1000 + ranks.rank))


def _fit(state: TrainState, data: torch.Tensor, held: torch.Tensor | None, config: TrainConfig, device: torch.device,
         ranks: Ranks, checkpoints: Path, meta: dict[str, Any], progress: Progress, stop_after: int | None) -> float | None:
    """Run the training steps from ``state.step`` to the end; return the training seconds of every segment,
    or None when ``stop_after`` cut the run short."""
    model = torch.nn.parallel.DistributedDataParallel(state.net) if ranks.world > 1 else state.net
    validation = _validation_set(held, config.seed)
    per_rank = max(1, config.batch_size // ranks.world)
    progress.stage("training", config.steps, state.step)
    started, reported = time.perf_counter(), state.step
    while state.step < config.steps:
        loss = _step(model, state, data, config, device, per_rank)
        if state.step % REPORT_EVERY == 0 or state.step == config.steps:
            val = _validation_loss(state, validation, device)
            state.history.append({"step": state.step, "loss": loss, "val_loss": val})
            progress.advance(state.step - reported, f"loss {loss:.4f}" + (f"  held-out {val:.4f}" if val is not None else ""))
            reported = state.step
        seconds = state.earlier_seconds + time.perf_counter() - started  # all segments of a resumed run
        if state.step % config.checkpoint_every == 0 or state.step in (config.steps, stop_after):
            save_checkpoint(checkpoints, state, ranks, {**meta, "seconds": seconds})
        if stop_after is not None and state.step >= stop_after:
            return None
    return state.earlier_seconds + time.perf_counter() - started


def _step(model: torch.nn.Module, state: TrainState, data: torch.Tensor, config: TrainConfig, device: torch.device,
          batch: int) -> float:
    """Take one optimizer step on a fresh minibatch; return its loss."""
    rng = state.rng
    x1 = data[torch.randint(len(data), (batch,), generator=rng)].to(device)
    x0 = torch.randn(batch, *data.shape[1:], generator=rng).to(device)
    t = sample_times(batch, config.time_sampling, rng).to(device)
    if config.ot_coupling:
        x0 = x0[ot_pairing(x0, x1)]
    xt, target = point_and_velocity(x0, x1, t)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        prediction = model(xt, t)
    loss = (prediction.float() - target).pow(2).mean()
    for group in state.optimizer.param_groups:
        group["lr"] = warmup_cosine(state.step, config.lr, config.warmup_steps, config.steps)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(state.net.parameters(), config.grad_clip)
    state.optimizer.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(state.ema.values()), [p.detach() for p in state.net.parameters()], 1 - config.ema_decay)
    state.step += 1
    return loss.item()


def _validation_set(held: torch.Tensor | None, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Return fixed ``(x0, x1, t)`` on the held-out members (each repeated), or None without any."""
    if held is None:
        return None
    generator = torch.Generator().manual_seed(seed + 99991)
    repeats = max(1, VALIDATION_POINTS // len(held))
    x0 = torch.randn(repeats * len(held), *held.shape[1:], generator=generator)
    t = torch.rand(repeats * len(held), generator=generator)
    return x0, held.repeat(repeats, *([1] * (held.ndim - 1))), t


@torch.no_grad()
def _validation_loss(state: TrainState, validation: tuple[torch.Tensor, ...] | None, device: torch.device) -> float | None:
    """Return the flow-matching loss of the EMA weights on the held-out members (fixed noise and times)."""
    if validation is None:
        return None
    x0, x1, t = (v.to(device) for v in validation)
    xt, target = point_and_velocity(x0, x1, t)
    return float((functional_call(state.net, state.ema, (xt, t)) - target).pow(2).mean())


def _generator_config(zoo: Zoo, space_config: dict[str, Any], net: VelocityNet, history: list[dict[str, Any]],
                      fingerprint: str, train_names: list[str], holdout_names: list[str],
                      training: dict[str, Any]) -> GeneratorConfig:
    input_size, mean, std = zoo.preprocessing()
    return GeneratorConfig(
        zoo.spec, list(input_size), list(mean), list(std), zoo.info.get("data"), zoo.info.get("split"), str(zoo.root),
        fingerprint, bool(zoo.info.get("canonical")), train_names, holdout_names, space_config,
        net.config(), net.parameter_count(), training, history)


def generator_summary(config: GeneratorConfig, out: Path) -> Summary:
    """Return what ``wgen train`` shows: the generator's space, net, members and final losses."""
    t, space = config.training, config.space
    val = t["final_val_loss"]
    return Summary(lines=[
        f"generator {out}: {config.spec.architecture}, {space['kind']} space ({space['values']:,} weights), "
        f"{config.net['kind']} velocity net of {config.net_parameters:,} parameters; {len(config.train_members)} "
        f"training, {len(config.holdout_members)} held-out members",
        f"{steps_text(config)} in {t['seconds']:.1f}s on {t['device']}: loss {t['final_loss']:.4f}"
        + (f", held-out loss {val:.4f}" if val is not None else "")])


def steps_text(config: GeneratorConfig) -> str:
    """Return what was trained: the flow's steps, or a drawn space's own training."""
    fit = config.space.get("training")
    if config.net["kind"] == "none" and fit:
        return f"{fit['steps']} {config.space['kind']} steps ({fit['epochs']:g} epochs on the train split)"
    return f"{config.training['steps']} steps"

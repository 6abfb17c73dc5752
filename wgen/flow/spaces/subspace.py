"""The ``subspace`` weight space: a simplex of networks whose every point is trained to be accurate.

Its corners start as the aligned training members. ``fit`` trains them on the zoo's train split so
that the network at *any* point of the simplex classifies well: each step mixes the corners'
parameters in fresh Dirichlet(1) proportions and takes one optimizer step on the mixed network's
loss (the method of Wortsman et al., ICML 2021, "Learning Neural Network Subspaces", started from an
aligned zoo instead of random inits; from random inits it measured 64% where the zoo reaches 93%).
A sample is the network at a random point: a mix of every corner, far from each training member in
weights and in predictions (docs/benchmarks.md).

With ``simplices`` S > 1 the corners form S independent simplices of equal size, trained at once: each
step splits its batch among them, so training costs what one simplex costs. Each converges to its own
function; a sample is a point of one of them, chosen uniformly, so samples disagree more with each other
and an ensemble of them gains more, but each sample is a little more like its simplex's members
(docs/benchmarks.md). The default takes one simplex per 12 corners: two for a zoo of 24 training members.

No velocity net learns anything here: a sample's noise *is* its point (``drawn``), turned into
Dirichlet(1) proportions through exponentials, ``-log Phi(z)``; with S > 1 one more coordinate picks
the simplex, ``floor(S Phi(z))``. BatchNorm statistics of a mix fit
no corner, so samples of a BatchNorm network are calibrated on the train split (``calibrates``).
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.special
import torch
import torch.nn.functional as F
from torch.func import functional_call

from ...errors import WgenError
from ...limits import check_all
from ...optim import warmup_cosine
from ..checkpoint import load_optimizer, optimizer_tensors, part, read_state, write_state
from .base import FitContext, FitStopped, Layout, StateDict, WeightSpace, load_layout, saved_layout

LOSS_WINDOW = 50  # steps averaged into the reported loss
CHECKPOINT_EVERY = 200  # steps between resumable checkpoints
EPOCH_SEEDS = 1_000_003  # epoch e of seed s is shuffled by s * EPOCH_SEEDS + e ...
STEP_SEEDS = 1_000_000_007  # ... and step t mixes the corners by noise seeded s * STEP_SEEDS + t
# Auto simplices: one per 12 corners, each with at least 64 examples of a batch. On the val split of test_vit,
# 2 simplices of 12 met every bar of the novelty protocol where one of 24 missed the ensemble bar; 3 of 8 and
# 4 of 6 lost accuracy; parts under 64 examples were not tried (docs/benchmarks.md).
CORNERS_PER_SIMPLEX = 12
MIN_PART = 64


@dataclass(frozen=True)
class SubspaceOptions:
    """How the simplex is trained: epochs over the train split, AdamW settings, corners."""

    epochs: float = 90.0  # with lr, chosen on the val split of digits-hard (test_vit: 90 beat 60 on every bar)
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.0
    warmup_steps: int = 100
    corners: int = 0  # 0: every training member is a corner
    simplices: int = 0  # independent simplices the corners are split into (equally; a remainder is left out); 0: auto
    alpha: float = 1.0  # the Dirichlet(alpha) of every mix, in training and in samples (under 1: nearer the corners)

    def limited(self) -> dict[str, float]:
        """Return ``{option: value}`` of every setting with a range in ``limits.LIMITS``."""
        return {"--lr": self.lr, "--batch-size": self.batch_size, "--weight-decay": self.weight_decay,
                "--warmup-steps": self.warmup_steps, "--subspace-epochs": self.epochs, "--corners": self.corners,
                "--simplices": self.simplices, "--alpha": self.alpha}

    def check(self) -> None:
        """Raise a WgenError for a setting out of its range."""
        check_all(self.limited())
        if self.batch_size < 2 * self.simplices:
            raise WgenError(f"--batch-size {self.batch_size} splits into fewer than 2 examples a simplex",
                            f"use --batch-size {2 * self.simplices} or more, or fewer --simplices")

    def resolved(self, corners: int) -> SubspaceOptions:
        """Return these options for ``corners`` corners with ``simplices`` made explicit (auto: one per 12 corners,
        never parts of a batch under 64 examples), or raise a WgenError when a simplex would get fewer than 2."""
        simplices = self.simplices or max(1, min(corners // CORNERS_PER_SIMPLEX, self.batch_size // MIN_PART))
        if corners // simplices < 2:
            raise WgenError(f"--simplices {simplices} leaves fewer than 2 of the {corners} corners a simplex",
                            f"use --simplices {corners // 2} or fewer")
        return replace(self, simplices=simplices)


def simplex_of(noise: torch.Tensor, simplices: int) -> torch.Tensor:
    """Return the simplex index ``floor(simplices * Phi(z))`` (uniform on ``0..simplices-1``) of standard normal ``noise``."""
    return (torch.special.ndtr(noise.double()) * simplices).long().clamp_(0, simplices - 1)


def proportions(noise: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Return Dirichlet(``alpha``) proportions ``[..., K]`` from standard normal ``noise`` ``[..., K]``.

    ``Phi(z)`` of a standard normal ``z`` is uniform, so the inverse CDF of Gamma(alpha) at it is a Gamma(alpha) draw
    (for alpha 1 the map is ``-log Phi(z)``, an Exponential(1) draw), and normalised Gamma draws are Dirichlet(alpha):
    exact, deterministic and smooth. Alpha under 1 puts the points nearer the corners, over 1 nearer the centre.
    """
    if alpha == 1.0:
        draws = -torch.special.log_ndtr(noise.double())
    else:
        uniform = torch.special.ndtr(noise.double()).clamp(torch.finfo(torch.float64).tiny, 1.0).cpu().numpy()
        draws = torch.from_numpy(scipy.special.gammaincinv(alpha, uniform)).to(noise.device)
    return (draws / draws.sum(dim=-1, keepdim=True)).to(noise.dtype)


class DrawnSpace(WeightSpace):
    """A space whose samples are drawn as points of ``simplices`` simplices of ``per_simplex`` corners each: the
    coordinates are the standard normal noise of a point (``proportions``), then of each of ``parts`` parts' own
    point when parts of a network mix on their own, and, with more than one simplex, of its simplex (``simplex_of``,
    last). Members have no coordinates."""

    simplices: int
    parts: int = 0  # parts of a network (groups, units) in proportions of their own: k more coordinates each
    training: dict[str, Any]
    sample_alpha: float | None = None  # the Dirichlet parameter samples are drawn with, if not the training's

    @property
    def alpha(self) -> float:
        """Return the Dirichlet parameter of its mixes: ``sample_alpha`` when set, else the training's (1 in
        generators from before the option)."""
        return self.sample_alpha if self.sample_alpha is not None else float(self.training.get("alpha", 1.0))

    @property
    def per_simplex(self) -> int:
        """Return the number of corners of each simplex."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.per_simplex * (1 + self.parts) + (self.simplices > 1),)

    def encode(self, states: list[StateDict]) -> torch.Tensor:
        raise WgenError(f"a {self.kind} generator has no coordinates for members: its samples are drawn, not flowed",
                        "sample it with wgen sample")


class SubspaceSpace(DrawnSpace):
    """Coordinates: the standard normal noise of a point of the simplex; raw vector: the corners' mix."""

    Options = SubspaceOptions
    drawn = True
    calibrates = True
    needs_data = True

    def __init__(self, layout: Layout, corners: torch.Tensor, training: dict[str, Any]) -> None:
        super().__init__(layout)
        self.corners = corners  # [S * K, layout.dim], raw vectors, simplex by simplex
        self.training = training
        self.simplices = int(training.get("simplices", 1))  # generators from before the option have one

    @property
    def per_simplex(self) -> int:
        """Return the number of corners of each simplex."""
        return len(self.corners) // self.simplices

    @classmethod
    def fit(cls, states: list[StateDict], options: SubspaceOptions, context: FitContext) -> SubspaceSpace:
        if context.data is None or context.spec is None:
            raise WgenError("the subspace space trains on data, and the zoo records none",
                            "pass --data SPEC to wgen train (the dataset the zoo was trained on)")
        count = options.corners or len(states)
        if not 2 <= count <= len(states):
            raise WgenError(f"--corners {count} needs 2 to {len(states)} training members",
                            "lower --corners, or train a larger zoo")
        options = options.resolved(count)
        count -= count % options.simplices
        chosen = states[:count]
        layout = Layout.from_state(chosen[0])
        params, losses, seconds = _train_corners(chosen, options, context)
        rows = [layout.flatten({**state, **{k: v[i].detach().cpu() for k, v in params.items()}})
                for i, state in enumerate(chosen)]
        training = {**asdict(options), "corners": count, "steps": len(losses), "final_loss": round(recent_loss(losses), 5),
                    "seconds": round(seconds, 2)}
        return cls(layout, torch.stack(rows).to(context.device), training)

    @classmethod
    def load(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> SubspaceSpace:
        return cls(load_layout(config, tensors), tensors["corners"], dict(config["training"]))

    def saved(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config, tensors = saved_layout(self.kind, self.layout, None,
                                       {"corners": len(self.corners), "training": self.training})
        tensors["corners"] = self.corners.cpu().contiguous()
        return config, tensors

    def vectors(self, coords: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        coords = coords.to(self.corners.device).float()
        if self.simplices == 1:
            return torch.matmul(proportions(coords, self.alpha), self.corners, out=out)
        k = self.per_simplex
        mix, which = proportions(coords[:, :k], self.alpha), simplex_of(coords[:, k], self.simplices)
        out = torch.empty(len(coords), self.corners.shape[1], device=self.corners.device) if out is None else out
        for s in which.unique().tolist():
            rows = which == s
            out[rows] = mix[rows] @ self.corners[s * k:(s + 1) * k]
        return out

    def describe(self) -> str:
        t = self.training
        simplices = f"{self.simplices} simplices of {self.per_simplex}" if self.simplices > 1 else str(len(self.corners))
        return (f"subspace of {simplices} corners over {self.layout.dim:,} weights, trained "
                f"{t['steps']} steps ({t['epochs']:g} epochs)")


def _train_corners(states: list[StateDict], options: SubspaceOptions, context: FitContext
                   ) -> tuple[dict[str, torch.Tensor], list[float], float]:
    """Return the trained corners' parameters ``{name: [K, ...]}``, the loss of every step and the seconds spent."""
    model, buffers = mixing_network(states[0], context)
    params = {k: torch.stack([s[k] for s in states]).to(context.device).float().requires_grad_(True)
              for k, _ in model.named_parameters()}
    losses, seconds, _ = train_mixtures(
        params, lambda mix, x, _, y, __: _mixed_loss(model, params, buffers, mix[0], x, y), len(states), options,
        context, "subspace", "corners.")
    return params, losses, seconds


def mixing_network(first: StateDict, context: FitContext) -> tuple[torch.nn.Module, StateDict]:
    """Return the zoo's network in training mode on ``context.device`` (seeded by ``context.seed``) and the buffers
    every mix runs with: ``first``'s (training mode normalises with batch statistics, so they are not read)."""
    torch.manual_seed(context.seed)
    model = context.spec.create(context.device).train()
    names = {name for name, _ in model.named_parameters()}
    return model, {k: v.to(context.device).clone() for k, v in first.items() if k not in names}


def train_mixtures(params: dict[str, torch.Tensor], mixed_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor,
                   torch.Tensor, int], torch.Tensor], corners: int, options: SubspaceOptions, context: FitContext,
                   stage: str, prefix: str, draws: int = 1, parts: int = 0, targets: torch.Tensor | None = None,
                   restarts: int = 0, restart_epochs: float = 0.0,
                   fresh: Callable[[int], dict[str, torch.Tensor]] | None = None
                   ) -> tuple[list[float], float, list[dict[str, torch.Tensor]]]:
    """Train ``params`` (AdamW, warmup and cosine) on ``mixed_loss(mix, x, y, target, cycle)`` of the train split's
    batches (``cycle``: the restart cycle the step is in, 0 before the first restart),
    ``mix`` ``[draws, simplices, corners // simplices]`` fresh Dirichlet(1) proportions every step (with ``parts`` > 0,
    ``[draws, simplices, 1 + parts, corners // simplices]``: the network's, then each part's), ``target`` what the
    cross-entropy fits: the labels ``y``, or the rows of ``targets`` ``[train examples, classes]`` (distributions, in
    the train split's order) if given; of ``targets`` ``[teachers, train examples, classes]``, simplex ``s``'s part of
    the batch in cycle ``c`` takes teacher ``(c * simplices + s) % teachers``'s rows (``batch_targets``). After
    ``options.epochs`` come ``restarts`` warm restarts of ``restart_epochs`` each: the optimizer's state is dropped and
    the lr warms up and decays again, from where the params are (a snapshot ensemble's cycles, Huang et al., ICLR
    2017); with ``fresh``, restarts are cold: cycle ``c`` starts from the params ``fresh(c)`` instead, an independent
    run. Return the loss of every step, the seconds spent and the params as they
    were at the end of every cycle but the last (CPU copies; the last is ``params``). Resumes from (and every
    ``CHECKPOINT_EVERY`` steps writes, tensors under ``prefix``) ``context.checkpoints``.

    Step ``s`` sees the batches of epoch ``s // per_epoch`` in the order seeded by that epoch, and mixes the
    corners by noise seeded by ``s``: a resumed run takes exactly the steps an uninterrupted one would.
    """
    device, data, simplices = context.device, context.data, options.simplices
    optimizer = torch.optim.AdamW(params.values(), lr=options.lr, weight_decay=options.weight_decay)
    examples = len(data.indices["train"])
    smallest = 2 * simplices  # every simplex's part of a batch needs 2 examples for batch statistics
    per_epoch = examples // options.batch_size + (examples % options.batch_size >= smallest)
    cycles = [max(1, math.ceil(options.epochs * per_epoch))] + [max(1, math.ceil(restart_epochs * per_epoch))] * restarts
    starts = list(itertools.accumulate(cycles, initial=0))  # the first step of every cycle, then the total
    total = starts[-1]
    settings = {"simplices": simplices, "lr": options.lr}  # a resume under other ones is refused (_resume)
    losses, earlier, snapshots = _resume(context.checkpoints, params, optimizer, device, settings, prefix)
    started = time.perf_counter()
    context.progress.stage(stage, total, len(losses))
    while len(losses) < total:
        epoch, offset = divmod(len(losses), per_epoch)
        shuffle = torch.Generator().manual_seed(context.seed * EPOCH_SEEDS + epoch)
        usable = (rows for rows in data.positions("train", options.batch_size, shuffle) if len(rows) >= smallest)
        for rows in itertools.islice(usable, offset, None):
            x, y = data.batch(data.indices["train"][rows])
            step = len(losses)
            cycle = bisect.bisect_right(starts, step) - 1
            if step in starts[1:-1]:  # a restart (a resumed run has only the snapshots of earlier ones)
                snapshots.append({k: v.detach().cpu().clone() for k, v in params.items()})
                optimizer.state.clear()
                if fresh is not None:
                    with torch.no_grad():
                        for name, value in fresh(cycle).items():
                            params[name].copy_(value)
            target = y if targets is None else batch_targets(targets, rows, simplices, cycle)
            seed = context.seed * STEP_SEEDS + step
            noise = torch.randn(draws * corners * (1 + parts), generator=torch.Generator().manual_seed(seed))
            shape = (draws, simplices, 1 + parts, -1) if parts else (draws, simplices, -1)
            mix = proportions(noise.view(shape), options.alpha).to(device)
            loss = mixed_loss(mix, x.to(device), y.to(device), target.to(device), cycle)
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step - starts[cycle], options.lr, options.warmup_steps, cycles[cycle])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise WgenError(f"{stage} training diverged (loss {losses[-1]}) at step {len(losses)}",
                                "lower the lr (--space-args '{\"lr\": 1e-4}')")
            context.progress.advance(1, f"loss {recent_loss(losses):.4f}")
            seconds = earlier + time.perf_counter() - started
            if context.checkpoints is not None and (len(losses) % CHECKPOINT_EVERY == 0 or len(losses) == context.stop_after):
                _save(context.checkpoints, params, optimizer, losses, seconds, {**context.meta, **settings}, prefix,
                      snapshots)
            if context.stop_after is not None and len(losses) >= context.stop_after:
                raise FitStopped
            if len(losses) == total:
                break
    return losses, earlier + time.perf_counter() - started, snapshots


def batch_targets(targets: torch.Tensor, rows: np.ndarray, simplices: int, cycle: int) -> torch.Tensor:
    """Return the targets of the batch ``rows``: rows of ``targets`` ``[train examples, classes]``, or of
    ``[teachers, train examples, classes]`` with simplex ``s``'s part of the batch (``tensor_split`` order) from
    teacher ``(cycle * simplices + s) % teachers``."""
    if targets.dim() == 2:
        return targets[rows]
    return torch.cat([targets[(cycle * simplices + s) % len(targets), part]
                      for s, part in enumerate(torch.as_tensor(rows).tensor_split(simplices))])


def _mixed_loss(model: torch.nn.Module, params: dict[str, torch.Tensor], buffers: StateDict, mix: torch.Tensor,
                x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Return the cross-entropy of the batch ``(x, y)`` split among the simplices: part ``s`` goes through the
    network at proportions ``mix[s]`` of simplex ``s``'s corners (``params`` hold them simplex by simplex)."""
    simplices, k = mix.shape
    return split_loss(model, lambda s: {name: torch.tensordot(mix[s], v[s * k:(s + 1) * k], dims=1)
                                        for name, v in params.items()}, buffers, simplices, x, y)


def split_loss(model: torch.nn.Module, network: Callable[[int], StateDict], buffers: StateDict, simplices: int,
               x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Return the cross-entropy of the batch ``(x, y)`` (``y``: labels, or class distributions) split in ``simplices``
    parts in order, part ``s`` through the parameters ``network(s)`` (with ``buffers``), each weighed by its share."""
    loss = x.new_zeros(())
    for s, (xs, ys) in enumerate(zip(x.tensor_split(simplices), y.tensor_split(simplices))):
        loss = loss + F.cross_entropy(functional_call(model, {**network(s), **buffers}, (xs,)), ys) * (len(ys) / len(y))
    return loss


def recent_loss(losses: list[float]) -> float:
    """Return the mean loss of the last ``LOSS_WINDOW`` steps."""
    recent = losses[-LOSS_WINDOW:]
    return sum(recent) / max(1, len(recent))


def _save(folder: Path, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, losses: list[float],
          seconds: float, meta: dict[str, Any], prefix: str, snapshots: list[dict[str, torch.Tensor]]) -> None:
    tensors, groups = optimizer_tensors(optimizer)
    tensors.update({f"{prefix}{k}": v.detach().cpu() for k, v in params.items()})
    tensors.update({f"snapshot{j}.{k}": v for j, snapshot in enumerate(snapshots) for k, v in snapshot.items()})
    write_state(folder, tensors, {"step": len(losses), "losses": losses, "seconds": seconds, "param_groups": groups,
                                  "snapshots": len(snapshots), **meta})


def _resume(folder: Path | None, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
            device: torch.device, settings: dict[str, Any], prefix: str
            ) -> tuple[list[float], float, list[dict[str, torch.Tensor]]]:
    """Restore a checkpoint of ``folder`` into ``params`` and ``optimizer``; return its losses, seconds and the
    snapshots of the cycles it had finished.

    A checkpoint written under other ``settings`` (``simplices``, ``lr``: say, before a default changed, which the
    recorded options cannot show when the default is resolved in training, as the codes space's auto lr is) is
    refused. Checkpoints from before the record trained one simplex; their lr cannot be told."""
    saved = read_state(folder) if folder is not None else None
    if saved is None or "losses" not in saved[1]:
        return [], 0.0, []
    tensors, info = saved
    recorded = {"simplices": info.get("simplices", 1), "lr": info.get("lr", settings["lr"])}
    for name, value in settings.items():
        if recorded[name] != value:
            raise WgenError(f"{folder}: a checkpoint trained with {name} {recorded[name]:g}, and this run trains with "
                            f"{value:g}", "pass --force to start again (the checkpoint of an older wgen, whose "
                            "default differed)")
    with torch.no_grad():
        for k, v in part(tensors, prefix).items():
            params[k].copy_(v.to(device))
    load_optimizer(optimizer, tensors, info["param_groups"], device)
    snapshots = [part(tensors, f"snapshot{j}.") for j in range(info.get("snapshots", 0))]
    return list(info["losses"]), float(info["seconds"]), snapshots

"""The ``codes`` weight space (the default): per-unit codes, one small decoder shared by every unit, a random base.

Each corner is a set of *codes*: one vector of ``code_dim`` values per unit of each permutation group
(``permute/groups.py``), plus the few tensors no group indexes (a classifier's bias, attention's qkv bias),
kept whole. A per-tensor decoder makes a weight matrix or kernel from the codes of the units it joins: entry
``W[j, i, ...]`` is ``base[j, i, ...] + U gelu(P c_j + Q c_i + b)``, its kernel (and any axis no group
permutes) the output of ``U``; a vector (bias, norm) is ``U gelu(P c_j + b)``. The base is random, drawn from
the generator's seed (one per simplex) and never stored: trained weights cannot be squeezed into codes
(fitted to the members, codes of 32 values a unit left 90-99% of the large convolutions' energy
unexplained), but a random network plus a low-complexity change trains well. The base is where training starts:
once trained, the change of a convolution followed by BatchNorm (whose scale does not matter) is 50-100 times its
base (``benchmarks/codes_anatomy.py``). What is stored grows with the
number of units and tensors, not with the parameters: a convolution's weights grow with the square of its
width, its codes with the width (``stored_values``).

``fit`` trains codes and decoder on the zoo's train split as the ``subspace`` space trains its corners
(``subspace.train_mixtures``): every step mixes each simplex's codes in fresh Dirichlet(1) proportions,
decodes the mix and takes one step on the decoded network's loss. The members lend the scale of every
tensor, the mean of every vector and their number of corners; their weights are not a starting point (a
fresh base is). With ``diversity`` > 0 each step draws two mixes a simplex and adds
``diversity`` times ``error_overlap`` (how alike their wrong answers are) to their mean loss, which makes samples
differ more and each a little less accurate. With ``ensemble`` > 0 each step also draws two mixes a simplex, and
a share ``ensemble`` of their loss is that of their averaged prediction (``joint_cross_entropy``): two random
samples are trained to make a good pair, which is what an ensemble of samples asks. With ``mixing`` "group" (or
"unit") the codes of every permutation group (every unit) mix the simplex's corners in proportions of their own,
in training and in samples: a sample is a mosaic of the corners' pieces, which the shared decoder learns to make
work together, and its coordinates hold one point a group (unit) more. With ``decoders`` "simplex" every simplex
has a decoder of its own (the default, "shared", decodes every simplex with one), so samples of two simplices share
no learnt weight, only the members' scales and means. With ``distill`` > 0 each train example's
target is its label (one-hot) times 1 - ``distill`` plus ``distill`` times the training members' mean prediction
(``distilled_targets``, computed once before training): the members lend what they learned, not their weights,
and every sample grows more accurate; with ``teachers`` "member" each simplex of each snapshot learns from one
member's prediction instead (in turn), in the hope that the simplices would differ as the members do (on test_vit's
val split they did not: disagreement 13.9% against the mean's 13.8%). With ``snapshots`` N > 1 the generator keeps
N sets of simplices: after cold restarts (``restart`` "cold", the default) each is an independent run of ``epochs``
from a base, codes and decoder of its own, N times the training, so that the samples differ more (on test_resnet's
val split four cold snapshots' samples disagree on 9.1% of the images, fresh runs on 7.05%, four warm ones' on 6.65%)
and an ensemble of them gains more; after warm ones each goes on from the one before for ``restart_epochs``. Four
cold snapshots (the default) met the protocol's every bar on both zoos, val and test (docs/benchmarks.md). A sample
is the decoded mix at a random point; its noise *is* its point (``drawn``).
BatchNorm statistics are not generated (decoded as mean 0, variance 1): samples are calibrated on the train split
(``calibrates``). On the val splits the samples of one snapshot (a mix a group) are new networks, a little more
accurate than fresh runs on test_resnet (on one build of its zoo; 1.3 points less on another, so one run decides
little) and a quarter point less on test_vit, but an ensemble of them misses the protocol's bar on both; ``distill``
0.25 meets it on test_vit's (not on its test split, within noise) and widens the miss on test_resnet's
(docs/benchmarks.md). Four cold snapshots meet it on both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ...errors import WgenError
from ...metrics import has_batchnorm, stacked_logits
from .base import MIN_SCALE, FitContext, Layout, Slot, StateDict, load_layout, saved_layout
from .subspace import (DrawnSpace, SubspaceOptions, mixing_network, proportions, recent_loss, simplex_of, split_loss,
                       train_mixtures)
from .units import GroupAxes, group_sizes, unit_groups

STATISTICS = ("running_mean", "running_var")  # BatchNorm buffers: re-estimated, not generated
MIXINGS = ("network", "group", "unit")  # what mixes its simplex's corners in proportions of its own
DECODERS = ("shared", "simplex")  # one decoder for every simplex, or one a simplex
TEACHERS = ("mean", "member")  # whose prediction ``distill`` blends in: every member's mean, or one member a simplex
RESTARTS = ("warm", "cold")  # a snapshot goes on from the one before, or starts afresh (base, codes and decoder)
# A cold snapshot j draws its bases and first codes from seeds offset by j * SNAPSHOT_SEEDS. The CPU generator keeps a
# seed's low 32 bits only, so the offset is small, yet above any tensor's index (a base's seed is seed * 100_003 +
# index): no two tensors of one generator share a seed.
SNAPSHOT_SEEDS = 65_537
TEACHERS_PER_PASS = 8  # members whose logits on the train split are held at once ([8, examples, classes])


@dataclass(frozen=True)
class CodeOptions(SubspaceOptions):
    """The subspace's training settings (lr chosen by the network, see ``learning_rate``), the sizes of the codes
    and of the decoder's hidden layer, the loss's extra terms and the snapshots. Chosen on the val splits of
    test_resnet and test_vit (docs/benchmarks.md)."""

    lr: float = 0.0  # 0: auto (learning_rate)
    code_dim: int = 128
    hidden: int = 64
    corners: int = 8  # code sets, any number (they do not start from members); 0: one per training member
    simplices: int = 2
    diversity: float = 0.0  # weight of the term that makes two mixes of a simplex err differently; > 0: two a step
    ensemble: float = 0.0  # share of two mixes' joint loss (their averaged prediction's) in the loss; > 0: two a step
    # (0.5 lifted test_vit's samples and ensemble on its val split, not test_resnet's, docs/benchmarks.md)
    distill: float = 0.0  # share of the training members' mean prediction in each train example's target (0.25 met
    # every bar on test_vit's val split and lost test_resnet's ensemble, docs/benchmarks.md)
    teachers: str = "mean"  # one of TEACHERS: "member" distills each simplex of each snapshot from one training
    # member's prediction (in turn) instead of every simplex from their mean (no more diverse samples on test_vit's
    # val split, test_resnet's ensemble still short: docs/benchmarks.md)
    mixing: str = "group"  # one of MIXINGS: each group's codes mix in proportions of their own (more accurate, more
    # diverse samples than one mix a network on both val splits, docs/benchmarks.md)
    decoders: str = "shared"  # one of DECODERS: "simplex" gives each simplex a decoder of its own (simplices times the
    # decoder's values), so no two simplices share a learnt weight
    snapshots: int = 4  # codes and decoder kept at the end of the training and of snapshots - 1 restarts after it
    # (warm or cold, ``restart``; each a set of simplices of its own: snapshots times the stored values and, cold,
    # times the training; 4 cold met every bar on both zoos, docs/benchmarks.md)
    restart_epochs: float = 15.0  # epochs of each warm restart
    restart: str = "cold"  # one of RESTARTS: "cold" trains every snapshot as an independent run of ``epochs`` from a
    # base, codes and decoder of its own (a non-default ``restart_epochs`` refused), so they share only members' scales

    @property
    def stacked_decoders(self) -> int:
        """Return how many decoders are stacked in each decoder tensor: one a simplex, or 0 for one shared decoder."""
        return self.simplices if self.decoders == "simplex" else 0

    def limited(self) -> dict[str, float]:
        """Return ``{option: value}`` of every setting with a range (an auto lr has none)."""
        limited = {**super().limited(), "--code-dim": self.code_dim, "--hidden": self.hidden,
                   "--diversity": self.diversity, "--ensemble": self.ensemble, "--distill": self.distill,
                   "--snapshots": self.snapshots, "--restart-epochs": self.restart_epochs}
        return {k: v for k, v in limited.items() if (k, v) != ("--lr", 0.0)}

    def check(self) -> None:
        """Raise a WgenError for a setting out of its range."""
        super().check()
        if self.corners == 1:
            raise WgenError("--corners 1 spans no simplex", "use --corners 2 or more (0: one per training member)")
        if self.mixing not in MIXINGS:
            raise WgenError(f"--mixing {self.mixing!r} is not one of {', '.join(MIXINGS)}",
                            "use \"network\" (one mix a network), \"group\" (one a permutation group) or \"unit\"")
        if self.decoders not in DECODERS:
            raise WgenError(f"--decoders {self.decoders!r} is not one of {', '.join(DECODERS)}",
                            "use \"shared\" (one decoder for every simplex) or \"simplex\" (one a simplex)")
        if self.restart not in RESTARTS:
            raise WgenError(f"--restart {self.restart!r} is not one of {', '.join(RESTARTS)}",
                            "use \"warm\" (a snapshot goes on from the one before) or \"cold\" (each starts afresh)")
        if self.restart == "cold" and self.restart_epochs != CodeOptions.restart_epochs:
            raise WgenError(f"--restart-epochs {self.restart_epochs:g} is unused with --restart cold",
                            "a cold snapshot trains for --epochs like the first; drop restart_epochs")
        if self.teachers not in TEACHERS:
            raise WgenError(f"--teachers {self.teachers!r} is not one of {', '.join(TEACHERS)}",
                            "use \"mean\" (the members' mean prediction) or \"member\" (one member's a simplex)")
        if self.teachers != "mean" and not self.distill:
            raise WgenError(f"--teachers {self.teachers} has nothing to teach with --distill 0",
                            "add a distillation share, e.g. --space-args "
                            "'{\"distill\": 0.25, \"teachers\": \"member\"}'")


def learning_rate(model: torch.nn.Module) -> float:
    """Return the auto lr for ``model``: 1e-2 with BatchNorm, 3e-3 without.

    Behind BatchNorm a convolution's scale does not matter and the codes' weights grow (to 50-100 times the
    members' on test_resnet), which shrinks every later step relative to them: 1e-2 trained best there (2e-2
    worse). Without it the weights' scale is the function: on test_vit 1e-2 never left chance, 1e-3 learned and
    3e-3 learned faster and made more accurate samples (5e-3 no better; docs/benchmarks.md).
    """
    return 1e-2 if has_batchnorm(model) else 3e-3


@dataclass(frozen=True)
class Plan:
    """How one tensor is decoded: the groups of its unit axes (in axis order), the rest as the MLP's output."""

    slot: Slot
    groups: tuple[int, ...]  # group index of each unit axis
    unit_axes: tuple[int, ...]
    rest_axes: tuple[int, ...]

    @property
    def outputs(self) -> int:
        """Return the number of values the MLP makes per cell (the product of the non-unit axes)."""
        return math.prod(self.slot.shape[a] for a in self.rest_axes)

    @property
    def free(self) -> bool:
        """Return whether no group indexes the tensor (it is kept whole, per corner)."""
        return not self.groups


def plans_of(layout: Layout, groups: list[GroupAxes]) -> list[Plan]:
    """Return the decoding plan of every generated tensor of ``layout`` (BatchNorm statistics excluded)."""
    of_axis = {(key, axis): g for g, axes in enumerate(groups) for key, axis in axes}
    plans = []
    for slot in layout.slots:
        if slot.key.endswith(STATISTICS):
            continue
        unit_axes = tuple(a for a in range(len(slot.shape)) if (slot.key, a) in of_axis)
        rest = tuple(a for a in range(len(slot.shape)) if a not in unit_axes)
        plans.append(Plan(slot, tuple(of_axis[(slot.key, a)] for a in unit_axes), unit_axes, rest))
    return plans


def has_base(plan: Plan) -> bool:
    """Return whether the tensor is a weight matrix or kernel (a random base plus a decoded change)."""
    return not plan.free and len(plan.slot.shape) >= 2


def random_bases(plans: list[Plan], scales: dict[str, float], seed: int, simplices: int, snapshots: int = 1
                 ) -> dict[str, torch.Tensor]:
    """Return each simplex's random base ``{key: [snapshots * simplices, *shape]}`` of every weight matrix and kernel:
    standard normal values times the tensor's scale, drawn on the CPU from ``seed`` (so the same on every device),
    snapshot by snapshot (cold snapshots have bases of their own; snapshot 0's are those of one snapshot)."""
    bases = {}
    for index, plan in enumerate(plans):
        if has_base(plan):
            key = plan.slot.key
            draws = [torch.randn(simplices, *plan.slot.shape,
                                 generator=torch.Generator().manual_seed(seed * 100_003 + index + j * SNAPSHOT_SEEDS))
                     for j in range(snapshots)]
            bases[key] = (draws[0] if snapshots == 1 else torch.cat(draws)) * scales[key]
    return bases


class Decoder:
    """Functional decoder: codes ``{group: [B, units, d]}`` and free tensors -> the generated tensors.

    A generator of ``snapshots`` warm restarts holds ``snapshots`` times ``S`` simplices (``S``: the bases' first
    axis): simplex ``t`` is simplex ``t % S`` of snapshot ``t // S``, on base ``t % S``, decoded by the snapshot's
    decoder (or by its own where there is one a simplex). After ``cold`` restarts every simplex has a base of its own
    (the bases' first axis holds them all): simplex ``t`` is on base ``t``."""

    def __init__(self, plans: list[Plan], scales: dict[str, float], bases: dict[str, torch.Tensor],
                 snapshots: int = 1, cold: bool = False) -> None:
        self.plans, self.scales, self.bases, self.snapshots, self.cold = plans, scales, bases, snapshots, cold

    def rows(self, simplex: torch.Tensor, decoders: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return each row's base index and decoder index (of ``decoders`` stacked decoders) for simplices
        ``simplex`` ``[B]``."""
        if self.snapshots == 1:
            return simplex, simplex
        bases = next(iter(self.bases.values())).shape[0]
        simplices = bases if self.cold else bases * self.snapshots  # of every snapshot
        return simplex % bases, simplex // (simplices // decoders)

    def of_snapshot(self, snapshot: int, simplices: int) -> Decoder:
        """Return the decoder of one snapshot's ``simplices`` simplices alone: on their own bases after cold
        restarts (views, not copies), on the shared ones after warm."""
        if not self.cold:
            return self
        bases = {k: v[snapshot * simplices:(snapshot + 1) * simplices] for k, v in self.bases.items()}
        return Decoder(self.plans, self.scales, bases)

    @staticmethod
    def init(plans: list[Plan], code_dim: int, hidden: int, means: dict[str, float], generator: torch.Generator,
             copies: int = 0) -> dict[str, torch.Tensor]:
        """Return freshly initialised decoder parameters ``{name: tensor}``: a matrix or kernel starts as its random
        base (its change at 0), any other tensor at ``means[key]`` (its members' mean value, in scale units). With
        ``copies`` > 0 every parameter holds that many independent decoders (``[copies, ...]``, one a simplex)."""
        lead = (copies,) if copies else ()
        params = {}
        for plan in plans:
            if plan.free:
                continue
            key = plan.slot.key
            for n in range(len(plan.groups)):
                params[f"{key}/in{n}"] = torch.randn(*lead, code_dim, hidden, generator=generator) / math.sqrt(code_dim)
            params[f"{key}/b0"] = torch.zeros(*lead, hidden)
            out = torch.randn(*lead, hidden, plan.outputs, generator=generator) / math.sqrt(hidden)
            params[f"{key}/out"] = out * 0 if has_base(plan) else out * 0.1
            params[f"{key}/b2"] = torch.full((*lead, plan.outputs), 0.0 if has_base(plan) else means[key])
        return params

    def tensors(self, params: dict[str, torch.Tensor], codes: list[torch.Tensor], free: dict[str, torch.Tensor],
                simplex: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{key: [B, *shape]}``: every planned tensor of a batch of ``B`` code sets, those of matrices and
        kernels on the random base of each one's ``simplex`` (``[B]`` indices), each decoded by its simplex's decoder
        where there is one a simplex (or a snapshot)."""
        out = {}
        first = next((params[f"{p.slot.key}/b0"] for p in self.plans if not p.free), None)
        stacked = first is not None and first.dim() == 2  # [decoders, hidden]: a decoder a simplex or a snapshot
        base_row, decoder_row = self.rows(simplex, first.shape[0] if stacked else 1)
        for plan in self.plans:
            key, shape = plan.slot.key, plan.slot.shape
            if plan.free:
                out[key] = free[key].reshape(-1, *shape)
                continue
            cells = len(plan.groups)
            layer = (lambda name: params[f"{key}/{name}"][decoder_row]) if stacked else (lambda name: params[f"{key}/{name}"])

            def bias(name: str) -> torch.Tensor:  # a row's own bias broadcasts over its cells
                value = layer(name)
                return value.reshape(-1, *[1] * cells, value.shape[-1]) if stacked else value

            h = bias("b0")
            for n, g in enumerate(plan.groups):
                part_ = _times(codes[g], layer(f"in{n}"), stacked)  # [B, units, hidden]
                view = [part_.shape[0]] + [1] * cells + [part_.shape[-1]]
                view[1 + n] = part_.shape[1]
                h = h + part_.reshape(view)
            h = F.gelu(h)
            values = (_times(h, layer("out"), stacked) + bias("b2")) * self.scales[key]
            values = values.reshape(*values.shape[:1 + cells], *(shape[a] for a in plan.rest_axes))
            order = [0] + [1 + (plan.unit_axes + plan.rest_axes).index(a) for a in range(len(shape))]
            out[key] = values.permute(order)
            if key in self.bases:
                out[key] = out[key] + self.bases[key][base_row]
        return out


def _times(x: torch.Tensor, weight: torch.Tensor, own: bool) -> torch.Tensor:
    """Return ``x @ weight`` over the last axis of ``x`` ``[B, ..., i]``: one ``weight`` ``[i, o]`` for every row,
    or with ``own`` a weight a row (``[B, i, o]``)."""
    return torch.einsum("b...i,bio->b...o", x, weight) if own else x @ weight


class CodeSpace(DrawnSpace):
    """Coordinates: the standard normal noise of a point of the simplex of codes; raw vector: its decoding."""

    Options = CodeOptions
    drawn = True
    calibrates = True
    needs_data = True

    def __init__(self, layout: Layout, groups: list[GroupAxes], decoder: Decoder, params: dict[str, torch.Tensor],
                 training: dict[str, Any]) -> None:
        super().__init__(layout)
        self.groups, self.decoder, self.params, self.training = groups, decoder, params, training
        self.snapshots = int(training.get("snapshots", 1))  # generators from before the option have one
        decoder.snapshots = self.snapshots  # (its training decoded one snapshot at a time)
        decoder.cold = training.get("restart") == "cold"  # generators from before the option restarted warm
        self.simplices = int(training["simplices"]) * self.snapshots  # every snapshot's simplices are simplices
        self.mixing = training.get("mixing", "network")  # generators from before the option mixed whole networks
        self.parts = parts_of(self.mixing, group_sizes(groups, layout))

    @property
    def corners(self) -> int:
        """Return the number of corners (code sets), of every snapshot."""
        return int(self.training["corners"]) * self.snapshots

    @property
    def per_simplex(self) -> int:
        """Return the number of corners of each simplex."""
        return self.corners // self.simplices

    @property
    def size(self) -> int:
        """Return the generator's number of stored values: codes, free tensors and decoder."""
        return sum(v.numel() for v in self.params.values())

    @classmethod
    def fit(cls, states: list[StateDict], options: CodeOptions, context: FitContext) -> CodeSpace:
        if context.data is None or context.spec is None:
            raise WgenError("the codes space trains on data, and the zoo records none",
                            "pass --data SPEC to wgen train (the dataset the zoo was trained on)")
        options = options.resolved(options.corners or len(states))
        options = replace(options, lr=options.lr or learning_rate(context.spec.create("meta")))
        count = (options.corners or len(states)) // options.simplices * options.simplices
        layout = Layout.from_state(states[0])
        groups = unit_groups(context, layout)
        plans = plans_of(layout, groups)
        scales, means, free = _member_statistics(states, plans)
        cold = options.restart == "cold"
        bases = random_bases(plans, scales, context.seed, options.simplices, options.snapshots if cold else 1)
        decoder = Decoder(plans, scales, {k: v.to(context.device) for k, v in bases.items()}, cold=cold)
        sizes = group_sizes(groups, layout)

        def initial(snapshot: int) -> dict[str, torch.Tensor]:  # where a snapshot's training starts (cold: each)
            return _initial(decoder, sizes, count, means, free, options, context.seed + snapshot * SNAPSHOT_SEEDS)

        targets = distilled_targets(states, options.distill, context, options.teachers) if options.distill else None
        params, losses, seconds, snapshots = _train(states[0], initial, decoder, len(groups),
                                                    parts_of(options.mixing, sizes), count, options, context, targets)
        training = {**asdict(options), "corners": count, "base_seed": context.seed, "steps": len(losses),
                    "final_loss": round(recent_loss(losses), 5), "seconds": round(seconds, 2)}
        return cls(layout, groups, decoder, stacked_snapshots(snapshots + [params], options.stacked_decoders), training)

    @classmethod
    def load(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> CodeSpace:
        groups = [[(key, int(axis)) for key, axis in g] for g in config["groups"]]
        params = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
        layout, training, scales = load_layout(config, tensors), dict(config["training"]), dict(config["scales"])
        plans = plans_of(layout, groups)
        own_bases = training.get("restart") == "cold"  # a set of bases a snapshot
        bases = random_bases(plans, scales, int(training["base_seed"]), int(training["simplices"]),
                             int(training.get("snapshots", 1)) if own_bases else 1)
        return cls(layout, groups, Decoder(plans, scales, bases), params, training)  # (__init__ sets its cold)

    def saved(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config, tensors = saved_layout(self.kind, self.layout, None, {
            "groups": [[[k, a] for k, a in g] for g in self.groups], "scales": self.decoder.scales,
            "size": self.size, "training": self.training})
        tensors.update({f"param.{k}": v.cpu().contiguous() for k, v in self.params.items()})
        return config, tensors

    def to(self, device: torch.device | str) -> CodeSpace:
        self.params = {k: v.to(device) for k, v in self.params.items()}
        self.decoder.bases = {k: v.to(device) for k, v in self.decoder.bases.items()}
        return self

    def vectors(self, coords: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        device = next(iter(self.params.values())).device
        coords = coords.to(device).float()
        k, p = self.per_simplex, self.parts
        which = simplex_of(coords[:, -1], self.simplices) if self.simplices > 1 else coords.new_zeros(len(coords), dtype=torch.long)
        points = coords[:, k:k * (1 + p)].view(len(coords), p, k)  # each part's own point
        parts = placed(proportions(points, self.alpha), which, self.simplices) if p else None
        return self.decode(placed(proportions(coords[:, :k], self.alpha), which, self.simplices), which, out, parts)

    def decode(self, weights: torch.Tensor, which: torch.Tensor, out: torch.Tensor | None = None,
               parts: torch.Tensor | None = None) -> torch.Tensor:
        """Return the raw vectors ``[N, dim]`` of the networks whose codes are mixed by ``weights`` ``[N, corners]``
        (or group by group or unit by unit by ``parts``, see ``mixed``), on the bases of simplices ``which``
        ``[N]`` (into ``out`` if given)."""
        with torch.no_grad():
            tensors = self.decoder.tensors(self.params, *mixed(self.params, len(self.groups), weights, parts), which)
        out = weights.new_zeros(len(weights), self.layout.dim) if out is None else out.zero_()
        for slot in self.layout.slots:
            if slot.key in tensors:
                out[:, slot.offset:slot.offset + slot.size] = tensors[slot.key].reshape(len(weights), -1)
        return out  # BatchNorm statistics stay 0: mean 0, log variance 0

    def describe(self) -> str:
        t = self.training
        decoders = "a decoder a simplex" if t.get("decoders") == "simplex" else "a shared decoder"
        restarts = " (cold restarts)" if self.decoder.cold else ""
        snapshots = f" in each of {self.snapshots} snapshots{restarts}" if self.snapshots > 1 else ""
        return (f"codes of {t['corners']} corners ({t['simplices']} simplices){snapshots}, "
                f"mixed {self.mixing} by {self.mixing}, "
                f"decoded to {self.layout.dim:,} weights by {decoders}; {self.size:,} values stored; "
                f"trained {t['steps']} steps")


def mixed(params: dict[str, torch.Tensor], groups: int, weights: torch.Tensor, parts: torch.Tensor | None = None
          ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Return the codes ``[B, units, d]`` of every group and the free tensors ``[B, ...]`` mixed by ``weights``
    ``[B, corners]``; the codes instead by ``parts`` if given: ``[B, groups, corners]``, a row a group, or ``[B,
    units, corners]``, a row a unit (every group's units in order)."""
    tables = [params[f"codes/{g}"] for g in range(groups)]
    if parts is None:
        codes = [torch.einsum("bk,kud->bud", weights, table) for table in tables]
    elif parts.shape[1] == groups:  # (were every group one unit, the two readings would agree)
        codes = [torch.einsum("bk,kud->bud", parts[:, g], table) for g, table in enumerate(tables)]
    else:
        codes = [torch.einsum("buk,kud->bud", part_, table)
                 for part_, table in zip(parts.split([t.shape[1] for t in tables], dim=1), tables)]
    free = {k[len("free/"):]: torch.tensordot(weights, v, dims=1) for k, v in params.items() if k.startswith("free/")}
    return codes, free


def _member_statistics(states: list[StateDict], plans: list[Plan]
                       ) -> tuple[dict[str, float], dict[str, float], dict[str, torch.Tensor]]:
    """Return, from the members, each planned tensor's scale (RMS of its values), its mean value in scale units, and
    the mean member's value of every free tensor; one tensor's stack at a time, never every member at once."""
    scales, means, free = {}, {}, {}
    for plan in plans:
        key = plan.slot.key
        stacked = torch.stack([s[key].float() for s in states])
        scales[key] = max(MIN_SCALE, float(stacked.pow(2).mean().sqrt()))
        means[key] = float(stacked.mean()) / scales[key]
        if plan.free:
            free[key] = stacked.mean(dim=0)
    return scales, means, free


def _initial(decoder: Decoder, sizes: list[int], corners: int, means: dict[str, float], free: dict[str, torch.Tensor],
             options: CodeOptions, seed: int) -> dict[str, torch.Tensor]:
    """Return the parameters training starts from: standard normal codes for ``corners`` corners (``sizes``: units
    of each group), every free tensor at its ``free`` mean, a fresh decoder whose vectors start at ``means``."""
    generator = torch.Generator().manual_seed(seed)
    params = {f"codes/{g}": torch.randn(corners, n, options.code_dim, generator=generator) for g, n in enumerate(sizes)}
    params.update({f"free/{k}": v.expand(corners, *v.shape).clone() for k, v in free.items()})
    params.update(Decoder.init(decoder.plans, options.code_dim, options.hidden, means, generator,
                               options.stacked_decoders))
    return params


def stored_values(plans: list[Plan], groups: list[GroupAxes], layout: Layout, options: CodeOptions, corners: int) -> int:
    """Return how many values a codes generator of ``corners`` corners stores for ``layout``: codes, free tensors and
    decoder (what ``CodeSpace.size`` counts once trained)."""
    units = sum(group_sizes(groups, layout))
    free = sum(p.slot.size for p in plans if p.free)
    decoder = sum(len(p.groups) * options.code_dim * options.hidden + options.hidden + (options.hidden + 1) * p.outputs
                  for p in plans if not p.free)
    return options.snapshots * (corners * (units * options.code_dim + free) + max(1, options.stacked_decoders) * decoder)


def stacked_snapshots(snapshots: list[dict[str, torch.Tensor]], stacked_decoders: int) -> dict[str, torch.Tensor]:
    """Return one parameter set holding every snapshot: the codes and free tensors of all their corners, snapshot by
    snapshot, and their decoders stacked (``[snapshots, ...]``, or ``[snapshots * simplices, ...]`` with a decoder a
    simplex); a single snapshot as it is."""
    if len(snapshots) == 1:
        return {k: v.detach() for k, v in snapshots[0].items()}
    device = next(iter(snapshots[-1].values())).device
    out = {}
    for name in snapshots[0]:
        values = [snapshot[name].detach().to(device) for snapshot in snapshots]
        rows = name.startswith(("codes/", "free/")) or stacked_decoders  # corners, or decoders already stacked
        out[name] = torch.cat(values) if rows else torch.stack(values)
    return out


def distilled_targets(states: list[StateDict], share: float, context: FitContext, teachers: str = "mean"
                      ) -> torch.Tensor:
    """Return each train example's label (one-hot) times ``1 - share`` plus ``share`` times the members' softmax (each
    in eval mode, with its own BatchNorm statistics): their mean, ``[train examples, classes]``, or with ``teachers``
    "member" each member's own, ``[members, train examples, classes]``."""
    data, model = context.data, context.spec.create(context.device)
    total, each = torch.zeros(len(data.indices["train"]), data.num_classes), []
    for start in range(0, len(states), TEACHERS_PER_PASS):
        logits = stacked_logits(model, states[start:start + TEACHERS_PER_PASS], data, "train", context.device)
        if teachers == "mean":  # a running sum: never every member's [examples, classes] at once
            total += logits.softmax(dim=-1).sum(dim=0).cpu()
        else:
            each.append(logits.softmax(dim=-1).cpu())
    labels = data.source.labels(data.indices["train"])
    onehot = F.one_hot(labels, data.num_classes).float()
    return (1 - share) * onehot + share * (total / len(states) if teachers == "mean" else torch.cat(each))


def _train(first: StateDict, initial: Callable[[int], dict[str, torch.Tensor]], decoder: Decoder, groups: int,
           parts: int, corners: int, options: CodeOptions, context: FitContext, targets: torch.Tensor | None
           ) -> tuple[dict[str, torch.Tensor], list[float], float, list[dict[str, torch.Tensor]]]:
    """Return the trained codes, free tensors and decoder (from ``initial(0)``; after cold restarts snapshot ``j``
    from ``initial(j)``), the loss of every step, the seconds spent and the earlier snapshots' parameters (``first``:
    a member, whose buffers the network runs with; ``parts``: how many mix on their own; ``targets``: what each train
    example's cross-entropy fits, if not its label)."""
    params = {k: v.to(context.device).requires_grad_(True) for k, v in initial(0).items()}
    model, buffers = mixing_network(first, context)
    cold = options.restart == "cold"
    decoders = [decoder.of_snapshot(j, options.simplices) for j in range(options.snapshots)]
    losses, seconds, snapshots = train_mixtures(
        params, lambda mix, x, y, target, cycle: _mixed_loss(model, decoders[cycle], params, groups, buffers, mix, x, y,
                                                             target, options.diversity, options.ensemble),
        corners, options, context, "codes", "param.", draws=2 if options.diversity > 0 or options.ensemble > 0 else 1,
        parts=parts, targets=targets, restarts=options.snapshots - 1,
        restart_epochs=options.epochs if cold else options.restart_epochs,
        fresh=(lambda j: {k: v.to(context.device) for k, v in initial(j).items()}) if cold else None)
    return params, losses, seconds, snapshots


def _mixed_loss(model: torch.nn.Module, decoder: Decoder, params: dict[str, torch.Tensor], groups: int,
                buffers: StateDict, mix: torch.Tensor, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
                diversity: float, ensemble: float) -> torch.Tensor:
    """Return the cross-entropy to ``target`` (``y``, the labels, or class distributions) of the batch ``x`` split
    among the simplices, part ``s`` through the network
    decoded from simplex ``s``'s codes mixed in proportions ``mix[d, s]`` of each draw ``d`` (``[draws, simplices,
    1 + parts, k]``: the network's proportions, then each group's or unit's). With two draws: their mean
    cross-entropy times ``1 - ensemble`` plus ``ensemble`` times the cross-entropy of their averaged prediction
    (``joint_cross_entropy``), plus ``diversity`` times how alike their wrong answers are (``error_overlap``)."""
    draws, simplices = mix.shape[:2]
    by_part = mix.dim() == 4
    weights, parts = (mixing_matrix(mix[:, :, 0]), mixing_matrix(mix[:, :, 1:])) if by_part else (mixing_matrix(mix), None)
    which = torch.arange(simplices, device=x.device).repeat(draws)
    tensors = decoder.tensors(params, *mixed(params, groups, weights, parts), which)
    if draws == 1:
        return split_loss(model, lambda s: {key: v[s] for key, v in tensors.items()}, buffers, simplices, x, target)
    loss = x.new_zeros(())
    for s, (xs, ys, ts) in enumerate(zip(*(v.tensor_split(simplices) for v in (x, y, target)))):
        logits = [functional_call(model, {**{k: v[d * simplices + s] for k, v in tensors.items()}, **buffers}, (xs,))
                  for d in range(draws)]
        part_ = sum(F.cross_entropy(z, ts) for z in logits) / draws
        if ensemble:  # (a run with one term skips the other's work, not just weighs it 0)
            part_ = (1 - ensemble) * part_ + ensemble * joint_cross_entropy(logits, ts)
        if diversity:
            part_ = part_ + diversity * error_overlap(*logits, ys)
        loss = loss + part_ * (len(ys) / len(y))
    return loss


def parts_of(mixing: str, sizes: list[int]) -> int:
    """Return how many parts mix in proportions of their own under ``mixing`` (``sizes``: units of each group)."""
    return {"network": 0, "group": len(sizes), "unit": sum(sizes)}[mixing]


def mixing_matrix(mix: torch.Tensor) -> torch.Tensor:
    """Return ``[draws * simplices, ..., corners]`` from ``mix`` ``[draws, simplices, ..., k]``: row ``d * simplices
    + s`` holds ``mix[d, s]`` at simplex ``s``'s corners, 0 elsewhere."""
    draws, simplices = mix.shape[:2]
    return placed(mix.flatten(0, 1), torch.arange(simplices, device=mix.device).repeat(draws), simplices)


def placed(mix: torch.Tensor, which: torch.Tensor, simplices: int) -> torch.Tensor:
    """Return ``[N, ..., simplices * k]``: each row's proportions ``mix`` ``[N, ..., k]`` at the corners of its
    simplex ``which`` ``[N]``, 0 elsewhere."""
    onehot = F.one_hot(which, simplices).to(mix.dtype).view(len(which), *[1] * (mix.dim() - 2), simplices, 1)
    return (mix.unsqueeze(-2) * onehot).flatten(-2)


def joint_cross_entropy(logits: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Return the cross-entropy to ``target`` (labels or class distributions) of the networks' averaged probabilities
    (``logits``: one ``[examples, classes]`` a network). It is at most their mean cross-entropy, the more so the more
    their probabilities of the target differ: training on it rewards two mixes that make a better pair, the ensemble the
    protocol measures, rather than two that differ (``error_overlap``)."""
    averaged = torch.logsumexp(torch.stack([z.log_softmax(dim=-1) for z in logits]), dim=0) - math.log(len(logits))
    return F.cross_entropy(averaged, target)


def error_overlap(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Return the mean over examples of the cosine between two networks' probabilities of the wrong classes (logits
    ``a`` and ``b``): 1 where they would err alike, 0 where their wrong answers share nothing. Adding it to the loss
    is the diversity term of Pang et al. (ICML 2019, "Improving adversarial robustness via promoting ensemble
    diversity") for two networks, on the cosine instead of a determinant."""
    keep = 1 - F.one_hot(labels, a.shape[-1]).to(a.dtype)
    wrong_a, wrong_b = a.softmax(dim=-1) * keep, b.softmax(dim=-1) * keep
    return F.cosine_similarity(wrong_a, wrong_b, dim=-1, eps=1e-12).mean()

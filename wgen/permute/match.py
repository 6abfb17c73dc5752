"""Git Re-Basin weight matching and zoo alignment (to one member, or to a MergeMany barycenter).

An alignment is a gather index per permuted parameter axis: ``aligned[key] = member[key]`` gathered
along each of its permuted axes. Weight matching maximises the summed inner product of the aligned
member with a target by coordinate descent over groups (``linear_sum_assignment`` per group, attention
heads through ``heads.py``), stopping when no group improves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .groups import HeadGroup, PermGroup, PermSpec
from .heads import head_similarities, layout_index, solve_heads

StateDict = dict[str, torch.Tensor]
Alignment = dict[tuple[str, int], torch.Tensor]  # (key, axis) -> gather index

_TOLERANCE = 1e-9


def identity_alignment(spec: PermSpec, state: StateDict) -> Alignment:
    """Return the alignment that changes nothing."""
    index: Alignment = {}
    for group in spec.groups:
        for key, axis in group.axes:
            index[(key, axis)] = torch.arange(group.size)
    for head in spec.heads:
        for key, axis, _ in head.axes:
            index[(key, axis)] = torch.arange(state[key].shape[axis])
    return index


def random_alignment(spec: PermSpec, state: StateDict, generator: torch.Generator) -> Alignment:
    """Return a uniformly random alignment (a random element of every group)."""
    index = identity_alignment(spec, state)
    for group in spec.groups:
        perm = _random_block_perm(group, generator)
        for key, axis in group.axes:
            index[(key, axis)] = perm
    for head in spec.heads:
        H, D = head.num_heads, head.head_dim
        sigma = torch.randperm(H, generator=generator).numpy()
        within = {kind: np.stack([torch.randperm(D, generator=generator).numpy() for _ in range(H)])
                  for kind in ("qk", "v")}
        if head.shared_qk:
            within["qk"] = np.tile(within["qk"][0], (H, 1))
        for key, axis, layout in head.axes:
            index[(key, axis)] = layout_index(layout, H, D, sigma, within)
    return index


def _random_block_perm(group: PermGroup, generator: torch.Generator) -> torch.Tensor:
    size = group.size // group.blocks
    return torch.cat([b * size + torch.randperm(size, generator=generator) for b in range(group.blocks)])


def apply_alignment(state: StateDict, alignment: Alignment) -> StateDict:
    """Return ``state`` with every aligned axis gathered by its index (other tensors shared)."""
    out = dict(state)
    for (key, axis), index in alignment.items():
        out[key] = out[key].index_select(axis, index.to(out[key].device))
    return out


def _compose(alignment: Alignment, keys: list[tuple[str, int]], step: torch.Tensor | dict) -> None:
    for ref in keys:
        inner = step[ref] if isinstance(step, dict) else step
        alignment[ref] = alignment[ref][inner.cpu()]


@dataclass
class MatchResult:
    """An alignment, its objective (sum of inner products with the target) and sweeps used."""

    alignment: Alignment
    objective: float
    sweeps: int


def weight_matching(spec: PermSpec, target: StateDict, member: StateDict, score_keys: set[str],
                    start: Alignment | None = None, max_sweeps: int = 100,
                    generator: torch.Generator | None = None) -> MatchResult:
    """Return the alignment of ``member`` to ``target`` found by coordinate descent.

    Only tensors in ``score_keys`` (the parameters) enter the cost; every aligned axis is gathered.
    A unit (group or attention module) is solved again only after a unit sharing a tensor with it
    changed: solving it unchanged would return the identity, so this skips work, not results.
    """
    generator = generator or torch.Generator().manual_seed(0)
    alignment = {k: v.clone() for k, v in (start or identity_alignment(spec, member)).items()}
    current = apply_alignment(member, alignment)
    units: list[PermGroup | HeadGroup] = [*spec.groups, *spec.heads]
    unit_axes = [u.axes if isinstance(u, PermGroup) else [(k, a) for k, a, _ in u.axes] for u in units]
    unit_keys = [{k for k, _ in axes} for axes in unit_axes]
    neighbours = [[j for j in range(len(units)) if j != i and unit_keys[i] & unit_keys[j]] for i in range(len(units))]
    matricized = _Matricized(target)
    dirty = set(range(len(units)))
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        if not dirty:
            break
        for u in torch.randperm(len(units), generator=generator).tolist():
            if u not in dirty:
                continue
            dirty.discard(u)
            unit = units[u]
            if isinstance(unit, PermGroup):
                gain, step = _match_group(unit, matricized, current, score_keys)
            else:
                gain, step = _match_heads(unit, target, current, score_keys)
            if gain > _TOLERANCE * (1 + abs(gain)):
                dirty.update(neighbours[u])
                _compose(alignment, unit_axes[u], step)
                for key, axis in unit_axes[u]:
                    index = step[(key, axis)] if isinstance(step, dict) else step
                    current[key] = current[key].index_select(axis, index.to(current[key].device))
    objective = sum(float((target[k].double() * current[k].double()).sum()) for k in score_keys)
    return MatchResult(alignment, objective, sweeps)


class _Matricized:
    """Target tensors with one axis moved first and the rest flattened, computed once each."""

    def __init__(self, target: StateDict) -> None:
        self.target = target
        self.cache: dict[tuple[str, int], torch.Tensor] = {}

    def get(self, key: str, axis: int) -> torch.Tensor:
        if (key, axis) not in self.cache:
            value = self.target[key]
            self.cache[(key, axis)] = value.movedim(axis, 0).reshape(value.shape[axis], -1).float().contiguous()
        return self.cache[(key, axis)]


def _match_group(group: PermGroup, target: _Matricized, current: StateDict, score_keys: set[str]
                 ) -> tuple[float, torch.Tensor]:
    cost = None
    for key, axis in group.axes:
        if key not in score_keys:
            continue
        w = current[key].movedim(axis, 0).reshape(group.size, -1).float()
        part = target.get(key, axis) @ w.T
        cost = part if cost is None else cost + part
    if cost is None:
        return 0.0, torch.arange(group.size)
    cost_np = cost.double().cpu().numpy()
    size = group.size // group.blocks
    perm = np.arange(group.size)
    for b in range(group.blocks):
        block = slice(b * size, (b + 1) * size)
        _, cols = linear_sum_assignment(cost_np[block, block], maximize=True)
        perm[block] = b * size + cols
    gain = cost_np[np.arange(group.size), perm].sum() - np.trace(cost_np)
    return float(gain), torch.as_tensor(perm)


def _match_heads(group: HeadGroup, target: StateDict, current: StateDict, score_keys: set[str]
                 ) -> tuple[float, dict[tuple[str, int], torch.Tensor]]:
    scored = HeadGroup(group.name, group.num_heads, group.head_dim,
                       [a for a in group.axes if a[0] in score_keys])
    sims = head_similarities(scored, target, current)
    sigma, within, new, old = solve_heads(group, sims)
    step = {(key, axis): layout_index(layout, group.num_heads, group.head_dim, sigma, within)
            for key, axis, layout in group.axes}
    return new - old, step


def align_to_target(spec: PermSpec, target: StateDict, member: StateDict, score_keys: set[str], restarts: int = 1,
                    generator: torch.Generator | None = None) -> MatchResult:
    """Return the best of ``restarts`` weight matchings (the first from identity, others random)."""
    generator = generator or torch.Generator().manual_seed(0)
    best = None
    for r in range(max(1, restarts)):
        start = None if r == 0 else random_alignment(spec, member, generator)
        result = weight_matching(spec, target, member, score_keys, start, generator=generator)
        if best is None or result.objective > best.objective + 1e-9:
            best = result
    assert best is not None
    return best


def merge_many(spec: PermSpec, members: list[StateDict], score_keys: set[str], restarts: int = 1,
               max_rounds: int = 20, generator: torch.Generator | None = None) -> list[Alignment]:
    """Return alignments of all members to their common barycenter (MergeMany).

    Each round matches every member to the mean of the others (as currently aligned), until the total
    squared distance of the members to their mean stops falling.
    """
    generator = generator or torch.Generator().manual_seed(0)
    alignments = [identity_alignment(spec, m) for m in members]
    if len(members) < 2:
        return alignments
    aligned = [apply_alignment(m, a) for m, a in zip(members, alignments)]
    keys = sorted(score_keys)
    total = {k: sum(a[k].double() for a in aligned) for k in keys}
    spread = _spread(aligned, total, keys)
    for _ in range(max_rounds):
        for i in torch.randperm(len(members), generator=generator).tolist():
            others = {k: ((total[k] - aligned[i][k].double()) / (len(members) - 1)).to(members[i][k].dtype)
                      for k in keys}
            result = align_to_target(spec, {**members[i], **others}, members[i], score_keys, restarts, generator)
            new = apply_alignment(members[i], result.alignment)
            for k in keys:
                total[k] = total[k] - aligned[i][k].double() + new[k].double()
            alignments[i], aligned[i] = result.alignment, new
        new_spread = _spread(aligned, total, keys)
        if new_spread >= spread - 1e-9 * max(1.0, spread):
            break
        spread = new_spread
    return alignments


def _spread(aligned: list[StateDict], total: dict[str, torch.Tensor], keys: list[str]) -> float:
    n = len(aligned)
    return sum(float(((a[k].double() - total[k] / n) ** 2).sum()) for a in aligned for k in keys)

"""The ``units`` weight space: every value, and the network's unit structure for a structure-aware net.

A member is its whole raw vector, scaled *per tensor* (one scale for all values of a tensor, across
the zoo). With ``center`` (the default) each value is measured from the zoo's mean member, which the
space also hands the net as a *template*: a permutation-equivariant velocity net (``nets/graph.py``)
then learns how a unit's deviation from the mean depends on what the unit is (its template values),
from every unit of every member at once. Without ``center`` one shift per tensor replaces the mean
member and nothing in the coordinates says which unit sits where: the net sees units as fully
interchangeable. The space carries the network's permutation groups (traced from the architecture,
``permute/groups.py``): which axes of which tensors index the units of which group. Axes of attention
heads and of groups a permutation may only move within blocks (GroupNorm) stay fixed: they are
features, not units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import WgenError
from ...permute.groups import derive_groups
from .base import MIN_SCALE, FitContext, Layout, Normalization, Slot, StateDict, load_layout, saved_layout
from .full import FullSpace

GroupAxes = list[tuple[str, int]]  # the (tensor key, axis) pairs that index one group's units


@dataclass(frozen=True)
class UnitOptions:
    """Settings of the units space."""

    center: bool = True  # measure every value from the zoo's mean member (handed to the net as a template)


def unit_groups(context: FitContext, layout: Layout) -> list[GroupAxes]:
    """Return the axes of each permutation group of the zoo's network that index modelled tensors of ``layout``
    (groups a permutation may only move within blocks, GroupNorm's, left out)."""
    spec = derive_groups(context.spec.create("cpu"), context.input_size)
    keys = {slot.key for slot in layout.slots}
    groups = [[(k, a) for k, a in g.axes if k in keys] for g in spec.groups if g.blocks == 1]
    return [g for g in groups if g]


def group_sizes(groups: list[GroupAxes], layout: Layout) -> list[int]:
    """Return the number of units of each group (the length of its first axis in ``layout``)."""
    shapes = {slot.key: slot.shape for slot in layout.slots}
    return [shapes[axes[0][0]][axes[0][1]] for axes in groups]


class UnitSpace(FullSpace):
    """Whole raw vectors scaled per tensor, with the permutation groups a structure-aware net needs."""

    Options = UnitOptions

    def __init__(self, layout: Layout, norm: Normalization, groups: list[GroupAxes], center: bool) -> None:
        super().__init__(layout, norm)
        self.groups, self.center = groups, center

    @classmethod
    def fit(cls, states: list[StateDict], options: UnitOptions, context: FitContext) -> UnitSpace:
        if context.spec is None or context.input_size is None:
            raise WgenError("the units space needs the zoo's architecture", "train it through wgen train")
        layout = Layout.from_state(states[0])
        raw = layout.stack(states).to(context.device)
        mean = raw.mean(dim=0)
        for slot in layout.slots if not options.center else ():
            mean[slot.offset:slot.offset + slot.size] = mean[slot.offset:slot.offset + slot.size].mean()
        scale = torch.empty_like(mean)
        for slot in layout.slots:
            part = raw[:, slot.offset:slot.offset + slot.size] - mean[slot.offset:slot.offset + slot.size]
            scale[slot.offset:slot.offset + slot.size] = part.pow(2).mean().sqrt().clamp_min(MIN_SCALE)
        return cls(layout, Normalization(mean, scale), unit_groups(context, layout), options.center)

    @classmethod
    def load(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> UnitSpace:
        groups = [[(key, int(axis)) for key, axis in g] for g in config["groups"]]
        return cls(load_layout(config, tensors), Normalization(tensors["mean"], tensors["scale"]), groups,
                   bool(config["center"]))

    def saved(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        extra = {"dim": self.layout.dim, "center": self.center, "groups": [[[k, a] for k, a in g] for g in self.groups]}
        return saved_layout(self.kind, self.layout, self.norm, extra)

    def template(self) -> torch.Tensor | None:
        """Return the zoo's mean member, each tensor divided by its own RMS (``[dim]``), or None without ``center``."""
        if not self.center:
            return None
        template = self.norm.mean.clone()
        for slot in self.layout.slots:
            part = template[slot.offset:slot.offset + slot.size]
            part /= part.pow(2).mean().sqrt().clamp_min(MIN_SCALE)
        return template

    def tensor_groups(self) -> list[tuple[Slot, dict[int, int]]]:
        """Return each tensor's slot and ``{axis: group index}`` of its axes that index units."""
        of_axis = {(key, axis): g for g, axes in enumerate(self.groups) for key, axis in axes}
        return [(slot, {a: of_axis[(slot.key, a)] for a in range(len(slot.shape)) if (slot.key, a) in of_axis})
                for slot in self.layout.slots]

    def group_sizes(self) -> list[int]:
        """Return the number of units of each group."""
        return group_sizes(self.groups, self.layout)

    def describe(self) -> str:
        return (f"units space, {self.layout.dim:,} values in {len(self.groups)} permutation groups of "
                f"{sum(self.group_sizes()):,} units")

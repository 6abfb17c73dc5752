"""The ``graph`` velocity net: message passing on the network as a graph of units, equivariant to permutations.

Every tensor of the network is seen by the axes that index units (``spaces/units.py``): a conv or
linear weight with both axes permuted is a set of *edges* between the units of two groups (its
kernel values the features of an edge); a bias, norm or BatchNorm statistic is a *node* feature of
its group's units; a tensor with no permuted axis (the classifier's bias) is *global*. Each layer
pools every tensor onto the units it touches (means over the other axis), updates a state per unit
with a shared per-group MLP, a global state from all units, then updates every edge from its own
value and the states of the two units it joins. No unit has an index: permuting the units of any
group permutes the output the same way, so what the net learns from one unit serves all of them,
and its size depends on the number of tensors and their feature widths, not on how many units
there are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import WgenError
from ...limits import check_all
from ..spaces.base import Slot
from .base import SinusoidalTime, VelocityNet


@dataclass(frozen=True)
class GraphOptions:
    """Size of the graph net: channels per unit and edge, message-passing layers, time-embedding width."""

    width: int = 32
    depth: int = 3
    time_dim: int = 64

    def check(self) -> None:
        """Raise a WgenError for a size out of its range."""
        check_all({"--width": self.width, "--depth": self.depth, "--time-dim": self.time_dim})


class _Tensor:
    """How one tensor of the network is read: its unit axes first, its other axes as features."""

    def __init__(self, slot: Slot, axes: dict[int, int]) -> None:
        self.slot = slot
        self.unit_axes = sorted(axes)[:2]  # a third permuted axis (none in timm's models) stays a feature
        self.groups = [axes[a] for a in self.unit_axes]
        rest = [a for a in range(len(slot.shape)) if a not in self.unit_axes]
        self.order = [*self.unit_axes, *rest]
        self.units = [slot.shape[a] for a in self.unit_axes]
        self.features = math.prod(slot.shape[a] for a in rest)

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``[B, *units, features]`` of this tensor's part of flat vectors ``x`` ``[B, dim]``."""
        value = x[:, self.slot.offset:self.slot.offset + self.slot.size].view(len(x), *self.slot.shape)
        return value.permute(0, *(a + 1 for a in self.order)).reshape(len(x), *self.units, self.features)

    def write(self, value: torch.Tensor) -> torch.Tensor:
        """Return ``[B, size]``: ``value`` ``[B, *units, features]`` back in the tensor's own layout."""
        shape = [self.slot.shape[a] for a in self.order]
        inverse = [self.order.index(a) + 1 for a in range(len(self.order))]
        return value.reshape(len(value), *shape).permute(0, *inverse).reshape(len(value), -1)


class _TensorLayer(nn.Module):
    """One tensor's part of a layer: what it tells its units, and how it changes given theirs."""

    def __init__(self, roles: int, width: int) -> None:
        super().__init__()
        self.pool = nn.ModuleList(nn.Linear(width, width) for _ in range(roles))
        self.own = nn.Linear(width, width)
        self.units = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(roles))
        self.context = nn.Linear(width, width, bias=False)
        self.norm = nn.LayerNorm(width)


class VelocityGraph(VelocityNet):
    """Permutation-equivariant message passing between a network's units and weights (see the module doc)."""

    Options = GraphOptions

    def __init__(self, space: object, options: GraphOptions) -> None:
        super().__init__(options)
        if not hasattr(space, "tensor_groups"):
            raise WgenError("the graph velocity net needs a space that knows the network's units",
                            "use --space units with --net graph")
        width = options.width
        self.tensors = [_Tensor(slot, axes) for slot, axes in space.tensor_groups()]
        self.group_count = len(space.group_sizes())
        self.time = nn.Sequential(SinusoidalTime(options.time_dim), nn.Linear(options.time_dim, width), nn.SiLU(),
                                  nn.Linear(width, width))
        template = space.template() if hasattr(space, "template") else None
        self.register_buffer("template", template[None].clone() if template is not None else None, persistent=False)
        extra = 2 if template is not None else 1  # a tensor's own features, and the template's beside them
        self.inp = nn.ModuleList(nn.Linear(extra * t.features, width) for t in self.tensors)
        self.out = nn.ModuleList(nn.Linear(width, t.features) for t in self.tensors)
        for layer in self.out:  # v = 0 at start: training begins from the identity flow
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.layers = nn.ModuleList(
            nn.ModuleList(_TensorLayer(len(t.groups), width) for t in self.tensors) for _ in range(options.depth))
        self.unit_mlps = nn.ModuleList(
            nn.ModuleList(_mlp(width) for _ in range(self.group_count)) for _ in range(options.depth))
        self.global_mlps = nn.ModuleList(_mlp(width) for _ in range(options.depth))
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time = self.time(t).expand(len(x), -1)  # [B, width]
        states = [inp(self._features(tensor, x)) for tensor, inp in zip(self.tensors, self.inp)]
        for layer, unit_mlps, global_mlp in zip(self.layers, self.unit_mlps, self.global_mlps):
            units, summary = self._pool(states, layer, time)
            units = [None if u is None else u + mlp(u) for u, mlp in zip(units, unit_mlps)]
            context = summary + global_mlp(summary + sum(u.mean(dim=1) for u in units if u is not None))
            states = [self._update(s, tensor, part, units, context) for s, tensor, part in zip(states, self.tensors, layer)]
        return torch.cat([tensor.write(out(s)) for s, tensor, out in zip(states, self.tensors, self.out)], dim=1)

    def _features(self, tensor: _Tensor, x: torch.Tensor) -> torch.Tensor:
        """Return a tensor's features ``[B, *units, F]``, with the template's beside them when the space has one."""
        own = tensor.read(x)
        if self.template is None:
            return own
        return torch.cat([own, tensor.read(self.template).expand_as(own)], dim=-1)

    def _pool(self, states: list[torch.Tensor], layer: nn.ModuleList, time: torch.Tensor
              ) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        """Return each group's unit states ``[B, n, width]`` pooled from every tensor, and the global summary."""
        units: list[torch.Tensor | None] = [None] * self.group_count
        summary = time
        for state, tensor, part in zip(states, self.tensors, layer):
            if not tensor.groups:
                summary = summary + part.own(state)
                continue
            for role, group in enumerate(tensor.groups):
                other = [d for d in range(1, len(tensor.groups) + 1) if d != role + 1]
                pooled = part.pool[role](state.mean(dim=other) if other else state)
                units[group] = pooled if units[group] is None else units[group] + pooled
        return [None if u is None else u + time[:, None] for u in units], summary

    def _update(self, state: torch.Tensor, tensor: _Tensor, part: _TensorLayer, units: list[torch.Tensor | None],
                context: torch.Tensor) -> torch.Tensor:
        """Return a tensor's new state from its own, its units' and the global one (residual)."""
        message = part.own(part.norm(state)) + self._broadcast(part.context(context), len(tensor.groups))
        for role, group in enumerate(tensor.groups):
            unit = part.units[role](units[group])  # [B, n_role, width]
            message = message + (unit[:, :, None] if role == 0 and len(tensor.groups) == 2 else
                                 unit[:, None] if role == 1 else unit)
        return state + self.act(message)

    @staticmethod
    def _broadcast(value: torch.Tensor, unit_axes: int) -> torch.Tensor:
        return value.view(len(value), *([1] * unit_axes), -1)


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))

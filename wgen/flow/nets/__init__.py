"""Registered velocity networks v(x, t): what flows a generator's noise to weights.

One file a net; built-in ones are listed here (imported on first use), plug-ins call
``NETS.register(name)`` on their ``VelocityNet`` subclass. A net is built from the weight space it
serves (``space.shape``, and whatever structure the space exposes) and its kind's ``Options``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import WgenError
from ...registry import Registry

if TYPE_CHECKING:
    from ..spaces.base import WeightSpace
    from .base import VelocityNet

NETS = Registry("velocity net", "--net", {
    "mlp": "wgen.flow.nets.mlp:VelocityMLP",
    "graph": "wgen.flow.nets.graph:VelocityGraph",
    "none": "wgen.flow.nets.none:NoFlow",
})
DEFAULT_NET = "mlp"


def create_net(kind: str, args: dict[str, Any], space: WeightSpace) -> VelocityNet:
    """Return a freshly initialised velocity net of ``kind`` with settings ``args`` for ``space``."""
    return NETS.get(kind)(space, NETS.options(kind, args))


def load_net(config: dict[str, Any], space: WeightSpace) -> VelocityNet:
    """Return the (uninitialised-weights) net a generator's ``config.json`` ``net`` block describes."""
    args = {k: v for k, v in config.items() if k != "kind"}
    kind = config.get("kind", DEFAULT_NET)  # generators of wgen 0.1 name no kind: they used the mlp
    try:
        NETS.get(kind)
    except WgenError as exc:
        raise WgenError(f"the generator uses an unknown velocity net {kind!r}",
                        "update wgen, or load the plug-in that registers it") from exc
    return create_net(kind, args, space)

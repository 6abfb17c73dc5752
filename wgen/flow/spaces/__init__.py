"""Registered weight spaces: a zoo's state dicts <-> the tensors a velocity net is trained on.

One file a space; built-in ones are listed here (imported on first use), plug-ins call
``SPACES.register(name)`` on their ``WeightSpace`` subclass. ``auto`` is not a space but a rule:
``codes`` when the zoo's training data is at hand (its samples are new networks and its size grows with
the layers' widths; the subspace's samples are new and more accurate but it stores every corner whole; the
flows' are near-copies: docs/benchmarks.md); without data ``full`` up to :data:`FULL_SPACE_MAX_DIM` values,
``pca`` above, because a velocity net on a full vector of a few hundred thousand values would be
larger than the zoo itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import WgenError
from ...registry import Registry

if TYPE_CHECKING:
    import torch

    from .base import FitContext, StateDict, WeightSpace

SPACES = Registry("weight space", "--space", {
    "full": "wgen.flow.spaces.full:FullSpace",
    "pca": "wgen.flow.spaces.pca:PCASpace",
    "units": "wgen.flow.spaces.units:UnitSpace",
    "subspace": "wgen.flow.spaces.subspace:SubspaceSpace",
    "codes": "wgen.flow.spaces.codes:CodeSpace",
})
AUTO = "auto"
FULL_SPACE_MAX_DIM = 50_000


def space_choices() -> list[str]:
    """Return what ``--space`` accepts: ``auto`` and every registered space."""
    return [AUTO, *SPACES.names()]


def resolve_kind(kind: str, values: int, has_data: bool = False) -> str:
    """Return the space ``kind`` stands for on members of ``values`` modelled values (``auto`` resolved:
    ``codes`` when the zoo's training data is at hand, else ``full`` or ``pca`` by size)."""
    if kind == AUTO:
        if has_data:
            return "codes"
        return "full" if values <= FULL_SPACE_MAX_DIM else "pca"
    SPACES.get(kind)  # an unknown kind fails here, before any work
    return kind


def fit_space(kind: str, args: dict[str, Any], states: list[StateDict], context: FitContext | torch.device,
              spec: Any = None, input_size: tuple[int, int, int] | None = None) -> WeightSpace:
    """Return a space of ``kind`` (or ``auto``) with settings ``args``, fitted on the training members ``states``
    (of model ``spec`` at ``input_size``, which structure-aware spaces trace). ``context`` is a device,
    or a :class:`FitContext` that also carries the zoo's data for spaces that train on it."""
    from .base import FitContext, Layout

    if not isinstance(context, FitContext):
        context = FitContext(context, spec, input_size)
    if len(states) < 2:
        raise WgenError(f"a generator needs at least 2 training members, got {len(states)}",
                        "train a larger zoo, or lower --holdout")
    kind = resolve_kind(kind, Layout.from_state(states[0]).dim, context.data is not None)
    return SPACES.get(kind).fit(states, SPACES.options(kind, args), context)


def load_space(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> WeightSpace:
    """Return the space a generator stored (its ``config.json`` ``space`` block and ``space.safetensors``)."""
    try:
        cls = SPACES.get(config["kind"])
    except WgenError as exc:
        raise WgenError(f"the generator uses an unknown weight space {config['kind']!r}",
                        "update wgen, or load the plug-in that registers it") from exc
    return cls.load(config, tensors)

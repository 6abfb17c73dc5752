"""Is a model new, or a copy of a training member? Distances re-matched by weight matching, and agreements.

The yardstick is the generator's *training* members (``Reference``). For each model:

- ``nn_distance``: L2 distance (parameters only) to its nearest training member, after the model is
  permutation-aligned to each of its few nearest members by weight matching, so that a permuted
  copy cannot pass as new; ``nn_ratio`` divides it by the zoo's own nearest-neighbour distance
  (measured the same way between training members), so a fresh training run sits near 1;
- ``max_agreement``: the largest share of examples on which it predicts the same class as a
  training member; ``max_error_iou``: the largest IoU of its mistakes with a training member's;
- ``copy``: nearer to a training member than 5% of member pairs are to each other;
- ``holdout_nearer``: nearer to a held-out member than to every training member.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .metrics import StateDict, error_iou, flatten
from .permute.groups import PermSpec
from .permute.match import apply_alignment, weight_matching


@dataclass
class Reference:
    """The training members as the yardstick of novelty, and what it takes to re-match a model to them."""

    states: list[StateDict]
    vectors: torch.Tensor  # [T, P] parameters of the training members
    predictions: torch.Tensor  # [T, N] their predicted classes
    errors: torch.Tensor  # [T, N] their mistakes
    holdout: torch.Tensor | None  # [H, P] parameters of held-out members
    keys: list[str]  # the parameters, in vector order
    spec: PermSpec  # permutation groups, for re-matching
    rematch: int  # nearest members each model is re-matched to
    nn_distance: float = math.nan  # the zoo's mean nearest-neighbour distance
    copy_threshold: float = math.nan  # 5th percentile of distances between training members
    member_distances: torch.Tensor | None = None  # [T] each member's nearest-neighbour distance among the others


def reference(states: list[StateDict], holdout: list[StateDict], logits: torch.Tensor, labels: torch.Tensor,
              keys: list[str], spec: PermSpec, rematch: int) -> Reference:
    """Return the yardstick of the training members ``states`` (their ``logits`` on the evaluation split)."""
    predictions = logits.argmax(-1)
    ref = Reference(states, flatten(states, keys), predictions, predictions != labels,
                    flatten(holdout, keys) if holdout else None, keys, spec, rematch)
    if len(states) > 1:
        pairwise = torch.cdist(ref.vectors.double(), ref.vectors.double())
        ref.copy_threshold = float(torch.quantile(pairwise[~torch.eye(len(states), dtype=torch.bool)], 0.05))
        ref.member_distances = nearest_distances(states, ref, exclude_self=True)
        ref.nn_distance = float(ref.member_distances.mean())
    return ref


def nearest_distances(states: list[StateDict], ref: Reference, exclude_self: bool = False) -> torch.Tensor:
    """Return ``[M]``: each state's L2 distance to its nearest training member, re-matched by weight matching.

    Each state is aligned to its ``ref.rematch`` nearest members (by plain distance) in turn; the
    smallest distance after alignment counts. ``exclude_self``: the states are the training members
    themselves, each compared with the others.
    """
    plain = torch.cdist(flatten(states, ref.keys).double(), ref.vectors.double())
    if exclude_self:
        plain.fill_diagonal_(math.inf)
    out = plain.min(dim=1).values
    if not (ref.spec.groups or ref.spec.heads) or ref.rematch < 1:
        return out
    keys = set(ref.keys)
    for i, state in enumerate(states):
        for j in plain[i].argsort()[:ref.rematch].tolist():
            if math.isinf(plain[i, j]):
                continue
            aligned = apply_alignment(state, weight_matching(ref.spec, ref.states[j], state, keys).alignment)
            distance = float(torch.cat([(aligned[k] - ref.states[j][k]).reshape(-1).double() for k in ref.keys]).norm())
            out[i] = min(float(out[i]), distance)
    return out


def novelty(states: list[StateDict], logits: torch.Tensor, labels: torch.Tensor, ref: Reference,
            exclude_self: bool = False) -> dict[str, torch.Tensor]:
    """Return per-model novelty measures ``[M]`` of ``states`` (their ``logits``) against the training members.

    ``exclude_self``: ``states`` are the training members themselves, each compared with the others.
    """
    predictions = logits.argmax(-1)
    agreement = (predictions[:, None, :] == ref.predictions[None]).double().mean(dim=-1)  # [M, T]
    iou = error_iou(predictions != labels, ref.errors)
    if exclude_self:
        eye = torch.eye(len(states), dtype=torch.bool)
        agreement, iou = agreement.masked_fill(eye, -math.inf), iou.masked_fill(eye, -math.inf)
    distance = ref.member_distances if exclude_self else nearest_distances(states, ref)
    out = {"nn_distance": distance, "nn_ratio": distance / ref.nn_distance,
           "max_agreement": agreement.max(dim=1).values, "max_error_iou": iou.max(dim=1).values,
           "copy": (distance < ref.copy_threshold).double()}
    if ref.holdout is not None and not exclude_self:
        to_holdout = torch.cdist(flatten(states, ref.keys).double(), ref.holdout.double()).min(dim=1).values
        out["holdout_nearer"] = (to_holdout < distance).double()
    return out


def accurate_and_novel(accuracy: torch.Tensor, measures: dict[str, torch.Tensor], accuracy_bar: float,
                       agreement_bar: float, thresholds: tuple[float, ...]) -> dict[str, float]:
    """Return, per NN-ratio threshold, the share of models that are accurate (>= ``accuracy_bar``) and novel
    (NN ratio >= the threshold and max agreement with a training member <= ``agreement_bar``)."""
    accurate = accuracy >= accuracy_bar - 1e-9
    unlike = measures["max_agreement"] <= agreement_bar + 1e-9
    return {f"{t:g}": float((accurate & unlike & (measures["nn_ratio"] >= t)).double().mean()) for t in thresholds}


def summary(values: torch.Tensor) -> dict[str, Any]:
    """Return mean, median, min, max and std of ``values``."""
    v = values.double()
    return {"mean": float(v.mean()), "median": float(v.quantile(0.5)), "min": float(v.min()), "max": float(v.max()),
            "std": float(v.std()) if len(v) > 1 else 0.0}

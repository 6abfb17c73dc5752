"""What a trained codes generator is made of: how large its decoded changes are against its random bases, and
how accurate, diverse and complementary its corners and its samples are.

    python benchmarks/codes_anatomy.py runs/novelty-resnet/codes90 --zoo runs/novelty-resnet/canon

For every weight matrix and kernel: the norm of its base, of each corner's decoded change, and of the difference
between two corners of one simplex and of two simplices. Then, on ``--split`` (val: the split to study settings
on), with BatchNorm statistics re-estimated on the train split as ``wgen sample`` calibrates: the corners (the
pure code sets), and ``--samples`` networks at Dirichlet(``--alpha``) points of a simplex drawn uniformly (the
generator's own samples are the points of its own ``alpha``, 1 unless trained otherwise; a generator that mixes
groups or units draws each one's own point); for each set its accuracy, pairwise disagreement (also within one
simplex and across two) and the accuracy of an ensemble of 16 averaged over ``--draws`` random draws. Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from wgen.checkpoints import open_zoo
from wgen.data import data_for_zoo
from wgen.flow.generator import load_generator
from wgen.flow.spaces.codes import CodeSpace, mixed, placed
from wgen.metrics import ensemble_hits, mean_disagreement, recalibrated, stacked_logits


def decoded(space: CodeSpace, weights: torch.Tensor, which: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return ``{key: [B, *shape]}``, the tensors of the networks mixed by ``weights`` ``[B, corners]`` on the bases
    of simplices ``which`` ``[B]``."""
    with torch.no_grad():
        return space.decoder.tensors(space.params, *mixed(space.params, len(space.groups), weights), which)


def sizes(space: CodeSpace) -> dict[str, dict[str, float]]:
    """Return, per based tensor, the norms of its base, of each corner's change and of two corners' differences."""
    k, corners = space.per_simplex, space.corners
    which = torch.arange(corners) // k
    tensors = decoded(space, torch.eye(corners), which)
    out = {}
    for key, bases in space.decoder.bases.items():
        change = (tensors[key] - bases[which]).flatten(1).norm(dim=1)
        out[key] = {"base": round(float(bases.flatten(1).norm(dim=1).mean()), 4),
                    "change_mean": round(float(change.mean()), 4),
                    "corners_apart_in_a_simplex": round(float((tensors[key][0] - tensors[key][1]).norm()), 4)}
        if space.simplices > 1:
            out[key]["corners_apart_across_simplices"] = round(float((tensors[key][0] - tensors[key][k]).norm()), 4)
    return out


def judged(space: CodeSpace, weights: torch.Tensor, which: torch.Tensor, zoo: Any, data: Any, split: str,
           draws: int, parts: torch.Tensor | None = None) -> dict[str, Any]:
    """Return the accuracy (mean, min), pairwise disagreement and mean ensemble-of-16 accuracy of the networks mixed
    by ``weights`` (and ``parts``, see ``CodeSpace.decode``), calibrated on the train split and judged on ``split``."""
    states = [space.layout.unflatten(vector) for vector in space.decode(weights, which, parts=parts)]
    device = torch.device("cpu")
    states = recalibrated(zoo.spec, states, data, device)
    logits = stacked_logits(zoo.spec.create(device), states, data, split, device)
    labels = data.tensors(split)[1]
    accuracy = (logits.argmax(-1) == labels).float().mean(dim=1)
    size = min(16, len(states))
    result = {"models": len(states), "accuracy_mean": round(float(accuracy.mean()), 4),
              "accuracy_min": round(float(accuracy.min()), 4), "disagreement": round(mean_disagreement(logits), 4),
              f"ensemble_{size}": round(float(ensemble_hits(logits, labels, size, draws).float().mean()), 4)}
    return {**result, **within_and_across(logits, which)}


def within_and_across(logits: torch.Tensor, which: torch.Tensor) -> dict[str, float]:
    """Return the mean pairwise disagreement of the networks of one simplex and of two (``which``: each one's simplex),
    or nothing when they are all of one simplex: where the samples' diversity lives."""

    def pairs(n: int) -> float:
        return n * (n - 1) / 2

    members = [which == s for s in which.unique().tolist()]
    within_pairs = sum(pairs(int(m.sum())) for m in members)
    if len(members) < 2 or within_pairs == 0:
        return {}
    within = sum(pairs(int(m.sum())) * mean_disagreement(logits[m]) for m in members if m.sum() > 1)
    across = pairs(len(which)) * mean_disagreement(logits) - within
    return {"disagreement_within_a_simplex": round(within / within_pairs, 4),
            "disagreement_across_simplices": round(across / (pairs(len(which)) - within_pairs), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generator", type=Path)
    parser.add_argument("--zoo", type=Path, required=True, help="the canonical zoo it was trained on (data, split)")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--alpha", type=float, nargs="+", default=[1.0])
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    space = load_generator(args.generator).space
    if not isinstance(space, CodeSpace):
        parser.error(f"{args.generator} is a {space.kind} generator, not a codes one")
    zoo = open_zoo(args.zoo)
    data = data_for_zoo(zoo.info, None, zoo.preprocessing()[0])
    torch.manual_seed(args.seed)
    k, simplices = space.per_simplex, space.simplices
    sets = {"corners": judged(space, torch.eye(space.corners), torch.arange(space.corners) // k, zoo, data,
                              args.split, args.draws)}
    for alpha in args.alpha:
        which = torch.randint(simplices, (args.samples,))
        dirichlet = torch.distributions.Dirichlet(torch.full((k,), alpha))
        weights = placed(dirichlet.sample((args.samples,)), which, simplices)
        parts = placed(dirichlet.sample((args.samples, space.parts)), which, simplices) if space.parts else None
        sets[f"dirichlet_{alpha:g}"] = judged(space, weights, which, zoo, data, args.split, args.draws, parts)
    print(json.dumps({"benchmark": "codes_anatomy", "generator": str(args.generator), "split": args.split,
                      "training": space.training, "sizes": sizes(space), "sets": sets}, indent=1))


if __name__ == "__main__":
    main()

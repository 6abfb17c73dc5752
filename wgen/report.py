"""`wgen eval`: what samples are worth, next to the zoo and to cheap baselines with the same count.

For each set of models (the samples, the zoo's training members, and baselines built from those
members) it reports accuracy/NLL/ECE per model, the ensemble curve, prediction diversity, and
novelty against the zoo's *training* members (held-out members are kept apart):

- ``nn_ratio``: L2 distance (canonical weight space, parameters only) to the nearest training
  member, over the zoo's own mean train-to-train nearest-neighbour distance;
- ``max_error_iou``: the largest IoU, over training members, of the sets of misclassified examples;
- ``nn_agreement``: top-1 agreement with the nearest training member;
- ``copy_rate``: share nearer to a training member than the 5th percentile of train-to-train
  distances;
- ``holdout_nearer``: share nearer to a held-out member than to any training member.

Baselines: training members plus Gaussian noise at several relative scales, linear interpolations of
random aligned pairs, and uniform soups of ``k`` random aligned members.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoints import StateDict, Zoo, atomic_write_json, open_zoo, read_json, zoo_fingerprint
from .data import data_for_zoo
from .errors import WgenError
from .progress import SilentStages, StageProgress
from .evaluate import (ensemble_curve, error_iou, mean_disagreement, per_model_metrics, reestimate_batchnorm,
                       stacked_logits)
from .flow.sample import MANIFEST_JSON, rejection_counts



@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate on and which baselines to build."""

    data: str | None = None
    split: str = "test"
    noise_scales: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    soup_k: int = 3
    seed: int = 0
    baselines: bool = True


@dataclass
class _Reference:
    """The zoo's training members as the yardstick of novelty."""

    vectors: torch.Tensor  # [T, P] parameters of training members
    errors: torch.Tensor  # [T, N] misclassified test examples
    predictions: torch.Tensor  # [T, N]
    holdout: torch.Tensor | None  # [H, P]
    nn_distance: float  # mean train-to-train nearest-neighbour distance
    copy_threshold: float  # 5th percentile of train-to-train distances
    names: list[str] = field(default_factory=list)


def evaluate(target: Path, zoo_path: Path | None, options: EvalOptions, device: torch.device,
             progress: StageProgress | None = None) -> dict[str, Any]:
    """Return the evaluation report of the samples (or zoo) at ``target``."""
    progress = progress or SilentStages()
    if options.split not in ("train", "val", "test"):
        raise WgenError(f"unknown --split {options.split!r}", "use train, val or test")
    if options.soup_k < 1:
        raise WgenError("--soup-k must be at least 1", "e.g. --soup-k 3")
    models = open_zoo(target)
    generator_config = _generator_config(target)
    zoo = open_zoo(zoo_path) if zoo_path is not None else None
    if zoo is not None and zoo.spec != models.spec:
        raise WgenError(f"{zoo_path} holds {zoo.spec.architecture} {zoo.spec.to_json()}, the samples "
                        f"{models.spec.architecture} {models.spec.to_json()}", "pass the zoo the generator was trained on")
    if zoo is not None and generator_config is not None \
            and zoo_fingerprint(zoo) != generator_config.get("source_fingerprint"):
        raise WgenError(f"{zoo_path} is not the zoo the generator was trained on "
                        f"({generator_config.get('source')})",
                        "pass that zoo: novelty is measured in its (canonical) weight space")
    info = dict((zoo or models).info)
    if generator_config is not None:
        info.setdefault("data", generator_config.get("data"))
        info.setdefault("split", generator_config.get("split"))
    input_size, _, _ = models.preprocessing()
    data = data_for_zoo(info, options.data, input_size)
    if data.num_classes != models.spec.num_classes:
        raise WgenError(f"dataset {data.spec} has {data.num_classes} classes, the models {models.spec.num_classes}",
                        "evaluate on the data the zoo was trained on")
    model = models.spec.create(device).eval()
    labels = data.source.labels(data.indices[options.split])
    param_keys = sorted(k for k, _ in model.named_parameters())
    generator = torch.Generator().manual_seed(options.seed)
    sets: dict[str, dict[str, Any]] = {}
    count = len(models.members)

    reference = None
    train_states: list[StateDict] = []
    if zoo is not None:
        train_names, holdout_names = _training_split(zoo, generator_config)
        by_name = {m.name: m for m in zoo.members}
        train_states = [zoo.load(by_name[n]) for n in train_names]
        holdout_states = [zoo.load(by_name[n]) for n in holdout_names]
        progress.stage("zoo", 1)
        zoo_logits = stacked_logits(model, train_states, data, options.split, device)
        reference = _reference(train_states, holdout_states, zoo_logits, labels, param_keys, train_names)
        sets["zoo"] = _set_report(zoo_logits, labels, reference, _flat(train_states, param_keys), self_excluded=True)
        progress.advance()

    label = "samples" if (target / MANIFEST_JSON).is_file() else "models"
    progress.stage(label, 1)
    states = [models.load(m) for m in models.members]
    logits = stacked_logits(model, states, data, options.split, device)
    sets[label] = _set_report(logits, labels, reference, _flat(states, param_keys) if reference else None)
    del states
    progress.advance()

    if zoo is not None and options.baselines and len(train_states) >= 2:
        builders = [(f"noise {s:g}", lambda s=s: _noisy(train_states, count, s, param_keys, generator))
                    for s in options.noise_scales]
        # averaged weights come with averaged BatchNorm statistics, which fit neither parent:
        # re-estimate them on the train split, as the canonicalize barrier does
        builders.append(("interpolation", lambda: _recalibrated(
            _interpolations(train_states, count, generator), models.spec, data, device)))
        k = min(options.soup_k, len(train_states))
        builders.append((f"soup of {k}", lambda: _recalibrated(
            _soups(train_states, count, k, generator), models.spec, data, device)))
        progress.stage("baselines", len(builders))
        for name, build in builders:
            baseline = build()
            baseline_logits = stacked_logits(model, baseline, data, options.split, device)
            sets[name] = _set_report(baseline_logits, labels, reference, _flat(baseline, param_keys))
            sets[name]["baseline"] = True
            progress.advance()
    report = {
        "format": "wgen.eval/1", "wgen_version": __version__, "target": str(target),
        "zoo": str(zoo_path) if zoo_path else None, "architecture": models.spec.architecture,
        "data": str(data.spec), "split": options.split, "examples": len(labels), "device": str(device),
        "training_members": reference.names if reference else None,
        "holdout_members": len(reference.holdout) if reference is not None and reference.holdout is not None else 0,
        "sets": sets,
    }
    if (target / MANIFEST_JSON).is_file():
        report["sampling"] = _sampling_summary(read_json(target / MANIFEST_JSON))
    noise = {n: s for n, s in sets.items() if n.startswith("noise ")}
    if noise and label in sets and "nn_ratio" in sets[label]:
        target_ratio = sets[label]["nn_ratio"]["mean"]
        report["matched_noise"] = min(noise, key=lambda n: abs(noise[n]["nn_ratio"]["mean"] - target_ratio))
    return report


def write_report(report: dict[str, Any], json_path: Path | None, plot_path: Path | None) -> None:
    """Write the JSON report and the PNG figure (atomically) where asked."""
    if json_path is not None:
        atomic_write_json(json_path, {k: v for k, v in report.items()})
    if plot_path is not None:
        from .plots import plot_report

        plot_report(report, plot_path)


def _generator_config(target: Path) -> dict[str, Any] | None:
    manifest = target / MANIFEST_JSON
    if not manifest.is_file():
        return None
    config = Path(read_json(manifest).get("generator", "")) / "config.json"
    return read_json(config) if config.is_file() else None


def _sampling_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """Return how many samples were asked for and rejected, by reason: the evaluated ones are what was kept."""
    return {"asked": manifest.get("count"), "rejected": manifest.get("rejected", 0),
            "reasons": rejection_counts(manifest.get("samples", [])),
            "solver": manifest.get("solver"), "steps": manifest.get("steps"), "projected": manifest.get("projected")}


def _training_split(zoo: Zoo, generator_config: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    names = [m.name for m in zoo.members]
    if generator_config is None:
        return names, []
    train = [n for n in generator_config["members"]["train"] if n in names]
    holdout = [n for n in generator_config["members"]["holdout"] if n in names]
    if not train:
        raise WgenError("none of the generator's training members is in the --zoo",
                        "pass the zoo the generator was trained on")
    return train, holdout


def _flat(states: list[StateDict], keys: list[str]) -> torch.Tensor:
    return torch.stack([torch.cat([s[k].reshape(-1).float() for k in keys]) for s in states])


def _reference(train: list[StateDict], holdout: list[StateDict], logits: torch.Tensor, labels: torch.Tensor,
               keys: list[str], names: list[str]) -> _Reference:
    vectors = _flat(train, keys)
    distances = torch.cdist(vectors.double(), vectors.double())
    off_diagonal = distances[~torch.eye(len(vectors), dtype=torch.bool)]
    nearest = (distances + torch.diag(torch.full((len(vectors),), math.inf, dtype=torch.float64))).min(dim=1).values
    predictions = logits.argmax(-1)
    return _Reference(vectors, predictions != labels, predictions, _flat(holdout, keys) if holdout else None,
                      float(nearest.mean()) if len(vectors) > 1 else float("nan"),
                      float(torch.quantile(off_diagonal, 0.05)) if len(off_diagonal) else float("nan"), names)


def _summary(values: torch.Tensor) -> dict[str, float]:
    v = values.double()
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()),
            "std": float(v.std()) if len(v) > 1 else 0.0}


def _set_report(logits: torch.Tensor, labels: torch.Tensor, reference: _Reference | None,
                vectors: torch.Tensor | None, self_excluded: bool = False) -> dict[str, Any]:
    metrics = per_model_metrics(logits, labels)
    out: dict[str, Any] = {"models": len(logits), **{k: _summary(v) for k, v in metrics.items()},
                           "per_model_accuracy": [float(a) for a in metrics["accuracy"]],
                           "ensemble": ensemble_curve(logits, labels), "disagreement": mean_disagreement(logits)}
    if reference is None or vectors is None:
        return out
    distances = torch.cdist(vectors.double(), reference.vectors.double())  # [M, T]
    iou = error_iou(logits.argmax(-1) != labels, reference.errors)
    if self_excluded:  # the zoo against itself: leave each member out of its own comparison
        eye = torch.eye(len(vectors), dtype=torch.bool)
        distances = distances.masked_fill(eye, math.inf)
        iou = iou.masked_fill(eye, -math.inf)
    nearest_distance, nearest = distances.min(dim=1)
    agreement = (logits.argmax(-1) == reference.predictions[nearest]).double().mean(dim=1)
    out.update({
        "nn_distance": _summary(nearest_distance),
        "nn_ratio": _summary(nearest_distance / reference.nn_distance),
        "max_error_iou": _summary(iou.max(dim=1).values),
        "per_model_max_error_iou": [float(v) for v in iou.max(dim=1).values],
        "nn_agreement": _summary(agreement),
        "copy_rate": float((nearest_distance < reference.copy_threshold).double().mean()),
    })
    if reference.holdout is not None and not self_excluded:
        to_holdout = torch.cdist(vectors.double(), reference.holdout.double()).min(dim=1).values
        out["holdout_nearer"] = float((to_holdout < nearest_distance).double().mean())
    return out


def _recalibrated(states: list[StateDict], spec: Any, data: Any, device: torch.device) -> list[StateDict]:
    model = spec.create(device)
    out = []
    for state in states:
        model.load_state_dict(state)
        reestimate_batchnorm(model, data, device)
        out.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    return out


def _noisy(train: list[StateDict], count: int, scale: float, keys: list[str], generator: torch.Generator) -> list[StateDict]:
    out = []
    for i in range(count):
        base = train[int(torch.randint(len(train), (1,), generator=generator))]
        state = dict(base)
        for key in keys:
            value = base[key]
            rms = value.pow(2).mean().sqrt()
            state[key] = value + scale * rms * torch.randn(value.shape, generator=generator)
        out.append(state)
    return out


def _interpolations(train: list[StateDict], count: int, generator: torch.Generator) -> list[StateDict]:
    out = []
    for _ in range(count):
        i, j = torch.randperm(len(train), generator=generator)[:2].tolist()
        t = float(torch.rand(1, generator=generator))
        out.append({k: ((1 - t) * v + t * train[j][k]) if v.is_floating_point() else v for k, v in train[i].items()})
    return out


def _soups(train: list[StateDict], count: int, k: int, generator: torch.Generator) -> list[StateDict]:
    out = []
    for _ in range(count):
        chosen = [train[i] for i in torch.randperm(len(train), generator=generator)[:k].tolist()]
        out.append({key: (sum(s[key] for s in chosen) / k) if value.is_floating_point() else value
                    for key, value in chosen[0].items()})
    return out


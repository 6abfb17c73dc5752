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

from .baselines import baseline_builders
from .checkpoints import StateDict, Zoo, open_zoo, read_json, zoo_fingerprint
from .data import SPLITS, SplitData, data_for_zoo
from .errors import WgenError
from .flow.generator import GeneratorConfig, read_generator_config
from .flow.sample import MANIFEST_JSON, reason_text, rejection_counts
from .metrics import ensemble_curve, error_iou, flatten, mean_disagreement, per_model_metrics, stacked_logits
from .outputs import atomic_write_json, refuse_overlap
from .progress import SILENT, Progress
from .tables import Summary, TextTable, pct
from .version import __version__


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate on and which baselines to build."""

    data: str | None = None
    split: str = "test"
    noise_scales: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    soup_k: int = 3
    seed: int = 0
    baselines: bool = True

    def check(self) -> None:
        """Raise a WgenError for an option out of range."""
        if self.split not in SPLITS:
            raise WgenError(f"unknown --split {self.split!r}", "use train, val or test")
        if self.soup_k < 1:
            raise WgenError("--soup-k must be at least 1", "e.g. --soup-k 3")
        if any(not s > 0 for s in self.noise_scales):
            raise WgenError("--noise-scales must be positive numbers", "e.g. 0.01,0.1")


def parse_scales(text: str) -> tuple[float, ...]:
    """Return the numbers of a comma-separated ``--noise-scales`` value."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise WgenError(f"--noise-scales {text!r} is not a list of numbers", "e.g. 0.01,0.1") from None


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


@dataclass
class _Inputs:
    """What an evaluation reads: the models, the zoo and generator behind them, the data."""

    models: Zoo
    zoo: Zoo | None
    generator: GeneratorConfig | None
    data: SplitData
    is_samples: bool

    @property
    def label(self) -> str:
        """Return the name of the evaluated set."""
        return "samples" if self.is_samples else "models"


def evaluate_models(target: Path, zoo_path: Path | None, options: EvalOptions, device: torch.device,
                    progress: Progress = SILENT) -> dict[str, Any]:
    """Return the evaluation report of the samples (or any zoo) at ``target``, next to ``zoo_path``'s members."""
    options.check()
    inputs = _open_inputs(target, zoo_path, options)
    model = inputs.models.spec.create(device).eval()
    labels = inputs.data.source.labels(inputs.data.indices[options.split])
    keys = sorted(k for k, _ in model.named_parameters())

    def set_report(states: list[StateDict], reference: _Reference | None, **kwargs: Any) -> dict[str, Any]:
        logits = stacked_logits(model, states, inputs.data, options.split, device)
        return _set_report(logits, labels, reference, flatten(states, keys) if reference else None, **kwargs)

    sets: dict[str, dict[str, Any]] = {}
    reference, train_states = None, []
    if inputs.zoo is not None:
        progress.stage("zoo", 1)
        train_states, holdout_states, names = _training_members(inputs.zoo, inputs.generator)
        logits = stacked_logits(model, train_states, inputs.data, options.split, device)
        reference = _reference(train_states, holdout_states, logits, labels, keys, names)
        sets["zoo"] = _set_report(logits, labels, reference, flatten(train_states, keys), self_excluded=True)
        progress.advance()
    progress.stage(inputs.label, 1)
    sets[inputs.label] = set_report([inputs.models.load(m) for m in inputs.models.members], reference)
    progress.advance()
    if reference is not None and options.baselines and len(train_states) >= 2:
        builders = list(baseline_builders(train_states, len(inputs.models.members), options.noise_scales, options.soup_k,
                                          keys, inputs.models.spec, inputs.data, device,
                                          torch.Generator().manual_seed(options.seed)))
        progress.stage("baselines", len(builders))
        for name, build in builders:
            sets[name] = {**set_report(build(), reference), "baseline": True}
            progress.advance()
    return _report(target, zoo_path, inputs, options, device, labels, reference, sets)


def _open_inputs(target: Path, zoo_path: Path | None, options: EvalOptions) -> _Inputs:
    models = open_zoo(target)
    is_samples = (target / MANIFEST_JSON).is_file()
    generator = _generator_config(target) if is_samples else None
    zoo = open_zoo(zoo_path) if zoo_path is not None else None
    if zoo is not None and zoo.spec != models.spec:
        raise WgenError(f"{zoo_path} holds {zoo.spec.architecture} {zoo.spec.to_json()}, the samples "
                        f"{models.spec.architecture} {models.spec.to_json()}", "pass the zoo the generator was trained on")
    if zoo is not None and generator is not None and zoo_fingerprint(zoo) != generator.source_fingerprint:
        raise WgenError(f"{zoo_path} is not the zoo the generator was trained on ({generator.source})",
                        "pass that zoo: novelty is measured in its (canonical) weight space")
    info = dict((zoo or models).info)
    if generator is not None:
        info.setdefault("data", generator.data)
        info.setdefault("split", generator.split)
    input_size, _, _ = models.preprocessing()
    data = data_for_zoo(info, options.data, input_size)
    if data.num_classes != models.spec.num_classes:
        raise WgenError(f"dataset {data.spec} has {data.num_classes} classes, the models {models.spec.num_classes}",
                        "evaluate on the data the zoo was trained on")
    return _Inputs(models, zoo, generator, data, is_samples)


def _report(target: Path, zoo_path: Path | None, inputs: _Inputs, options: EvalOptions, device: torch.device,
            labels: torch.Tensor, reference: _Reference | None, sets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    report = {
        "format": "wgen.eval/1", "wgen_version": __version__, "target": str(target),
        "zoo": str(zoo_path) if zoo_path else None, "architecture": inputs.models.spec.architecture,
        "data": str(inputs.data.spec), "split": options.split, "examples": len(labels), "device": str(device),
        "training_members": reference.names if reference else None,
        "holdout_members": len(reference.holdout) if reference is not None and reference.holdout is not None else 0,
        "sets": sets,
    }
    if inputs.is_samples:
        report["sampling"] = _sampling_summary(read_json(target / MANIFEST_JSON))
    noise = {n: s for n, s in sets.items() if n.startswith("noise ")}
    if noise and "nn_ratio" in sets[inputs.label]:
        target_ratio = sets[inputs.label]["nn_ratio"]["mean"]
        report["matched_noise"] = min(noise, key=lambda n: abs(noise[n]["nn_ratio"]["mean"] - target_ratio))
    return report


def write_report(report: dict[str, Any], json_path: Path | None, plot_path: Path | None) -> None:
    """Write the JSON report and the PNG figure (atomically) where asked, never inside what was evaluated."""
    inputs = [Path(report["target"]), Path(report["zoo"]) if report["zoo"] else None]
    for path in (json_path, plot_path):
        if path is not None:
            refuse_overlap(path, inputs)
    if json_path is not None:
        atomic_write_json(json_path, report)
    if plot_path is not None:
        from .plots import plot_report

        plot_report(report, plot_path)


def _generator_config(target: Path) -> GeneratorConfig | None:
    folder = Path(read_json(target / MANIFEST_JSON).get("generator", ""))
    return read_generator_config(folder) if (folder / "config.json").is_file() else None


def _sampling_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """Return how many samples were asked for and rejected, by reason: the evaluated ones are what was kept."""
    return {"asked": manifest.get("count"), "rejected": manifest.get("rejected", 0),
            "reasons": rejection_counts(manifest.get("samples", [])),
            "solver": manifest.get("solver"), "steps": manifest.get("steps"), "projected": manifest.get("projected")}


def _training_members(zoo: Zoo, generator: GeneratorConfig | None) -> tuple[list[StateDict], list[StateDict], list[str]]:
    """Return the state dicts of the generator's training and held-out members (all members for a plain zoo)."""
    by_name = {m.name: m for m in zoo.members}
    if generator is None:
        train, holdout = list(by_name), []
    else:
        train = [n for n in generator.train_members if n in by_name]
        holdout = [n for n in generator.holdout_members if n in by_name]
    if not train:
        raise WgenError("none of the generator's training members is in the --zoo",
                        "pass the zoo the generator was trained on")
    return [zoo.load(by_name[n]) for n in train], [zoo.load(by_name[n]) for n in holdout], train


def _reference(train: list[StateDict], holdout: list[StateDict], logits: torch.Tensor, labels: torch.Tensor,
               keys: list[str], names: list[str]) -> _Reference:
    vectors = flatten(train, keys)
    distances = torch.cdist(vectors.double(), vectors.double())
    off_diagonal = distances[~torch.eye(len(vectors), dtype=torch.bool)]
    nearest = (distances + torch.diag(torch.full((len(vectors),), math.inf, dtype=torch.float64))).min(dim=1).values
    predictions = logits.argmax(-1)
    return _Reference(vectors, predictions != labels, predictions, flatten(holdout, keys) if holdout else None,
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


def eval_summary(report: dict[str, Any], out: Path | None, plot: Path | None) -> Summary:
    """Return what ``wgen eval`` shows: a quality table and a novelty table over every set, and where files went."""
    sets = report["sets"]

    def label(name: str) -> str:
        return name + (" (matched)" if name == report.get("matched_noise") else "")

    quality = TextTable(f"{report['architecture']} on {report['data']}: {report['examples']} {report['split']} examples",
                        ["set", "models", "acc", "min acc", "NLL", "ECE", "ensemble acc", "disagree"])
    for name, s in sets.items():
        quality.rows.append([label(name), str(s["models"]), pct(s["accuracy"]["mean"]), pct(s["accuracy"]["min"]),
                             f"{s['nll']['mean']:.3f}", f"{s['ece']['mean']:.3f}", pct(s["ensemble"][-1]["accuracy"]),
                             pct(s["disagreement"])])
    tables = [quality]
    if any("nn_ratio" in s for s in sets.values()):
        novelty = TextTable("novelty against the zoo's training members",
                            ["set", "NN ratio", "max err-IoU", "NN agree", "copies", "nearer held-out"])
        for name, s in sets.items():
            novelty.rows.append([label(name), f"{s['nn_ratio']['mean']:.3f}", f"{s['max_error_iou']['mean']:.2f}",
                                 pct(s["nn_agreement"]["mean"]), pct(s["copy_rate"]), pct(s.get("holdout_nearer"))])
        tables.append(novelty)
    after = []
    if "sampling" in report:
        m = report["sampling"]
        after.append(f"samples: {m['asked']} asked, {m['rejected']} rejected"
                     + (f" ({reason_text(m['reasons'])})" if m["reasons"] else "") + ": the sets above hold the rest")
    after += [f"{what}: {path}" for path, what in ((out, "report"), (plot, "figure")) if path is not None]
    return Summary(tables=tables, after=after)

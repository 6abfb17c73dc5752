"""`wgen eval`: are the samples new networks, as good as fresh training runs? Judged against every baseline.

The protocol (after Zeng et al. 2025, "Generative Modeling of Weights: Generalization or
Memorization?"). Every set of models is measured on the evaluation split (the test split unless
told otherwise; nothing is tuned on it): accuracy, NLL, calibration, ensembles, disagreement, and
novelty against the generator's *training* members (``novelty.py``: nearest distance re-matched by
weight matching, its ratio to the zoo's own nearest-neighbour distance, the largest agreement and
error overlap with a training member). The sets:

- ``held-out``: the zoo members the generator never saw, the yardstick of a fresh training run;
- ``samples`` as written, and ``samples + BN`` with BatchNorm statistics re-estimated on the train split
  (not when ``wgen sample --calibrate`` already estimated them there: the row would repeat the samples');
- baselines built from the training members with the samples' count, each as built and ``+ BN``:
  members plus noise at several scales, a per-value Gaussian fitted to the members, interpolations
  of member pairs, soups of k members, unit mosaics (every unit from a random member; ``baselines.py``);
- ``zoo``: the training members, each against the others.

The headline is the share of a set's models that are *accurate* (at least the held-out members'
mean accuracy minus one point) and *novel* (NN ratio at least 0.3 / 0.5 / 0.8, and largest agreement
with a training member no higher than the held-out members' median), for every set, each noise
scale included. The *matched* noise, the largest scale whose mean accuracy still reaches the
samples' (or the most accurate scale when none does), with and without BN, is the one whose
ensemble of 16 the samples' is compared with: the first 16 models of each set, and the mean over 200
random draws of 16 (``ensemble_16_draws``), the expected accuracy of which the first 16 are one draw;
each gap with a 95% interval over the split's examples (``ensemble_gap``), resampled group by group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch

from .baseline_cache import BaselineCache, code_digest, indices_digest
from .baselines import baseline_builders
from .checkpoints import StateDict, Zoo, open_zoo, read_json, zoo_fingerprint
from .data import SPLITS, SplitData, SplitSpec, data_for_zoo, parse_data_spec
from .errors import WgenError
from .limits import check, check_all
from .flow.generator import GeneratorConfig, read_generator_config
from .flow.sample import MANIFEST_JSON, reason_text, rejection_counts
from .metrics import (draw_summary, ensemble_curve, ensemble_hits, grouped_bootstrap, has_batchnorm, mean_disagreement,
                      per_model_metrics, recalibrated, stacked_logits)
from .novelty import Reference, accurate_and_novel, novelty, reference, summary
from .outputs import atomic_write_json, refuse_overlap
from .permute.groups import PermSpec, derive_groups
from .progress import SILENT, Progress
from .tables import Summary, TextTable, pct
from .version import __version__

BN = " + BN"  # the suffix of a set measured with BatchNorm statistics re-estimated on the train split
ENSEMBLE_SIZE = 16


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate on, which baselines to build, and the thresholds of the headline."""

    data: str | None = None
    split: str = "test"
    noise_scales: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.8)
    soup_k: int = 3
    seed: int = 0
    baselines: bool = True
    recalibrate: bool = True  # also measure every set with BatchNorm re-estimated on the train split
    thresholds: tuple[float, ...] = (0.3, 0.5, 0.8)  # NN ratios that count as novel
    margin: float = 0.01  # accurate: at least the held-out mean accuracy minus this
    rematch: int = 3  # nearest training members each model is re-matched to by weight matching

    def check(self) -> None:
        """Raise a WgenError for an option out of range."""
        if self.split not in SPLITS:
            raise WgenError(f"unknown --split {self.split!r}", "use train, val or test")
        check_all({"--soup-k": self.soup_k, "--rematch": self.rematch, "--seed": self.seed})
        for scale in self.noise_scales:
            check("--noise-scale", scale)


def parse_scales(text: str) -> tuple[float, ...]:
    """Return the numbers of a comma-separated ``--noise-scales`` value."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise WgenError(f"--noise-scales {text!r} is not a list of numbers", "e.g. 0.1,0.3,0.5") from None


@dataclass
class _Inputs:
    """What an evaluation reads: the models, the zoo and generator behind them, the data."""

    models: Zoo
    zoo: Zoo | None
    generator: GeneratorConfig | None
    data: SplitData
    is_samples: bool
    zoo_fingerprint: str | None  # of ``zoo``, when it was read to check the generator's source
    calibrated_on: str | None = None  # the dataset whose train split ``wgen sample`` estimated BatchNorm on, if ``data``'s

    @property
    def label(self) -> str:
        """Return the name of the evaluated set."""
        return "samples" if self.is_samples else "models"


class _Judge:
    """Measures sets of models on one split against one reference; collects the sets of the report."""

    def __init__(self, inputs: _Inputs, options: EvalOptions, device: torch.device) -> None:
        self.inputs, self.options, self.device = inputs, options, device
        self.model = inputs.models.spec.create(device).eval()
        self.keys = sorted(k for k, _ in self.model.named_parameters())
        self.labels = inputs.data.source.labels(inputs.data.indices[options.split])
        self.reference: Reference | None = None
        self.sets: dict[str, dict[str, Any]] = {}
        # per set, per example: is the ensemble of 16 right (the first 16; the share of random draws)?
        self.hits: dict[str, dict[str, torch.Tensor]] = {}
        self.cached = 0  # baseline sets read from a cache instead of measured

    def logits(self, states: list[StateDict]) -> torch.Tensor:
        """Return the logits ``[models, examples, classes]`` of ``states`` on the evaluation split."""
        return stacked_logits(self.model, states, self.inputs.data, self.options.split, self.device)

    def measure(self, name: str, states: list[StateDict], baseline: bool = False, recalibrate: bool = False,
                exclude_self: bool = False) -> None:
        """Measure ``states`` as set ``name`` (and as ``name + BN`` when ``recalibrate``)."""
        variants = [(name, states)]
        if recalibrate:
            variants.append((name + BN, recalibrated(self.inputs.models.spec, states, self.inputs.data, self.device)))
        for label, variant in variants:
            logits = self.logits(variant)
            self.sets[label] = {**self._quality(label, logits), "baseline": baseline,
                                "bn_reestimated": label.endswith(BN)}
            if self.reference is not None:
                measures = novelty(variant, logits, self.labels, self.reference, exclude_self)
                self.sets[label].update(_novelty_report(measures))

    def _quality(self, label: str, logits: torch.Tensor) -> dict[str, Any]:
        metrics = per_model_metrics(logits, self.labels)
        curve = ensemble_curve(logits, self.labels)
        sixteen = next((p["accuracy"] for p in curve if p["size"] == ENSEMBLE_SIZE), None)
        hits = ensemble_hits(logits, self.labels, ENSEMBLE_SIZE, seed=self.options.seed)
        if hits is not None:
            first = logits[:ENSEMBLE_SIZE].softmax(dim=-1).mean(dim=0).argmax(-1) == self.labels
            self.hits[label] = {"first_16": first.float(), "mean_of_draws": hits.float().mean(dim=0)}
        return {"models": len(logits), **{k: summary(v) for k, v in metrics.items()},
                "per_model_accuracy": [float(a) for a in metrics["accuracy"]], "ensemble": curve,
                f"ensemble_{ENSEMBLE_SIZE}": sixteen,
                f"ensemble_{ENSEMBLE_SIZE}_draws": draw_summary(hits),
                "disagreement": mean_disagreement(logits)}


def evaluate_models(target: Path, zoo_path: Path | None, options: EvalOptions, device: torch.device,
                    progress: Progress = SILENT, cache: Path | None = None) -> dict[str, Any]:
    """Return the evaluation report of the samples (or any zoo) at ``target``, next to ``zoo_path``'s members;
    with ``cache``, a folder where measured baseline sets are kept and found again (``baseline_cache.py``)."""
    options.check()
    store = BaselineCache(cache, [target, zoo_path]) if cache is not None else None
    inputs = _open_inputs(target, zoo_path, options)
    judge = _Judge(inputs, options, device)
    recalibrate = options.recalibrate and has_batchnorm(judge.model)
    progress.stage(inputs.label, 1)
    states = [inputs.models.load(m) for m in inputs.models.members]
    if inputs.zoo is None:
        judge.measure(inputs.label, states)
        progress.advance()
        return _report(target, zoo_path, judge)
    train, holdout = _training_members(inputs.zoo, inputs.generator)
    groups = _groups(judge)
    judge.reference = reference(train, holdout, judge.logits(train), judge.labels, judge.keys, groups, options.rematch)
    judge.measure(inputs.label, states, recalibrate=recalibrate and inputs.is_samples and inputs.calibrated_on is None)
    del states
    progress.advance()
    progress.stage("zoo", 2 if holdout else 1)
    judge.measure("zoo", train, exclude_self=True)
    progress.advance()
    if holdout:
        judge.measure("held-out", holdout)
        progress.advance()
    if options.baselines and len(train) >= 2:
        generator = torch.Generator().manual_seed(options.seed)
        builders = list(baseline_builders(train, len(inputs.models.members), options.noise_scales,
                                          options.soup_k, judge.keys, generator, groups))
        entry = store.entry(_cache_key(judge, recalibrate)) if store is not None else None
        progress.stage("baselines", len(builders))
        for index, (name, build) in enumerate(builders):
            found = entry.load(index, name, generator) if entry is not None else None
            if found is not None:
                judge.sets.update(found[0])
                judge.hits.update(found[1])
            else:
                judge.measure(name, build(), baseline=True, recalibrate=recalibrate)
                if entry is not None:
                    labels = [name, name + BN] if recalibrate else [name]
                    entry.save(index, name, {k: judge.sets[k] for k in labels},
                               {k: judge.hits[k] for k in labels if k in judge.hits}, generator)
            progress.advance()
        judge.cached = entry.hits if entry is not None else 0
    return _report(target, zoo_path, judge)


def _cache_key(judge: _Judge, recalibrate: bool) -> dict[str, Any]:
    """Return everything the baseline sets of this evaluation depend on (the key of their cache entry)."""
    inputs, options = judge.inputs, judge.options
    train, holdout = _member_names(inputs.zoo, inputs.generator)
    data = inputs.data
    return {"zoo": inputs.zoo_fingerprint or zoo_fingerprint(inputs.zoo), "train": train, "held_out": holdout,
            "data": str(data.spec), "input_size": list(data.input_size), "train_indices": indices_digest(data.indices["train"]),
            "split": options.split, "split_indices": indices_digest(data.indices[options.split]),
            "count": len(inputs.models.members), "noise_scales": list(options.noise_scales), "soup_k": options.soup_k,
            "seed": options.seed, "rematch": options.rematch, "recalibrate": recalibrate, "device": judge.device.type,
            "wgen": code_digest(), "torch": torch.__version__, "timm": timm.__version__}


def _groups(judge: _Judge) -> PermSpec:
    """Return the permutation groups of the evaluated architecture (for re-matching and the unit mosaic)."""
    return derive_groups(judge.inputs.models.spec.create("cpu"), judge.inputs.data.input_size)


def _open_inputs(target: Path, zoo_path: Path | None, options: EvalOptions) -> _Inputs:
    models = open_zoo(target)
    is_samples = (target / MANIFEST_JSON).is_file()
    generator = _generator_config(target) if is_samples else None
    zoo = open_zoo(zoo_path) if zoo_path is not None else None
    if zoo is not None and zoo.spec != models.spec:
        raise WgenError(f"{zoo_path} holds {zoo.spec.architecture} {zoo.spec.to_json()}, the samples "
                        f"{models.spec.architecture} {models.spec.to_json()}", "pass the zoo the generator was trained on")
    fingerprint = zoo_fingerprint(zoo) if zoo is not None and generator is not None else None
    if fingerprint is not None and fingerprint != generator.source_fingerprint:
        raise WgenError(f"{zoo_path} is not the zoo the generator was trained on ({generator.source})",
                        "pass that zoo: novelty is measured in its (canonical) weight space")
    info = dict((zoo or models).info)
    if generator is not None:
        info.setdefault("data", generator.data)
        info.setdefault("split", generator.split)
    data = data_for_zoo(info, options.data, models.preprocessing()[0])
    if data.num_classes != models.spec.num_classes:
        raise WgenError(f"dataset {data.spec} has {data.num_classes} classes, the models {models.spec.num_classes}",
                        "evaluate on the data the zoo was trained on")
    calibrated = _calibrated_on(read_json(target / MANIFEST_JSON), generator, data) if is_samples else None
    return _Inputs(models, zoo, generator, data, is_samples, fingerprint, calibrated)


def _calibrated_on(manifest: dict[str, Any], generator: GeneratorConfig | None, data: SplitData) -> str | None:
    """Return the ``--calibrate`` dataset the samples' BatchNorm statistics were estimated on at sample time when its
    train split is ``data``'s (the generator's own data and split: re-estimating them would change nothing), else None."""
    spec = manifest.get("calibrate")
    if spec is None or generator is None or generator.data is None or generator.split is None:
        return None
    same = str(parse_data_spec(spec)) == str(parse_data_spec(generator.data)) == str(data.spec)
    return spec if same and SplitSpec.from_json(generator.split) == data.split else None


def _generator_config(target: Path) -> GeneratorConfig | None:
    folder = Path(read_json(target / MANIFEST_JSON).get("generator", ""))
    return read_generator_config(folder) if (folder / "config.json").is_file() else None


def _member_names(zoo: Zoo, generator: GeneratorConfig | None) -> tuple[list[str], list[str]]:
    """Return the names of the generator's training and held-out members in ``zoo`` (all members for a plain zoo)."""
    names = [m.name for m in zoo.members]
    if generator is None:
        return names, []
    return [n for n in generator.train_members if n in names], [n for n in generator.holdout_members if n in names]


def _training_members(zoo: Zoo, generator: GeneratorConfig | None) -> tuple[list[StateDict], list[StateDict]]:
    """Return the state dicts of the generator's training and held-out members (all members for a plain zoo)."""
    by_name = {m.name: m for m in zoo.members}
    train, holdout = _member_names(zoo, generator)
    if not train:
        raise WgenError("none of the generator's training members is in the --zoo",
                        "pass the zoo the generator was trained on")
    return [zoo.load(by_name[n]) for n in train], [zoo.load(by_name[n]) for n in holdout]


def _novelty_report(measures: dict[str, torch.Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {key: summary(measures[key]) for key in ("nn_distance", "nn_ratio", "max_agreement",
                                                                     "max_error_iou")}
    out.update({f"per_model_{key}": [float(v) for v in measures[key]]
                for key in ("nn_ratio", "max_agreement", "max_error_iou")})
    out["copy_rate"] = float(measures["copy"].mean())
    if "holdout_nearer" in measures:
        out["holdout_nearer"] = float(measures["holdout_nearer"].mean())
    return out


# ------------------------------------------------------------------------------------------------
# the report


def _report(target: Path, zoo_path: Path | None, judge: _Judge) -> dict[str, Any]:
    inputs, options = judge.inputs, judge.options
    report: dict[str, Any] = {
        "format": "wgen.eval/2", "wgen_version": __version__, "target": str(target),
        "zoo": str(zoo_path) if zoo_path else None, "architecture": inputs.models.spec.architecture,
        "data": str(inputs.data.spec), "split": options.split, "examples": len(judge.labels),
        "device": str(judge.device), "set": inputs.label, "sets": judge.sets,
        "baselines_from_cache": judge.cached,
    }
    if inputs.is_samples:
        report["sampling"] = _sampling_summary(read_json(target / MANIFEST_JSON))
        report["calibrated_on"] = inputs.calibrated_on
    if judge.reference is not None:
        report["yardstick"] = _yardstick(judge.sets, options)
        report["matched_noise"] = _matched_noise(judge.sets, inputs.label)
        report["headline"] = _headline(report)
        report["ensemble_gap"] = _ensemble_gap(judge, report["matched_noise"])
    return report


def _yardstick(sets: dict[str, dict[str, Any]], options: EvalOptions) -> dict[str, Any]:
    """Return the bars a model must clear to count as a fresh run: from the held-out members, else the zoo."""
    source = "held-out" if "held-out" in sets else "zoo"
    rows = sets[source]
    return {"source": source, "accuracy_bar": rows["accuracy"]["mean"] - options.margin,
            "agreement_bar": rows["max_agreement"]["median"], "thresholds": list(options.thresholds),
            "margin": options.margin}


def _matched_noise(sets: dict[str, dict[str, Any]], label: str) -> dict[str, str | None]:
    """Return, as built and + BN, the largest noise scale whose mean accuracy reaches the samples' (else the
    most accurate scale)."""
    out: dict[str, str | None] = {}
    for suffix, key in (("", "raw"), (BN, "bn")):
        target = sets.get(label + suffix, sets[label])["accuracy"]["mean"]
        noise = [n + suffix for _, n in sorted((float(n.split()[1]), n) for n in sets
                                               if n.startswith("noise ") and not n.endswith(BN)) if n + suffix in sets]
        reaching = [n for n in noise if sets[n]["accuracy"]["mean"] >= target]
        out[key] = reaching[-1] if reaching else max(noise, key=lambda n: sets[n]["accuracy"]["mean"], default=None)
    return out


def _ensemble_gap(judge: _Judge, matched: dict[str, str | None]) -> dict[str, Any]:
    """Return, against each matched noise set (raw, ``+ BN``), the samples' ensemble-of-16 accuracy minus the
    noise set's, for the first 16 and the mean of draws, with a 95% interval resampling the split's example
    groups (every rendering of one original together)."""
    data, split = judge.inputs.data, judge.options.split
    groups = data.source.groups
    groups = torch.as_tensor(groups[data.indices[split]] if groups is not None else range(len(judge.labels)))
    gaps = {}
    for key, suffix in (("raw", ""), ("bn", BN)):
        ours = judge.hits.get(judge.inputs.label + suffix, judge.hits.get(judge.inputs.label))
        theirs = judge.hits.get(matched[key] or "")
        if ours is not None and theirs is not None:
            gaps[key] = {"noise": matched[key], **{what: grouped_bootstrap(ours[what] - theirs[what], groups,
                                                                           seed=judge.options.seed)
                                                   for what in ours}}
    return gaps


def _headline(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Return the accurate-and-novel share per threshold of the samples, the held-out members and each baseline."""
    sets, bars = report["sets"], report["yardstick"]
    # every baseline, each noise scale included: the samples must beat the best of them, not the matched one
    names = [report["set"], report["set"] + BN, "held-out", *(n for n, s in sets.items() if s.get("baseline"))]
    headline = {}
    for name in names:
        if name in sets:
            s = sets[name]
            measures = {k: torch.tensor(s[f"per_model_{k}"]) for k in ("nn_ratio", "max_agreement")}
            headline[name] = accurate_and_novel(torch.tensor(s["per_model_accuracy"]), measures, bars["accuracy_bar"],
                                                bars["agreement_bar"], tuple(bars["thresholds"]))
    return headline


def _sampling_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """Return how many samples were asked for and rejected, by reason: the evaluated ones are what was kept."""
    return {"asked": manifest.get("count"), "rejected": manifest.get("rejected", 0),
            "reasons": rejection_counts(manifest.get("samples", [])),
            "solver": manifest.get("solver"), "steps": manifest.get("steps"), "projected": manifest.get("projected")}


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


def eval_summary(report: dict[str, Any], out: Path | None, plot: Path | None) -> Summary:
    """Return what ``wgen eval`` shows: quality and novelty of every set, the headline, and where files went."""
    sets = report["sets"]
    quality = TextTable(f"{report['architecture']} on {report['data']}: {report['examples']} {report['split']} examples",
                        ["set", "models", "acc", "min acc", "NLL", "ECE", f"ens {ENSEMBLE_SIZE}",
                         f"ens {ENSEMBLE_SIZE} (draws)", "disagree"])
    for name, s in sets.items():
        quality.rows.append([name, str(s["models"]), pct(s["accuracy"]["mean"]), pct(s["accuracy"]["min"]),
                             f"{s['nll']['mean']:.3f}", f"{s['ece']['mean']:.3f}", pct(s[f"ensemble_{ENSEMBLE_SIZE}"]),
                             _mean_and_std(s.get(f"ensemble_{ENSEMBLE_SIZE}_draws")), pct(s["disagreement"])])
    tables = [quality]
    if "headline" in report:
        tables += [_novelty_table(report), _headline_table(report)]
    after = []
    if "sampling" in report:
        m = report["sampling"]
        after.append(f"samples: {m['asked']} asked, {m['rejected']} rejected"
                     + (f" ({reason_text(m['reasons'])})" if m["reasons"] else "") + ": the sets above hold the rest")
    if report.get("calibrated_on"):
        after.append(f"samples: BatchNorm statistics estimated on the train split of {report['calibrated_on']} when "
                     f"sampled, so no '{report['set']}{BN}' row (it would repeat the samples')")
    after += [_gap_text(report["set"], gap) for gap in report.get("ensemble_gap", {}).values()]
    after += [f"{what}: {path}" for path, what in ((out, "report"), (plot, "figure")) if path is not None]
    return Summary(tables=tables, after=after)


def _gap_text(label: str, gap: dict[str, Any]) -> str:
    parts = [f"{what.replace('_', ' ')} {100 * g['difference']:+.2f} points (95% interval {100 * g['ci95'][0]:+.2f} "
             f"to {100 * g['ci95'][1]:+.2f})" for what, g in gap.items() if what != "noise"]
    groups = next(g["groups"] for what, g in gap.items() if what != "noise")
    return (f"ensemble of {ENSEMBLE_SIZE}, {label} minus {gap['noise']}: " + "; ".join(parts)
            + f", resampling {groups} groups of examples")


def _mean_and_std(draws: dict[str, float] | None) -> str:
    return "-" if draws is None else f"{100 * draws['mean']:.2f}% ± {100 * draws['std']:.2f}"


def _novelty_table(report: dict[str, Any]) -> TextTable:
    table = TextTable("novelty against the generator's training members (distances re-matched by weight matching)",
                      ["set", "NN ratio", "max agree", "max err-IoU", "copies", "nearer held-out"])
    for name, s in report["sets"].items():
        table.rows.append([name, f"{s['nn_ratio']['median']:.3f}", pct(s["max_agreement"]["median"]),
                           f"{s['max_error_iou']['median']:.2f}", pct(s["copy_rate"]), pct(s.get("holdout_nearer"))])
    return table


def _headline_table(report: dict[str, Any]) -> TextTable:
    bars = report["yardstick"]
    title = (f"accurate (>= {pct(bars['accuracy_bar'])}) and novel (max agreement <= {pct(bars['agreement_bar'])}, "
             f"NN ratio >= threshold): share of each set")
    table = TextTable(title, ["set", "mean acc", *(f"NN >= {t:g}" for t in bars["thresholds"])])
    matched = set((report.get("matched_noise") or {}).values())
    for name, shares in report["headline"].items():
        label = f"{name} (matched)" if name in matched else name
        table.rows.append([label, pct(report["sets"][name]["accuracy"]["mean"]), *(pct(v) for v in shares.values())])
    return table

"""The built-in novelty benchmark: are a generator's samples new networks as good as fresh training runs?

    python benchmarks/novelty.py --arch test_resnet --out runs/novelty-resnet
    python benchmarks/novelty.py --arch test_vit --out runs/novelty-vit
    python benchmarks/novelty.py --arch test_resnet --out runs/novelty-resnet --gen-name pca -- --space pca
    python benchmarks/novelty.py --arch test_resnet --out runs/units -- --space units --net graph
    python benchmarks/novelty.py --arch test_resnet --out runs/novelty-resnet --gen-name c1 --split val -- --space-args '{"snapshots": 1}'
    python benchmarks/novelty.py --arch test_vit --out runs/novelty-vit --gen-name s2 --split val -- --space subspace --space-args '{"simplices": 2}'

A zoo of ``--members`` on ``digits-hard`` (where models make mistakes: 3,590 test images), trained as
one shard per core; canonicalized; a generator trained on all but ``--held-out`` members (extra
``wgen train`` options after ``--``); ``--samples`` samples; ``wgen eval`` with every baseline. Prints
one JSON object: each stage's time and peak memory, the main rows of the report, the headline and
whether each bar of the strict protocol is met. Every stage is the CLI command a user would type;
re-running resumes every stage (a finished one is skipped), so a second generator on the same zoo
costs only its own stages when given a fresh ``--gen-name`` (its eval too: the baselines' measurements are kept in
``OUT/baselines`` and reused while the zoo, held-out members, split and wgen's code are the same). ``--split val`` judges on the val split
(report ``NAME-report-val.json``): the split to choose settings on, leaving test for the final figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import timm
import torch
from chain import stage

import wgen

MODEL_ARGS = {"test_vit": '{"img_size": 32, "patch_size": 8}'}  # 16 patches of a 32 px digit
EPOCHS = {"test_resnet": 4, "test_vit": 10}  # test ~93% and ~81% on digits-hard (docs/benchmarks.md)


def _at_least(value: float, bar: float) -> tuple[float, float, bool]:
    return value, bar, value >= bar


def _at_most(value: float, bar: float) -> tuple[float, float, bool]:
    return value, bar, value <= bar


def bars(report: dict[str, Any]) -> dict[str, Any]:
    """Return each bar of the protocol (issue 11): the samples' figure, the bar and whether it is met."""
    sets, samples, held = report["sets"], report["sets"]["samples"], report["sets"]["held-out"]
    headline, noise = report["headline"], report["matched_noise"]["raw"]
    result = {
        "median_nn_ratio>=0.5": _at_least(samples["nn_ratio"]["median"], 0.5),
        "mean_accuracy>=held_out_mean-1pt": _at_least(samples["accuracy"]["mean"], held["accuracy"]["mean"] - 0.01),
        "min_accuracy>=held_out_min-5pt": _at_least(samples["accuracy"]["min"], held["accuracy"]["min"] - 0.05),
        "median_max_agreement<=held_out_median+0.01": _at_most(samples["max_agreement"]["median"],
                                                                held["max_agreement"]["median"] + 0.01),
    }
    baselines = [name for name in headline if sets[name]["baseline"]]
    for threshold, share in headline["samples"].items():
        best = max(baselines, key=lambda name: headline[name][threshold])
        result[f"accurate_and_novel@{threshold}_beats_every_baseline"] = (
            share, best, headline[best][threshold], share > headline[best][threshold])
    ours, theirs = samples["ensemble_16"], sets[noise]["ensemble_16"] if noise else None
    result["ensemble_16>=matched_noise"] = (ours, noise, theirs, ours is not None and theirs is not None
                                            and ours >= theirs)
    # the same bar on the expected ensemble: the mean over random draws of 16 (the first 16 are one draw)
    ours, theirs = (s.get("ensemble_16_draws") for s in (samples, sets[noise] if noise else {}))
    result["ensemble_16_mean_of_draws>=matched_noise"] = (
        ours and ours["mean"], noise, theirs and theirs["mean"], bool(ours and theirs and ours["mean"] >= theirs["mean"]))
    return result


def shown(report: dict[str, Any]) -> list[str]:
    """Return the sets the benchmark shows: samples, the yardsticks, then every baseline of the headline."""
    sets = report["sets"]
    names = ["samples", "samples + BN", "held-out", "zoo", *(n for n in report["headline"] if sets[n]["baseline"])]
    return [n for n in names if n in sets]  # no "+ BN" rows for a model without BatchNorm


def markdown(report: dict[str, Any]) -> str:
    """Return the report's main rows as a markdown table: quality, novelty and the headline of each set."""
    sets, headline = report["sets"], report["headline"]
    matched = set(report["matched_noise"].values())
    lines = ["| set | models | accuracy mean (min) | NN ratio (median) | max agreement (median) | ensemble of 16 | "
             "ensemble of 16, mean of draws | "
             + " | ".join(f"accurate & novel @{t}" for t in headline["samples"]) + " |",
             "| --- " * (7 + len(headline["samples"])) + "|"]
    for name in shown(report):
        s = sets[name]
        shares = " | ".join(f"{100 * v:.0f}%" for v in headline[name].values()) if name in headline else \
            " | ".join("-" for _ in headline["samples"])
        ensemble = f"{100 * s['ensemble_16']:.2f}%" if s.get("ensemble_16") is not None else "-"
        draws = s.get("ensemble_16_draws")
        expected = f"{100 * draws['mean']:.2f}% ± {100 * draws['std']:.2f}" if draws else "-"
        label = f"{name} (matched)" if name in matched else name
        lines.append(f"| {label} | {s['models']} | {100 * s['accuracy']['mean']:.2f}% ({100 * s['accuracy']['min']:.2f}%) "
                     f"| {s['nn_ratio']['median']:.3f} | {100 * s['max_agreement']['median']:.1f}% | {ensemble} | {expected} "
                     f"| {shares} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="test_resnet")
    parser.add_argument("--model-args", default=None, help="JSON (default: a 32 px setting per architecture)")
    parser.add_argument("--members", type=int, default=32)
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per member (default: per architecture)")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--shards", type=int, default=len(os.sched_getaffinity(0)),
                        help="zoo processes at once (default: one per core)")
    parser.add_argument("--gen-name", default="gen", help="folder of this generator (and its samples, report)")
    parser.add_argument("--out", type=Path, default=Path("runs/novelty"))
    parser.add_argument("--split", choices=("test", "val"), default="test", help="the split eval judges on")
    parser.add_argument("--markdown", action="store_true", help="print the report's main rows as a markdown table")
    parser.add_argument("train_args", nargs="*", help="extra wgen train options, after --")
    args = parser.parse_args()
    root, gen, results = args.out, args.out / args.gen_name, {}
    model_args = args.model_args or MODEL_ARGS.get(args.arch, "{}")
    epochs = args.epochs or EPOCHS.get(args.arch, 10)
    stage("zoo", ["zoo", "-a", args.arch, "-d", "digits-hard", "--model-args", model_args, "-n", str(args.members),
                  "--epochs", str(epochs), "-o", str(root / "zoo")], results, parallel=args.shards)
    stage("canonicalize", ["canonicalize", str(root / "zoo"), "-o", str(root / "canon")], results)
    stage("train", ["train", str(root / "canon"), "-o", str(gen), "--holdout", str(args.held_out / args.members),
                    *args.train_args], results)
    samples = root / f"{args.gen_name}-samples"  # beside the generator: an output never lies inside an input
    stage("sample", ["sample", str(gen), "-n", str(args.samples), "-o", str(samples)], results)
    report_path = root / f"{args.gen_name}-report{'' if args.split == 'test' else '-' + args.split}.json"
    if not report_path.is_file():  # eval does not resume: a finished report is kept
        stage("eval", ["eval", str(samples), "--zoo", str(root / "canon"), "--split", args.split, "--out",
                       str(report_path), "--plot", str(report_path.with_suffix(".png")),
                       "--baseline-cache", str(root / "baselines")], results)
    report = json.loads(report_path.read_text())
    if args.markdown:
        print(markdown(report))
        return
    rows = {name: {"models": s["models"], "accuracy_mean": s["accuracy"]["mean"], "accuracy_min": s["accuracy"]["min"],
                   "nn_ratio_median": s["nn_ratio"]["median"], "max_agreement_median": s["max_agreement"]["median"]}
            for name, s in ((name, report["sets"][name]) for name in shown(report))}
    print(json.dumps({
        "benchmark": "novelty", "architecture": args.arch, "model_args": json.loads(model_args), "data": "digits-hard",
        "members": args.members, "held_out": args.held_out, "epochs": epochs, "train_args": args.train_args,
        "split": args.split,
        "machine": platform.processor() or platform.machine(), "cpus": len(os.sched_getaffinity(0)),
        "versions": {"wgen": wgen.__version__, "torch": torch.__version__, "timm": timm.__version__},
        "stages": results, "rows": rows, "matched_noise": report["matched_noise"], "headline": report["headline"],
        "bars": bars(report), "ensemble_gap": report.get("ensemble_gap"), "report": str(report_path),
        "baselines_from_cache": report.get("baselines_from_cache"),
    }, indent=2, default=str))


if __name__ == "__main__":
    main()

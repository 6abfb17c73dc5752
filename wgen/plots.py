"""The eval report as a PNG: accuracy against agreement and against NN ratio, the headline, the ensembles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .outputs import atomic_file  # noqa: E402

COLOURS = {"zoo": "#1f77b4", "held-out": "#17becf", "samples": "#d62728", "models": "#d62728",
           "interpolation": "#2ca02c", "gaussian": "#8c564b"}


def _colour(name: str) -> str | None:
    base = name.removesuffix(" + BN")
    if base.startswith("noise"):
        return "#7f7f7f"
    if base.startswith("soup"):
        return "#9467bd"
    return COLOURS.get(base)


def _style(name: str) -> dict[str, Any]:
    return {"color": _colour(name), "marker": "x" if name.endswith(" + BN") else "o"}


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Write the figure of ``report`` to ``path`` (PNG, atomically)."""
    sets = report["sets"]
    shown = [n for n in sets if not n.startswith("noise ")] + [n for n in (report.get("matched_noise") or {}).values() if n]
    if "headline" in report:
        fig, grid = plt.subplots(2, 2, figsize=(13, 10))
        axes = list(grid.flat)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    if "headline" in report:
        bars = report["yardstick"]
        for ax, key, label in ((axes[0], "max_agreement", "largest agreement with a training member"),
                               (axes[1], "nn_ratio", "NN ratio (re-matched)")):
            for name in shown:
                ax.scatter(sets[name][f"per_model_{key}"], sets[name]["per_model_accuracy"], s=12, alpha=0.6,
                           label=name, **_style(name))
            ax.axhline(bars["accuracy_bar"], color="black", lw=0.8, ls="--")
            if key == "max_agreement":
                ax.axvline(bars["agreement_bar"], color="black", lw=0.8, ls="--")
            ax.set_xlabel(label)
            ax.set_ylabel(f"{report['split']} accuracy")
        axes[0].set_title("accurate (above the line) and unlike any member (left)")
        axes[1].set_title("accuracy against distance from the training members")
        axes[0].legend(fontsize=7)
        _headline(axes[2], report)
    _ensembles(axes[-1], report, shown)
    _histogram(axes[-2] if "headline" not in report else None, report, shown)
    fig.suptitle(f"{report['architecture']} on {report['data']} ({report['examples']} {report['split']} examples)")
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


def _headline(ax: Any, report: dict[str, Any]) -> None:
    names = list(report["headline"])
    thresholds = report["yardstick"]["thresholds"]
    width = 0.8 / len(thresholds)
    for k, t in enumerate(thresholds):
        values = [100 * report["headline"][n][f"{t:g}"] for n in names]
        ax.bar([i + k * width for i in range(len(names))], values, width, label=f"NN ratio >= {t:g}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("% accurate and novel")
    ax.set_title("the headline: accurate and novel")
    ax.legend(fontsize=7)


def _ensembles(ax: Any, report: dict[str, Any], shown: list[str]) -> None:
    for name in shown:
        points = report["sets"][name]["ensemble"]
        ax.plot([p["size"] for p in points], [p["accuracy"] for p in points], label=name, ms=3, **_style(name))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ensemble size")
    ax.set_ylabel(f"ensemble {report['split']} accuracy")
    ax.set_title("ensembles")
    ax.legend(fontsize=7)


def _histogram(ax: Any, report: dict[str, Any], shown: list[str]) -> None:
    if ax is None:
        return
    models = [n for n in shown if not report["sets"][n].get("baseline")]
    low = max(0.0, min(min(report["sets"][n]["per_model_accuracy"]) for n in models) - 0.01)
    bins = [low + (1 - low) * i / 30 for i in range(31)]
    for name in models:
        ax.hist(report["sets"][name]["per_model_accuracy"], bins=bins, histtype="step", linewidth=2, label=name,
                color=_colour(name))
    ax.set_xlabel(f"{report['split']} accuracy")
    ax.set_ylabel("models")
    ax.set_title("accuracy of single models")
    ax.legend(fontsize=7)

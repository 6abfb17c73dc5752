"""The eval report as a PNG: accuracy vs error-IoU, accuracy histogram, ensemble curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .outputs import atomic_file  # noqa: E402

COLOURS = {"zoo": "#1f77b4", "samples": "#d62728", "models": "#d62728", "interpolation": "#2ca02c"}


def _colour(name: str) -> str | None:
    if name.startswith("noise"):
        return "#7f7f7f"
    if name.startswith("soup"):
        return "#9467bd"
    return COLOURS.get(name)


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Write the three-panel figure of ``report`` to ``path`` (PNG, atomically)."""
    sets = report["sets"]
    shown = [n for n in sets if not n.startswith("noise") or n == report.get("matched_noise")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    scatter, hist, curve = axes
    for name in shown:
        s = sets[name]
        if "per_model_max_error_iou" in s:
            scatter.scatter(s["per_model_max_error_iou"], s["per_model_accuracy"], s=14, alpha=0.6,
                            label=name, color=_colour(name))
    scatter.set_xlabel("max IoU of errors with a training member")
    scatter.set_ylabel(f"{report['split']} accuracy")
    scatter.set_title("accuracy vs. copying (right = like a training member)")
    if scatter.collections:
        scatter.legend(fontsize=8)
    models = [n for n in shown if not sets[n].get("baseline")]
    low = max(0.0, min(min(sets[n]["per_model_accuracy"]) for n in models) - 0.01)
    bins = [low + (1 - low) * i / 30 for i in range(31)]
    for name in models:
        hist.hist(sets[name]["per_model_accuracy"], bins=bins, histtype="step", linewidth=2, label=name,
                  color=_colour(name))
    hist.set_xlabel(f"{report['split']} accuracy")
    hist.set_ylabel("models")
    hist.set_title("accuracy of single models")
    hist.legend(fontsize=8)
    for name in shown:
        points = sets[name]["ensemble"]
        curve.plot([p["size"] for p in points], [p["accuracy"] for p in points], marker="o", ms=3, label=name,
                   color=_colour(name))
    curve.set_xscale("log", base=2)
    curve.set_xlabel("ensemble size")
    curve.set_ylabel(f"ensemble {report['split']} accuracy")
    curve.set_title("ensembles")
    curve.legend(fontsize=8)
    fig.suptitle(f"{report['architecture']} on {report['data']} ({report['examples']} {report['split']} examples)")
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)

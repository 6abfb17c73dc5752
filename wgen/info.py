"""Say what a path is: a zoo, a canonical zoo, a generator, a folder of samples, a checkpoint folder or one member."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from .checkpoints import TORCH_WEIGHTS_NAME, WEIGHTS_NAME, ZOO_JSON, open_zoo, read_json, zoo_fingerprint
from .flow.generator import SPACE_NAME, load_generator
from .flow.sample import MANIFEST_JSON
from .flow.train import steps_text
from .permute.canonicalize import CANONICAL_JSON
from .tables import Summary, TextTable, pct

Rows = list[tuple[str, str]]
_WEIGHTS = {"state_dict_ema": "EMA", "model_ema": "EMA", "state_dict": "raw", "model": "raw", "model_state": "raw",
            "file": "the whole file"}


def describe(path: Path | str, arch: str | None = None, model_args: dict[str, Any] | None = None,
             skip_bad: bool = False, weights: str = "auto", pick: str = "last") -> dict[str, Any]:
    """Return a JSON-ready description of ``path``: kind, architecture, counts, accuracy summary, and
    ``rows``, the same as ``(label, text)`` pairs for people."""
    root = Path(path)
    if root.is_dir() and (root / SPACE_NAME).is_file():
        return _describe_generator(root)
    zoo = open_zoo(root, arch, model_args, skip_bad, weights, pick)
    model = zoo.spec.create("meta")
    description: dict[str, Any] = {
        "path": str(root), "kind": _kind(root), **zoo.spec.to_json(), "members": len(zoo.members),
        "parameters": sum(p.numel() for p in model.parameters()), "skipped": zoo.skipped,
        "weights": dict(Counter(zoo.sources.values())),
    }
    if zoo.info:
        description.update({k: zoo.info[k] for k in ("data", "input_size", "split") if k in zoo.info})
    elif len(zoo.members) == 1 and zoo.members[0].config:
        description["input_size"] = zoo.members[0].config.get("pretrained_cfg", {}).get("input_size")
    for key in ("val_accuracy", "test_accuracy"):
        values = [m.provenance[key] for m in zoo.members
                  if isinstance(m.provenance.get(key), (int, float)) and math.isfinite(m.provenance[key])]
        if values:
            description[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
                                "count": len(values)}
    if description["kind"] == "samples":
        manifest = read_json(root / MANIFEST_JSON)
        description["samples"] = {k: manifest.get(k) for k in ("count", "rejected", "solver", "steps", "seed",
                                                                "projected", "calibrate", "generator")}
    description["fingerprint"] = zoo_fingerprint(zoo)
    description["rows"] = _zoo_rows(description)
    return description


def _describe_generator(root: Path) -> dict[str, Any]:
    generator = load_generator(root)
    c = generator.config
    training = {k: c.training.get(k) for k in ("steps", "batch_size", "lr", "seconds", "device", "final_loss",
                                                 "final_val_loss", "world_size")}
    description = {
        "path": str(root), "kind": "generator", **c.spec.to_json(), "input_size": c.input_size, "data": c.data,
        "space": {k: c.space.get(k) for k in c.space if k != "slots"}, "net": c.net,
        "net_parameters": c.net_parameters, "members": len(c.train_members), "holdout_members": len(c.holdout_members),
        "source": c.source, "source_fingerprint": c.source_fingerprint, "canonical_source": c.canonical,
        "training": training, "skipped": [], "fingerprint": generator.fingerprint,
    }
    val = training["final_val_loss"]
    description["rows"] = [
        *_spec_rows(description),
        ("space", generator.space.describe()),
        ("velocity net", f"{c.net['kind']}, {c.net_parameters:,} parameters "
                         f"({', '.join(f'{k} {v}' for k, v in c.net.items() if k != 'kind')})"),
        ("members", f"{len(c.train_members)} training, {len(c.holdout_members)} held out"),
        ("source", c.source + (" (canonical)" if c.canonical else "")),
        ("training", f"{steps_text(c)}, {training['seconds']}s on {training['device']}, loss "
                     f"{training['final_loss']:.4f}" + (f", held-out {val:.4f}" if val is not None else "")),
        *_optional_rows(description),
        ("fingerprint", generator.fingerprint[:16]),
    ]
    return description


def _zoo_rows(d: dict[str, Any]) -> Rows:
    rows = [*_spec_rows(d), ("members", str(d["members"])), ("parameters", f"{d['parameters']:,}"), *_optional_rows(d)]
    if set(d["weights"]) != {"file"}:  # training checkpoints: say which of their state dicts are the members
        rows.append(("weights", ", ".join(f"{_WEIGHTS.get(k, k)} ({k}) in {n}" for k, n in d["weights"].items())))
    for key in ("val_accuracy", "test_accuracy"):
        if key in d:
            s = d[key]
            rows.append((key.replace("_", " "), f"mean {pct(s['mean'])}  min {pct(s['min'])}  max {pct(s['max'])}"))
    if "samples" in d:
        m = d["samples"]
        how = "drawn" if m.get("drawn") else f"{m['solver']} x{m['steps']}"
        rows.append(("sampling", f"{m['count']} asked, {m['rejected']} rejected; {how}, seed "
                                 f"{m['seed']}" + (", projected" if m.get("projected") else "")
                                 + (f", calibrated on {m['calibrate']}" if m["calibrate"] else "")))
    if d["skipped"]:
        rows.append(("skipped", str(len(d["skipped"]))))
    return [*rows, ("fingerprint", d["fingerprint"][:16])]


def _spec_rows(d: dict[str, Any]) -> Rows:
    return [("kind", d["kind"]), ("architecture", d["architecture"]), ("num classes", str(d["num_classes"])),
            ("model args", json.dumps(d["model_args"]))]


def _optional_rows(d: dict[str, Any]) -> Rows:
    return [(key.replace("_", " "), str(d[key])) for key in ("input_size", "data") if d.get(key) is not None]


def _kind(root: Path) -> str:
    if root.is_file():
        return "checkpoint file"
    if (root / CANONICAL_JSON).is_file():
        return "canonical zoo"
    if (root / MANIFEST_JSON).is_file():
        return "samples"
    if (root / ZOO_JSON).is_file():
        return "zoo"
    if (root / WEIGHTS_NAME).is_file() or (root / TORCH_WEIGHTS_NAME).is_file():
        return "member"
    return "checkpoint folder"


def info_summary(description: dict[str, Any]) -> Summary:
    """Return the table ``wgen info`` shows: one row a fact."""
    return Summary(tables=[TextTable(description["path"], ["", ""], [list(r) for r in description["rows"]],
                                     header=False)])

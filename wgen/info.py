"""Say what a path is: a zoo, a canonical zoo, a folder of samples, a plain checkpoint folder or one member."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .checkpoints import TORCH_WEIGHTS_NAME, WEIGHTS_NAME, ZOO_JSON, open_zoo, read_json, zoo_fingerprint
from .flow.sample import MANIFEST_JSON
from .permute.canonicalize import CANONICAL_JSON


def describe(path: Path | str, arch: str | None = None, model_args: dict[str, Any] | None = None,
             skip_bad: bool = False) -> dict[str, Any]:
    """Return a JSON-ready description of ``path``: kind, architecture, counts and accuracy summary."""
    root = Path(path)
    if root.is_dir() and (root / "space.safetensors").is_file():
        return _describe_generator(root)
    zoo = open_zoo(root, arch=arch, model_args=model_args, skip_bad=skip_bad)
    model = zoo.spec.create("meta")
    description: dict[str, Any] = {
        "path": str(root),
        "kind": _kind(root),
        **zoo.spec.to_json(),
        "members": len(zoo.members),
        "parameters": sum(p.numel() for p in model.parameters()),
        "skipped": zoo.skipped,
    }
    if zoo.info:
        description.update({k: zoo.info[k] for k in ("data", "input_size", "split") if k in zoo.info})
    elif len(zoo.members) == 1 and zoo.members[0].config:
        pretrained = zoo.members[0].config.get("pretrained_cfg", {})
        description["input_size"] = pretrained.get("input_size")
    for key in ("val_accuracy", "test_accuracy"):
        values = [m.provenance[key] for m in zoo.members
                  if isinstance(m.provenance.get(key), (int, float)) and math.isfinite(m.provenance[key])]
        if values:
            description[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
                                "count": len(values)}
    if description["kind"] == "samples":
        manifest = read_json(root / MANIFEST_JSON)
        description["samples"] = {k: manifest.get(k) for k in ("count", "rejected", "solver", "steps", "seed", "projected",
                                                                "calibrate", "generator")}
    description["fingerprint"] = zoo_fingerprint(zoo)
    return description


def _describe_generator(root: Path) -> dict[str, Any]:
    from .flow.sample import load_generator

    generator = load_generator(root)
    c = generator.config
    training = c["training"]
    return {"path": str(root), "kind": "generator", "architecture": c["architecture"], "num_classes": c["num_classes"],
            "model_args": c.get("model_args", {}), "input_size": c.get("input_size"), "data": c.get("data"),
            "space": {k: c["space"].get(k) for k in ("kind", "dim", "values", "radius")}, "net": c["net"],
            "net_parameters": c["net_parameters"], "members": len(c["members"]["train"]),
            "holdout_members": len(c["members"]["holdout"]), "source": c["source"],
            "source_fingerprint": c["source_fingerprint"], "canonical_source": c.get("canonical", False),
            "training": {k: training.get(k) for k in ("steps", "batch_size", "lr", "seconds", "device",
                                                       "final_loss", "final_val_loss", "world_size")},
            "skipped": [], "fingerprint": generator.fingerprint}


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

"""The generator folder: its typed config, and the one place that writes and reads it.

A generator is ``config.json`` (:class:`GeneratorConfig`), ``model.safetensors`` (the velocity net's
EMA weights under their parameter names) and ``space.safetensors`` (the weight space's tensors),
both safetensors files carrying the format and wgen version in their metadata. ``config.json`` is
written last: a folder without it is an unfinished training run.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ..checkpoints import CONFIG_NAME, WEIGHTS_NAME, ModelSpec, read_json
from ..errors import WgenError
from ..outputs import atomic_file, atomic_write_json, sha256_file
from ..version import __version__
from .nets import load_net
from .nets.base import VelocityNet
from .spaces import load_space
from .spaces.base import WeightSpace

GENERATOR_FORMAT = "wgen.generator/1"
SPACE_NAME = "space.safetensors"
_FILES = (CONFIG_NAME, WEIGHTS_NAME, SPACE_NAME)


@dataclass
class GeneratorConfig:
    """What ``config.json`` of a generator holds: the networks it emits, where it came from, how it was made."""

    spec: ModelSpec
    input_size: list[int]
    mean: list[float]
    std: list[float]
    data: str | None
    split: dict[str, Any] | None
    source: str
    source_fingerprint: str
    canonical: bool
    train_members: list[str]
    holdout_members: list[str]
    space: dict[str, Any]  # the space's saved config: kind and its own keys
    net: dict[str, Any]  # the net's config: kind and settings
    net_parameters: int
    training: dict[str, Any]  # every training setting, device, seconds, final losses
    history: list[dict[str, Any]] = field(default_factory=list)
    wgen_version: str = __version__

    def to_json(self) -> dict[str, Any]:
        """Return the config as written to ``config.json``."""
        value = {"format": GENERATOR_FORMAT, "wgen_version": self.wgen_version, **self.spec.to_json()}
        value.update({k: v for k, v in asdict(self).items()
                      if k not in ("spec", "train_members", "holdout_members", "wgen_version")})
        value["members"] = {"train": self.train_members, "holdout": self.holdout_members}
        order = ("format", "wgen_version", "architecture", "num_classes", "model_args", "input_size", "mean", "std",
                 "data", "split", "source", "source_fingerprint", "canonical", "members", "space", "net",
                 "net_parameters", "training", "history")
        return {k: value[k] for k in order}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> GeneratorConfig:
        """Return the config stored in a ``config.json`` (of this or an earlier wgen)."""
        spec = ModelSpec(value["architecture"], int(value["num_classes"]), dict(value.get("model_args") or {}))
        return cls(spec, list(value["input_size"]), list(value["mean"]), list(value["std"]), value.get("data"),
                   value.get("split"), value["source"], value["source_fingerprint"], bool(value.get("canonical")),
                   list(value["members"]["train"]), list(value["members"]["holdout"]), dict(value["space"]),
                   {"kind": "mlp", **value["net"]}, int(value["net_parameters"]), dict(value["training"]),
                   list(value.get("history", [])), value.get("wgen_version", "0.1.0"))


@dataclass
class Generator:
    """A trained generator: its config, weight space and velocity net (EMA weights, eval mode)."""

    path: Path
    config: GeneratorConfig
    space: WeightSpace
    net: VelocityNet
    fingerprint: str  # sha256 over the generator's files

    @property
    def spec(self) -> ModelSpec:
        """Return the model spec of the networks this generator emits."""
        return self.config.spec


def write_generator(out: Path, config: GeneratorConfig, space_tensors: dict[str, torch.Tensor],
                    weights: dict[str, torch.Tensor]) -> None:
    """Write the generator files into folder ``out``: the space's and the net's tensors, then ``config.json``."""
    metadata = {"format": GENERATOR_FORMAT, "wgen_version": __version__}
    for name, tensors in ((WEIGHTS_NAME, weights), (SPACE_NAME, space_tensors)):
        with atomic_file(out / name) as tmp:
            safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                                        metadata=metadata)
    atomic_write_json(out / CONFIG_NAME, config.to_json())


def read_generator_config(path: Path) -> GeneratorConfig:
    """Return the config of the generator folder ``path``, or a WgenError saying why it is not one."""
    if not path.exists():
        raise WgenError(f"{path}: no such folder", "point at the folder `wgen train` wrote")
    if not (path / CONFIG_NAME).is_file():
        raise WgenError(f"{path}: not a generator (no config.json)", "point at the folder `wgen train` wrote")
    value = read_json(path / CONFIG_NAME)
    if value.get("format") != GENERATOR_FORMAT:
        raise WgenError(f"{path}: not a generator (format {value.get('format')!r})",
                        "point at the folder `wgen train` wrote")
    return GeneratorConfig.from_json(value)


def load_generator(path: Path | str, device: torch.device | str = "cpu") -> Generator:
    """Return the generator stored in folder ``path``, on ``device``."""
    root = Path(path)
    config = read_generator_config(root)
    try:
        weights = safetensors.torch.load_file(str(root / WEIGHTS_NAME))
        space_tensors = safetensors.torch.load_file(str(root / SPACE_NAME))
    except Exception as exc:  # safetensors raises its own error types for missing or bad files
        raise WgenError(f"{root}: generator files are missing or unreadable ({' '.join(str(exc).split())[:120]})",
                        "re-train the generator") from exc
    space = load_space(config.space, space_tensors).to(device)
    net = load_net(config.net, space)
    net.load_state_dict(weights)
    digest = hashlib.sha256()
    for name in _FILES:
        digest.update(sha256_file(root / name).encode())
    return Generator(root, config, space, net.to(device).eval(), digest.hexdigest())

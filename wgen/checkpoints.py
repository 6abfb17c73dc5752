"""Zoos: one architecture across members, every member validated; timm local-dir members written; fingerprints.

A *member* is one checkpoint. On disk wgen writes it in timm's local-dir layout (``config.json`` +
``model.safetensors``) so that ``timm.create_model("local-dir:PATH", pretrained=True)`` loads it.
Zoos from elsewhere come in every form ``readers.py`` knows, with the architecture from the
members' configs, ``--arch``, a folder-level ``config.json`` or the training checkpoint itself.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch

from .errors import WgenError
from .outputs import write_folder
from .readers import (CONFIG_NAME, TORCH_WEIGHTS_NAME, WEIGHTS_CHOICES, WEIGHTS_NAME, Checkpoint, MemberRef,
                      find_members, one_line, read_checkpoint, read_json)
from .version import __version__

ZOO_JSON = "zoo.json"

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to build the network of a member: timm name, classes and extra args."""

    architecture: str
    num_classes: int
    model_args: dict[str, Any] = field(default_factory=dict)

    def create(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """Return a freshly initialised timm model of this spec on ``device``."""
        return create_model(self.architecture, self.num_classes, self.model_args, device)

    def reference(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Return ``{key: (shape, dtype)}`` of this spec's state dict, built without weights."""
        model = self.create("meta")
        return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}

    def to_json(self) -> dict[str, Any]:
        """Return the spec as the JSON keys timm's ``config.json`` uses."""
        return {"architecture": self.architecture, "num_classes": self.num_classes,
                "model_args": dict(self.model_args)}


def create_model(architecture: str, num_classes: int | None, model_args: dict[str, Any],
                 device: torch.device | str = "cpu") -> torch.nn.Module:
    """Return ``timm.create_model(architecture, ...)`` or a ``WgenError`` saying what is wrong."""
    if not timm.is_model(architecture):
        raise WgenError(f"unknown timm architecture {architecture!r}",
                        "run python -c \"import timm; print(timm.list_models('*name*'))\" to find it")
    kwargs = dict(model_args)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        with torch.device(device):
            return timm.create_model(architecture, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise WgenError(f"timm cannot build {architecture} with model args {json.dumps(kwargs)}: "
                        f"{one_line(exc)}", "check --model-args against the model's signature") from exc


def parse_model_args(text: str | None) -> dict[str, Any]:
    """Return the dict of a ``--model-args`` JSON object (``{}`` for None or empty)."""
    return parse_json_object(text, "--model-args", '{"img_size": 32, "patch_size": 4}')


def parse_json_object(text: str | None, option: str, example: str) -> dict[str, Any]:
    """Return the dict of option ``option``'s JSON object (``{}`` for None or empty); ``example`` is its hint."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WgenError(f"{option} is not valid JSON: {exc.msg} at char {exc.pos}",
                        f"give a JSON object, e.g. '{example}'") from exc
    if not isinstance(value, dict):
        raise WgenError(f"{option} must be a JSON object", f"e.g. '{example}'")
    return value


# --------------------------------------------------------------------------------------------
# reading


@dataclass
class Zoo:
    """A validated set of members of one architecture."""

    root: Path
    spec: ModelSpec
    members: list[MemberRef]
    info: dict[str, Any]  # zoo.json contents, {} for folders wgen did not write
    skipped: list[str] = field(default_factory=list)  # messages of members dropped by skip_bad
    weights: str = "auto"  # which state dict of a training checkpoint is the member (auto, ema, raw)
    sources: dict[str, str] = field(default_factory=dict)  # member -> the entry its weights came from

    def load(self, member: MemberRef) -> StateDict:
        """Return the state dict of ``member``, normalised like every member of this zoo."""
        tensors = read_checkpoint(member.weights, self.weights).tensors
        return normalize_state_dict(tensors, self.spec.reference(), member.weights)

    def preprocessing(self) -> tuple[tuple[int, int, int], tuple[float, ...], tuple[float, ...]]:
        """Return ``(input_size, mean, std)`` from zoo.json, else the first member's config, else timm's."""
        if "input_size" in self.info:
            source = self.info
        else:
            source = next((m.config.get("pretrained_cfg", {}) for m in self.members if m.config), {})
        if "input_size" not in source:
            source = self.spec.create("meta").pretrained_cfg
        size = tuple(int(v) for v in source["input_size"])
        channels = int(self.spec.model_args.get("in_chans", size[0]))
        mean = tuple(source.get("mean", (0.5,) * channels))
        std = tuple(source.get("std", (0.5,) * channels))
        return (channels, size[1], size[2]), mean, std


def normalize_state_dict(tensors: StateDict, reference: dict[str, tuple[tuple[int, ...], torch.dtype]],
                         where: Path | str) -> StateDict:
    """Return ``tensors`` checked against ``reference``: keys, shapes, finiteness; floats as float32.

    BatchNorm's ``num_batches_tracked`` counters carry no function and are filled with zeros when a
    checkpoint omits them; every other missing or unexpected key is an error naming ``where``.
    """
    missing = [k for k in reference if k not in tensors and not k.endswith("num_batches_tracked")]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WgenError(f"{where}: missing key {missing[0]!r}{more}",
                        "the checkpoint does not match the architecture or --model-args")
    unexpected = [k for k in tensors if k not in reference]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WgenError(f"{where}: unexpected key {unexpected[0]!r}{more}",
                        "the checkpoint does not match the architecture or --model-args")
    out: StateDict = {}
    for key, (shape, dtype) in reference.items():
        value = tensors.get(key)
        if value is None:
            out[key] = torch.zeros(shape, dtype=dtype)
            continue
        if tuple(value.shape) != shape:
            raise WgenError(f"{where}: {key!r} has shape {tuple(value.shape)}, expected {shape}",
                            "the checkpoint does not match the architecture or --model-args")
        if value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                raise WgenError(f"{where}: {key!r} holds non-finite values (nan or inf)",
                                "leave this checkpoint out, or replace it")
            value = value.float() if dtype.is_floating_point else value
        out[key] = value.to(dtype) if value.dtype != dtype else value
    return out


def resolve_spec(refs: list[MemberRef], folder_config: dict[str, Any] | None, arch: str | None,
                 model_args: dict[str, Any] | None, first: Checkpoint | None = None) -> ModelSpec:
    """Return the one ModelSpec every member shares, or an error naming the member that differs.

    Precedence: member ``config.json`` files, then ``--arch``/``--model-args``, then a folder-level
    ``config.json``, then the architecture a training checkpoint names (timm's ``arch``, Lightning's
    hyper-parameters). ``num_classes`` (and ``in_chans``) missing everywhere are read off the
    classifier (and stem) weights of ``first``.
    """
    specs = [(r, _spec_from_config(r.config, r.weights.parent / CONFIG_NAME)) for r in refs if r.config]
    if specs:
        first_ref, first = specs[0]
        for ref, spec in specs[1:]:
            if spec.architecture != first.architecture:
                raise WgenError(f"{ref.name}: architecture {spec.architecture!r} differs from "
                                f"{first.architecture!r} of {first_ref.name}",
                                "a zoo holds one architecture; move the other members out")
            if spec != first:
                raise WgenError(f"{ref.name}: model config {spec.to_json()} differs from "
                                f"{first.to_json()} of {first_ref.name}",
                                "a zoo holds one architecture with one set of model args")
        if arch and arch != first.architecture:
            raise WgenError(f"--arch {arch} contradicts {first.architecture!r} in {first_ref.name}/config.json",
                            "drop --arch: members carry their own config")
        if model_args and any(first.model_args.get(k) != v for k, v in model_args.items()):
            raise WgenError(f"--model-args {json.dumps(model_args)} contradicts {json.dumps(first.model_args)} in "
                            f"{first_ref.name}/config.json", "drop --model-args: members carry their own config")
        if len(specs) < len(refs):
            bare = next(r for r in refs if not r.config)
            raise WgenError(f"{bare.name}: has no config.json while other members do",
                            "give every member a config.json, or none and use --arch")
        return first
    if arch is None and folder_config is not None:
        base = _spec_from_config(folder_config, refs[0].weights.parent / CONFIG_NAME, need_classes=False)
        arch, model_args = base.architecture, {**base.model_args, **(model_args or {})}
        if base.num_classes:
            model_args.setdefault("num_classes", base.num_classes)
    if arch is None and first is not None and first.arch is not None and timm.is_model(first.arch):
        arch, model_args = first.arch, {**first.model_args, **(model_args or {})}
    if arch is None:
        raise WgenError("the checkpoints carry no architecture",
                        "pass --arch NAME (and --model-args JSON), or add a folder-level config.json")
    args = dict(model_args or {})
    num_classes = args.pop("num_classes", None)
    if first is not None:
        num_classes, args = _infer_head_and_stem(arch, num_classes, args, first.tensors)
    return ModelSpec(arch, int(num_classes if num_classes is not None else 1000), args)


def _spec_from_config(config: dict[str, Any], where: Path, need_classes: bool = True) -> ModelSpec:
    arch = config.get("architecture")
    if not isinstance(arch, str):
        raise WgenError(f"{where}: has no 'architecture'", "timm configs name the architecture")
    pretrained = config.get("pretrained_cfg", {})
    num_classes = config.get("num_classes", pretrained.get("num_classes") if isinstance(pretrained, dict) else None)
    if num_classes is None and need_classes:
        raise WgenError(f"{where}: has no 'num_classes'", "add it to config.json")
    return ModelSpec(arch, int(num_classes or 0), dict(config.get("model_args") or {}))


def _infer_head_and_stem(arch: str, num_classes: int | None, args: dict[str, Any],
                         state: StateDict) -> tuple[int | None, dict[str, Any]]:
    cfg = create_model(arch, num_classes, args, "meta").pretrained_cfg
    classifier, first_conv = cfg.get("classifier"), cfg.get("first_conv")
    classifier = classifier[0] if isinstance(classifier, (list, tuple)) else classifier
    first_conv = first_conv[0] if isinstance(first_conv, (list, tuple)) else first_conv
    head = state.get(f"{classifier}.weight")
    if num_classes is None and head is not None and head.ndim >= 1:
        num_classes = int(head.shape[0])
    stem = state.get(f"{first_conv}.weight")
    if "in_chans" not in args and stem is not None and stem.ndim == 4 and stem.shape[1] != 3:
        args = {**args, "in_chans": int(stem.shape[1])}
    return num_classes, args


def open_zoo(path: Path | str, arch: str | None = None, model_args: dict[str, Any] | None = None,
             skip_bad: bool = False, weights: str = "auto", pick: str = "last", skip_hint: bool = True) -> Zoo:
    """Return the validated zoo at ``path`` (any form ``readers.find_members`` knows).

    Every member is read once and checked against the architecture (keys, shapes, finite values).
    With ``skip_bad`` a bad member is dropped and its message kept in ``Zoo.skipped``; without it
    the first bad member raises (its hint suggests ``--skip-bad`` when ``skip_hint``). ``weights``
    and ``pick`` choose within training checkpoints (see ``readers``). Nothing on disk is changed.
    """
    if weights not in WEIGHTS_CHOICES:
        raise WgenError(f"unknown --weights {weights!r}", f"use one of {', '.join(WEIGHTS_CHOICES)}")
    root = Path(path)
    refs, folder_config = find_members(root, pick)
    first = None if any(r.config for r in refs) else _first_readable(refs, weights, skip_bad)
    spec = resolve_spec(refs, folder_config, arch, model_args, first)
    reference = spec.reference()
    good, skipped, sources = [], [], {}
    for ref in refs:
        try:
            checkpoint = read_checkpoint(ref.weights, weights)
            normalize_state_dict(checkpoint.tensors, reference, ref.weights)
        except WgenError as exc:
            if not skip_bad:
                hint = exc.hint if "--skip-bad" in exc.hint or not skip_hint else f"{exc.hint}; or pass --skip-bad to drop bad members"
                raise WgenError(exc.message, hint) from exc
            skipped.append(exc.message)
            continue
        good.append(ref)
        sources[ref.name] = checkpoint.weights
    if not good:
        raise WgenError(f"{root}: no usable checkpoints ({len(skipped)} bad; the first: {skipped[0]})",
                        "fix or replace the files named")
    info = read_json(root / ZOO_JSON) if root.is_dir() and (root / ZOO_JSON).is_file() else {}
    return Zoo(root, spec, good, info, skipped, weights, sources)


def _first_readable(refs: list[MemberRef], weights: str, skip_bad: bool) -> Checkpoint | None:
    for ref in refs:
        try:
            return read_checkpoint(ref.weights, weights)
        except WgenError:
            if not skip_bad:
                raise
    return None


# --------------------------------------------------------------------------------------------
# writing


def member_config(spec: ModelSpec, input_size: tuple[int, int, int], mean: tuple[float, ...],
                  std: tuple[float, ...], provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the timm ``config.json`` of a member: spec, preprocessing and a ``wgen`` block."""
    timm_fields, num_features = _timm_config_fields(json.dumps(spec.to_json(), sort_keys=True))
    pretrained = {**timm_fields, "input_size": list(input_size), "mean": list(mean), "std": list(std),
                  "num_classes": spec.num_classes}
    config = {**spec.to_json(), "num_features": num_features, "pretrained_cfg": pretrained}
    config["wgen"] = {"version": __version__, **(provenance or {})}
    return config


@functools.lru_cache(maxsize=16)
def _timm_config_fields(spec_json: str) -> tuple[dict[str, Any], int | None]:
    """Return timm's own pretrained_cfg fields and num_features of a spec (built once per spec)."""
    spec = json.loads(spec_json)
    model = create_model(spec["architecture"], spec["num_classes"], spec["model_args"], "meta")
    fields = {k: v for k, v in model.pretrained_cfg.items()
              if k in ("interpolation", "crop_pct", "crop_mode", "first_conv", "classifier",
                       "fixed_input_size", "license") and v is not None}
    return fields, getattr(model, "num_features", None)


def write_member(path: Path, state_dict: StateDict, config: dict[str, Any]) -> dict[str, str]:
    """Write one member (``config.json`` + ``model.safetensors``) atomically at ``path``.

    Returns the sha256 of each file written, hashed from the bytes as they were written.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    return write_folder(path, {WEIGHTS_NAME: [safetensors.torch.save(tensors, metadata={"format": "pt"})],
                               CONFIG_NAME: [config_bytes(config)]})


def config_bytes(config: dict[str, Any]) -> bytes:
    """Return a member's ``config.json`` as written."""
    return (json.dumps(config, indent=2) + "\n").encode()


# --------------------------------------------------------------------------------------------
# fingerprints


def state_dict_fingerprint(state_dict: StateDict) -> str:
    """Return the sha256 of a state dict's names, dtypes, shapes and values (format independent)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def zoo_fingerprint(zoo: Zoo, states: list[StateDict] | None = None) -> str:
    """Return the sha256 of a zoo: its model spec and every member's name and weights, in order.

    ``states`` are the members' state dicts when the caller has loaded them already (not re-read).
    """
    digest = hashlib.sha256(json.dumps(zoo.spec.to_json(), sort_keys=True).encode())
    for i, member in enumerate(zoo.members):
        state = states[i] if states is not None else zoo.load(member)
        digest.update(f"{member.name}:{state_dict_fingerprint(state)}".encode())
    return digest.hexdigest()

"""Checkpoint folders: read every form a practitioner has, validate, write timm local-dir members.

A *member* is one checkpoint. On disk wgen writes it in timm's local-dir layout (``config.json`` +
``model.safetensors``) so that ``timm.create_model("local-dir:PATH", pretrained=True)`` loads it.
Zoos from elsewhere may be sub-folders of that layout (``model.safetensors`` or
``pytorch_model.bin``) or flat ``*.safetensors|*.pt|*.pth|*.bin`` files with the architecture given
by ``--arch`` or a folder-level ``config.json``. Torch files are only ever read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch

from .errors import WgenError
from .outputs import write_folder
from .version import __version__

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
ZOO_JSON = "zoo.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
WRAPPER_KEYS = ("state_dict", "model", "model_state")
# DDP and torch.compile prefix every key of the modules they wrap.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
FORMS_HINT = ("expected sub-folders with config.json + model.safetensors, or *.safetensors / "
              "*.pt / *.pth / *.bin files with --arch")

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
                        f"{_one_line(exc)}", "check --model-args against the model's signature") from exc


def parse_model_args(text: str | None) -> dict[str, Any]:
    """Return the dict of a ``--model-args`` JSON object (``{}`` for None or empty)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WgenError(f"--model-args is not valid JSON: {exc.msg} at char {exc.pos}",
                        'give a JSON object, e.g. \'{"in_chans": 1}\'') from exc
    if not isinstance(value, dict):
        raise WgenError("--model-args must be a JSON object", 'e.g. \'{"img_size": 32, "patch_size": 4}\'')
    return value


# --------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class MemberRef:
    """One checkpoint of a zoo: its display name, weights file and member ``config.json`` (if any)."""

    name: str
    weights: Path
    config: dict[str, Any] | None = None

    @property
    def provenance(self) -> dict[str, Any]:
        """Return the ``wgen`` block of the member's config (seed, accuracies), or ``{}``."""
        return dict((self.config or {}).get("wgen", {}))


@dataclass
class Zoo:
    """A validated set of members of one architecture."""

    root: Path
    spec: ModelSpec
    members: list[MemberRef]
    info: dict[str, Any]  # zoo.json contents, {} for folders wgen did not write
    skipped: list[str] = field(default_factory=list)  # messages of members dropped by skip_bad

    def load(self, member: MemberRef) -> StateDict:
        """Return the state dict of ``member``, normalised like every member of this zoo."""
        return normalize_state_dict(load_state_dict_file(member.weights), self.spec.reference(), member.weights)

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


def read_json(path: Path) -> dict[str, Any]:
    """Return the JSON object stored at ``path``."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise WgenError(f"{path}: file not found", "check the path") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WgenError(f"{path}: not valid JSON ({_one_line(exc)})",
                        "restore the file or remove it") from exc
    if not isinstance(value, dict):
        raise WgenError(f"{path}: expected a JSON object", "restore the file or remove it")
    return value


def load_state_dict_file(path: Path) -> StateDict:
    """Return the tensors of a safetensors or torch checkpoint file, unwrapped and unprefixed."""
    if not path.is_file():
        raise WgenError(f"{path}: file not found", "check the path")
    if path.suffix == ".safetensors":
        try:
            tensors = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise WgenError(f"{path}: unreadable safetensors file ({_one_line(exc)})",
                            "the file is truncated or not safetensors; re-export it") from exc
    else:
        tensors = _load_torch_file(path)
    return _strip_prefixes(tensors, path)


def _load_torch_file(path: Path) -> StateDict:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "weights_only" in text or "Weights only load failed" in text:
            raise WgenError(f"{path}: refused by torch.load(weights_only=True): it holds pickled "
                            "objects other than tensors",
                            "re-save it with torch.save(model.state_dict(), path) or as safetensors"
                            ) from exc
        raise WgenError(f"{path}: unreadable torch file ({_one_line(exc)})",
                        "the file is truncated or not a torch checkpoint; re-export it") from exc
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise WgenError(f"{path}: holds no state dict", "save model.state_dict(), "
                        f"optionally wrapped as {{{', '.join(repr(k) for k in WRAPPER_KEYS)}: ...}}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    others = sorted(k for k in obj if k not in tensors)
    if others:
        raise WgenError(f"{path}: key {others[0]!r} is not a tensor", "save only model.state_dict()")
    return tensors


def _strip_prefixes(tensors: StateDict, path: Path) -> StateDict:
    if not tensors:
        raise WgenError(f"{path}: holds no tensors", "re-export the checkpoint")
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


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
                                "drop this checkpoint, or pass --skip-bad")
            value = value.float() if dtype.is_floating_point else value
        out[key] = value.to(dtype) if value.dtype != dtype else value
    return out


def find_member_refs(root: Path) -> tuple[list[MemberRef], dict[str, Any] | None]:
    """Return the checkpoints found under ``root`` and the folder-level ``config.json`` (if any).

    ``root`` may be a member folder, a folder of member sub-folders, or a folder of flat files.
    Names starting with '.' are skipped: wgen writes unfinished members under such names.
    """
    if not root.exists():
        raise WgenError(f"{root}: no such file or folder", "check the path")
    if root.is_file():
        if root.suffix not in CHECKPOINT_SUFFIXES:
            raise WgenError(f"{root}: not a checkpoint file", FORMS_HINT)
        return [MemberRef(root.stem, root)], None
    if _member_weights(root) is not None:
        return [_member_ref(root, root.name)], None
    entries = sorted((p for p in root.iterdir() if not p.name.startswith(".")), key=_natural_key)
    refs = [_member_ref(p, p.name) for p in entries if p.is_dir() and _member_weights(p) is not None]
    refs += [MemberRef(p.stem, p) for p in entries if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES]
    if not refs:
        raise WgenError(f"{root}: no checkpoints found", FORMS_HINT)
    names = [r.name for r in refs]
    twin = next((n for n in names if names.count(n) > 1), None)
    if twin is not None:
        found = ", ".join(r.weights.name for r in refs if r.name == twin)
        raise WgenError(f"{root}: two checkpoints are both named {twin!r} ({found})", "rename or move one of them")
    folder_config = root / CONFIG_NAME
    return refs, read_json(folder_config) if folder_config.is_file() else None


def _member_weights(folder: Path) -> Path | None:
    for name in (WEIGHTS_NAME, TORCH_WEIGHTS_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


def _member_ref(folder: Path, name: str) -> MemberRef:
    config_path = folder / CONFIG_NAME
    config = read_json(config_path) if config_path.is_file() else None
    weights = _member_weights(folder)
    assert weights is not None
    return MemberRef(name, weights, config)


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def resolve_spec(refs: list[MemberRef], folder_config: dict[str, Any] | None, arch: str | None,
                 model_args: dict[str, Any] | None, first_state: StateDict | None = None) -> ModelSpec:
    """Return the one ModelSpec every member shares, or an error naming the member that differs.

    Precedence: member ``config.json`` files, then ``--arch``/``--model-args``, then a folder-level
    ``config.json``. ``num_classes`` (and ``in_chans``) missing everywhere are read off the classifier
    (and stem) weights of ``first_state``.
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
    if arch is None:
        raise WgenError("the checkpoints carry no architecture",
                        "pass --arch NAME (and --model-args JSON), or add a folder-level config.json")
    args = dict(model_args or {})
    num_classes = args.pop("num_classes", None)
    if first_state is not None:
        num_classes, args = _infer_head_and_stem(arch, num_classes, args, first_state)
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
             skip_bad: bool = False) -> Zoo:
    """Return the validated zoo at ``path`` (a zoo folder, a member folder or a checkpoint file).

    Every member is read once and checked against the architecture (keys, shapes, finite values).
    With ``skip_bad`` a bad member is dropped and its message kept in ``Zoo.skipped``; without it
    the first bad member raises. Nothing on disk is changed.
    """
    root = Path(path)
    refs, folder_config = find_member_refs(root)
    first_state = None
    if not any(r.config for r in refs):
        first_state = _first_readable(refs, skip_bad)
    spec = resolve_spec(refs, folder_config, arch, model_args, first_state)
    reference = spec.reference()
    good, skipped = [], []
    for ref in refs:
        try:
            normalize_state_dict(load_state_dict_file(ref.weights), reference, ref.weights)
        except WgenError as exc:
            if not skip_bad:
                raise WgenError(exc.message, exc.hint if "--skip-bad" in exc.hint
                                else f"{exc.hint}; or pass --skip-bad to drop bad members") from exc
            skipped.append(exc.message)
            continue
        good.append(ref)
    if not good:
        raise WgenError(f"{root}: no usable checkpoints ({len(skipped)} bad)", "see the warnings above")
    zoo_json = root / ZOO_JSON
    info = read_json(zoo_json) if root.is_dir() and zoo_json.is_file() else {}
    return Zoo(root, spec, good, info, skipped)


def _first_readable(refs: list[MemberRef], skip_bad: bool) -> StateDict:
    for ref in refs:
        try:
            return load_state_dict_file(ref.weights)
        except WgenError:
            if not skip_bad:
                raise
    raise WgenError("no checkpoint could be read", "see the warnings above")


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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")

"""Read checkpoints as practitioners have them: find the members under a path, read a file's tensors.

Forms found under a path (``find_members``):

- timm local-dir members: a folder with ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``),
  or a folder of such folders (what wgen writes);
- a Hugging Face hub cache folder of a timm model, ``models--ORG--NAME/snapshots/REV/`` (the revision
  ``refs/main`` names, else the only one), or a folder of such cache folders;
- a timm training run (``train.py`` / ``CheckpointSaver``): a folder with ``last.pth.tar`` and
  ``model_best.pth.tar``; a folder of runs takes one file of each (``pick``: last or best);
- flat checkpoint files: ``*.safetensors``, ``*.pt``, ``*.pth``, ``*.bin``, ``*.pth.tar``, ``*.ckpt``.

Torch files are only ever read with ``torch.load(weights_only=True)``: tensors and plain data, plus
two data-only classes training scripts put beside the weights (``argparse.Namespace``, and
Lightning's ``AttributeDict`` read as a plain dict); anything else is refused. In a file holding
several state dicts (timm: ``state_dict`` and ``state_dict_ema``; Lightning: ``state_dict``; others:
``model``, ``model_state``), ``weights`` picks the EMA or raw weights; ``auto`` follows timm's loader
(EMA when present).
"""

from __future__ import annotations

import argparse
import errno
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from .errors import WgenError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".pth.tar", ".ckpt")
CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
RUN_FILES = {"last": "last.pth.tar", "best": "model_best.pth.tar"}  # what timm's CheckpointSaver writes
WEIGHTS_CHOICES = ("auto", "ema", "raw")
EMA_KEYS = ("state_dict_ema", "model_ema")
RAW_KEYS = ("state_dict", "model", "model_state")
# DDP and torch.compile prefix every key of the modules they wrap.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
FORMS_HINT = ("expected sub-folders with config.json + model.safetensors, timm training runs (last.pth.tar), "
              "Hugging Face cache folders, or *.safetensors / *.pt / *.pth / *.bin / *.pth.tar / *.ckpt files with --arch")

StateDict = dict[str, torch.Tensor]


# Lightning's AttributeDict (a dict with attribute access) is read as a plain dict.
_SAFE_GLOBALS = [argparse.Namespace,
                 (dict, "lightning.fabric.utilities.data.AttributeDict"),
                 (dict, "pytorch_lightning.utilities.parsing.AttributeDict")]


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
class Checkpoint:
    """The tensors of one checkpoint file, which of its state dicts they are, and what it says of the model."""

    tensors: StateDict
    weights: str = "file"  # the entry read: "state_dict_ema", "state_dict", ... or "file" (the whole file)
    arch: str | None = None  # the timm architecture the file names (timm's ``arch``), if any
    model_args: dict[str, Any] = field(default_factory=dict)  # model kwargs the file records (timm's args)

    @property
    def ema(self) -> bool:
        """Return whether these are EMA weights."""
        return self.weights in EMA_KEYS


# --------------------------------------------------------------------------------------------
# files


def is_checkpoint_file(path: Path) -> bool:
    """Return whether ``path`` names a checkpoint file by its suffix."""
    return path.name.endswith(CHECKPOINT_SUFFIXES)


def checkpoint_stem(path: Path) -> str:
    """Return the name of a checkpoint file without its (possibly double) suffix."""
    return next((path.name[:-len(s)] for s in CHECKPOINT_SUFFIXES if path.name.endswith(s)), path.stem)


def read_json(path: Path) -> dict[str, Any]:
    """Return the JSON object stored at ``path``."""
    try:
        value = json.loads(path.read_text())
    except OSError as exc:
        raise _os_error(path, exc) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WgenError(f"{path}: not valid JSON ({one_line(exc)})", "restore the file or remove it") from exc
    if not isinstance(value, dict):
        raise WgenError(f"{path}: expected a JSON object", "restore the file or remove it")
    return value


def read_checkpoint(path: Path, weights: str = "auto") -> Checkpoint:
    """Return the tensors of the checkpoint file ``path`` (unwrapped, prefixes removed) and what it records.

    ``weights``: ``auto`` (EMA when the file has them, as timm's loader does), ``ema`` or ``raw``.
    """
    if not path.exists():
        raise WgenError(f"{path}: file not found", "check the path")
    if path.name.endswith(".safetensors"):
        try:
            checkpoint = Checkpoint(safetensors.torch.load_file(str(path), device="cpu"))
        except OSError as exc:
            raise _os_error(path, exc) from exc
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise WgenError(f"{path}: unreadable safetensors file ({one_line(exc)})",
                            "the file is truncated or not safetensors; re-export it") from exc
    else:
        checkpoint = _unwrap(_torch_load(path), path, weights)
    checkpoint.tensors = _strip_prefixes(checkpoint.tensors, path)
    return checkpoint


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except OSError as exc:
        raise _os_error(path, exc) from exc
    except Exception as exc:
        text = str(exc)
        if "weights_only" in text or "Weights only load failed" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global ([\w.]+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise WgenError(f"{path}: refused by torch.load(weights_only=True): it holds pickled objects other than "
                            f"tensors and plain data{what}",
                            "re-save it with torch.save(model.state_dict(), path) or as safetensors") from exc
        raise WgenError(f"{path}: unreadable torch file ({one_line(exc)})",
                        "the file is truncated or not a torch checkpoint; re-export it") from exc


def _unwrap(obj: Any, path: Path, weights: str) -> Checkpoint:
    """Return the state dict ``weights`` asks for out of a loaded torch object, with the file's arch and args."""
    if not isinstance(obj, dict) or not obj:
        raise WgenError(f"{path}: holds no state dict", "save model.state_dict(), or a dict holding it under 'state_dict'")
    wrapped = any(isinstance(obj.get(k), dict) for k in (*EMA_KEYS, *RAW_KEYS))
    keys = {"ema": EMA_KEYS, "raw": RAW_KEYS, "auto": (*EMA_KEYS, *RAW_KEYS)}[weights]
    chosen = next((k for k in keys if isinstance(obj.get(k), dict)), None)
    if chosen is None and (wrapped or weights == "ema"):
        raise WgenError(f"{path}: has no {'EMA' if weights == 'ema' else 'raw'} weights",
                        "pass --weights auto to take the weights it has")
    tensors = obj[chosen] if chosen else obj
    others = sorted(k for k, v in tensors.items() if not isinstance(v, torch.Tensor))
    if others:
        raise WgenError(f"{path}: key {others[0]!r} is not a tensor", "save only model.state_dict()")
    if "pytorch-lightning_version" in obj:
        tensors = _strip_module_name(tensors, path)
    args = obj.get("args")
    arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
    model_args = dict(getattr(args, "model_kwargs", None) or {}) if args is not None else {}
    return Checkpoint(dict(tensors), chosen or "file", arch, model_args)


def _strip_module_name(tensors: StateDict, path: Path) -> StateDict:
    """Return the keys of a LightningModule's state dict without its attribute name (``model.``, ``net.``, ...)."""
    heads = {k.split(".", 1)[0] for k in tensors}
    if len(heads) != 1 or not all("." in k for k in tensors):
        raise WgenError(f"{path}: the Lightning module holds several modules ({', '.join(sorted(heads))})",
                        "save the timm model's own state_dict")
    return {k.split(".", 1)[1]: v for k, v in tensors.items()}


def _strip_prefixes(tensors: StateDict, path: Path) -> StateDict:
    if not tensors:
        raise WgenError(f"{path}: holds no tensors", "re-export the checkpoint")
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _os_error(path: Path, exc: OSError) -> WgenError:
    """Return the user-facing error of an OSError met reading ``path``."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return WgenError(f"{path}: permission denied", "make it readable (chmod u+r), or pass --skip-bad to leave it out")
    if exc.errno == errno.ENOENT:
        return WgenError(f"{path}: file not found", "check the path")
    return WgenError(f"{path}: cannot be read ({one_line(exc)})", "check the file and the disk")


def one_line(exc: BaseException) -> str:
    """Return an exception's message on one line, at most 200 characters."""
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")


# --------------------------------------------------------------------------------------------
# folders


def find_members(root: Path, pick: str = "last") -> tuple[list[MemberRef], dict[str, Any] | None]:
    """Return the checkpoints found under ``root`` and the folder-level ``config.json`` (if any).

    ``root`` may be one member in any form above, or a folder of them. Names starting with '.' are
    skipped: wgen writes unfinished members under such names.
    """
    if pick not in RUN_FILES:
        raise WgenError(f"unknown --run-checkpoint {pick!r}", f"use one of {', '.join(RUN_FILES)}")
    try:
        if not root.exists():
            raise WgenError(f"{root}: no such file or folder", "check the path")
        if root.is_file():
            if not is_checkpoint_file(root):
                raise WgenError(f"{root}: not a checkpoint file", FORMS_HINT)
            return [MemberRef(checkpoint_stem(root), root)], None
        own = _member(root, root.name, pick)
        if own is not None:
            return [own], None
        entries = sorted((p for p in root.iterdir() if not p.name.startswith(".")), key=_natural_key)
        refs = [m for m in (_member(p, p.name, pick) for p in entries if p.is_dir()) if m is not None]
        refs += [MemberRef(checkpoint_stem(p), p) for p in entries if p.is_file() and is_checkpoint_file(p)]
    except OSError as exc:
        raise _os_error(root, exc) from exc
    if not refs:
        raise WgenError(f"{root}: no checkpoints found", FORMS_HINT)
    names = [r.name for r in refs]
    twin = next((n for n in names if names.count(n) > 1), None)
    if twin is not None:
        found = ", ".join(str(r.weights.relative_to(root)) for r in refs if r.name == twin)
        raise WgenError(f"{root}: two checkpoints are both named {twin!r} ({found})", "rename or move one of them")
    folder_config = root / CONFIG_NAME
    return refs, read_json(folder_config) if folder_config.is_file() else None


def _member(folder: Path, name: str, pick: str) -> MemberRef | None:
    """Return the member ``folder`` holds (local-dir, Hugging Face cache or timm run), or None if it is none."""
    snapshot = _hub_snapshot(folder)
    if snapshot is not None:
        folder, name = snapshot, _hub_name(folder)
    for weights in (WEIGHTS_NAME, TORCH_WEIGHTS_NAME):
        if (folder / weights).is_file():
            config = read_json(folder / CONFIG_NAME) if (folder / CONFIG_NAME).is_file() else None
            return MemberRef(name, folder / weights, config)
    if any((folder / f).is_file() for f in RUN_FILES.values()):
        chosen = folder / RUN_FILES[pick]
        if not chosen.is_file():
            raise WgenError(f"{folder}: a timm training run without {chosen.name}",
                            "pick the other file with --run-checkpoint, or leave the run out")
        return MemberRef(name, chosen)
    return None


def _hub_snapshot(folder: Path) -> Path | None:
    """Return the snapshot folder of a Hugging Face cache folder ``models--ORG--NAME`` (None if it is none)."""
    snapshots = folder / "snapshots"
    if not folder.name.startswith("models--") or not snapshots.is_dir():
        return None
    main = folder / "refs" / "main"
    if main.is_file() and (snapshots / main.read_text().strip()).is_dir():
        return snapshots / main.read_text().strip()
    revisions = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(revisions) != 1:
        raise WgenError(f"{folder}: {len(revisions)} cached revisions and no refs/main",
                        "point at the revision you want: .../snapshots/REV")
    return revisions[0]


def _hub_name(folder: Path) -> str:
    """Return ``NAME`` of a cache folder ``models--ORG--NAME``."""
    return folder.name.split("--")[-1]


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]

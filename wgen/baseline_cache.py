"""Measured baseline sets kept on disk, so that evaluating a second generator on one zoo measures only its samples.

The baselines of ``wgen eval`` (``baselines.py``) are built from the generator's training members and measured
against them; with BatchNorm re-estimated and every noise scale they make up most of an evaluation's time, and
they are the same for every generator trained on the same zoo with the same held-out members. A cache folder
(``wgen eval --baseline-cache DIR``) keeps each measured set under a key of everything it depends on: the zoo's
fingerprint, the training and held-out members, the data and its splits, the split judged, the samples' count,
the baselines' options and seed, the device type, the torch and timm versions, and the wgen code that measures
them (a digest of the package's source outside ``flow/``, the generators, which baselines never run), so a changed
wgen never reads another's figures.

The baselines share one random generator, drawn from in order, so each entry also holds the generator's state
after its set was built: a set found in the cache puts the generator where building it would have, and the sets
after it are built exactly as in an uncached run. Entries are written one set at a time as they are measured, so
a killed evaluation keeps the sets it finished.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import WgenError
from .outputs import atomic_file, atomic_write_json, check_output, start_output, wgen_wrote

FORMAT = "wgen.baseline-cache/1"
KIND = "baseline-cache"
KEY_FILE = "key.json"
STATE = "generator_state"


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """Return the sha256 of every Python source file of the wgen package outside ``flow/``, by relative path."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*.py") if p.relative_to(root).parts[0] != "flow"):
        digest.update(f"{path.relative_to(root).as_posix()}\0".encode() + path.read_bytes() + b"\0")
    return digest.hexdigest()


def indices_digest(indices: np.ndarray) -> str:
    """Return the sha256 of a split's example indices, in order."""
    return hashlib.sha256(np.asarray(indices).astype(np.int64).tobytes()).hexdigest()


class BaselineCache:
    """One folder of cached baseline sets; ``entry(key)`` is where the sets of one key live."""

    def __init__(self, folder: Path, inputs: list[Path | None]) -> None:
        """Check ``folder`` under the output policy (outside ``inputs``; new, empty or wgen's own, resumed)."""
        check_output(folder, inputs, force=False, resumes=_ours)
        self.folder = folder

    def entry(self, key: dict[str, Any]) -> CacheEntry:
        """Return the entry of ``key`` (a JSON-able dict of everything the sets depend on), created on first write."""
        text = json.dumps({"format": FORMAT, **key}, sort_keys=True)
        return CacheEntry(self.folder, hashlib.sha256(text.encode()).hexdigest()[:32], json.loads(text))


def _ours(folder: Path) -> bool:
    """Return True for a folder wgen wrote (a cache is added to); raise a WgenError for any other."""
    if not wgen_wrote(folder):
        raise WgenError(f"{folder}: exists and was not written by wgen",
                        "choose an empty or new folder for --baseline-cache")
    return True


class CacheEntry:
    """The cached sets of one key: one safetensors file a baseline, in the order they were built."""

    def __init__(self, root: Path, name: str, key: dict[str, Any]) -> None:
        self.root, self.folder, self.key = root, root / name, key
        self.hits = 0

    def _path(self, index: int, name: str) -> Path:
        return self.folder / f"{index:02d}-{re.sub(r'[^A-Za-z0-9.]+', '-', name).strip('-')}.safetensors"

    def load(self, index: int, name: str, generator: torch.Generator
             ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, torch.Tensor]]] | None:
        """Return the cached ``(sets, hits)`` of baseline ``index`` ``name`` (its variants as built and ``+ BN``),
        setting ``generator`` to its state after the set was built; None when it is not cached."""
        path = self._path(index, name)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
            if meta.get("name") != name or STATE not in keys:
                return None  # a file from another layout: measured again and overwritten
            state = f.get_tensor(STATE)
            hits: dict[str, dict[str, torch.Tensor]] = {}
            for key in sorted(k for k in keys if k.startswith("hits/")):
                label, what = key[len("hits/"):].rsplit("/", 1)
                hits.setdefault(label, {})[what] = f.get_tensor(key)
        sets = json.loads(meta["sets"])
        generator.set_state(state)
        self.hits += 1
        return sets, hits

    def save(self, index: int, name: str, sets: dict[str, dict[str, Any]], hits: dict[str, dict[str, torch.Tensor]],
             generator: torch.Generator) -> None:
        """Write baseline ``index`` ``name``'s measured ``sets`` and ensemble ``hits`` with ``generator``'s state."""
        start_output(self.root, KIND, "resume")  # made, and marked as wgen's, on the first write
        if not (self.folder / KEY_FILE).is_file():
            atomic_write_json(self.folder / KEY_FILE, self.key)
        tensors = {STATE: generator.get_state().clone()}
        for label, by_what in hits.items():
            tensors.update({f"hits/{label}/{what}": v.detach().cpu().contiguous() for what, v in by_what.items()})
        with atomic_file(self._path(index, name)) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "name": name, "sets": json.dumps(sets)})

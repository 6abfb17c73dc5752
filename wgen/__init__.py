"""wgen: generate ensembles of ready-to-use timm networks from a zoo of checkpoints.

The functions the CLI calls, one per stage (imported on first use, so ``import wgen`` is instant)::

    plan = wgen.plan_zoo(wgen.Recipe("test_resnet", "digits"))
    wgen.train_zoo(plan, Path("zoo"), 16, device)
    wgen.canonicalize(wgen.open_zoo("zoo"), Path("canon"), wgen.CanonOptions(), device)
    wgen.train_generator(wgen.open_zoo("canon"), Path("gen"), wgen.TrainConfig(), device)
    wgen.sample(wgen.load_generator("gen"), Path("samples"), wgen.SampleOptions(count=100), device)
    report = wgen.evaluate_models(Path("samples"), Path("canon"), wgen.EvalOptions(), device)
"""

from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

_API = {
    "WgenError": "errors", "ModelSpec": "checkpoints", "Zoo": "checkpoints", "open_zoo": "checkpoints",
    "Recipe": "zoo", "plan_zoo": "zoo", "train_zoo": "zoo",
    "CanonOptions": "permute.canonicalize", "canonicalize": "permute.canonicalize",
    "TrainConfig": "flow.train", "train_generator": "flow.train",
    "load_generator": "flow.generator", "SampleOptions": "flow.sample", "sample": "flow.sample",
    "EvalOptions": "evaluate", "evaluate_models": "evaluate", "write_report": "evaluate",
    "resolve_device": "runtime", "SPACES": "flow.spaces", "NETS": "flow.nets",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'wgen' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

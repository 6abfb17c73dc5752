"""Registries of named, pluggable kinds (weight spaces, velocity nets), in the way timm registers models.

A built-in kind is listed as ``"module:Class"`` and imported on first use, so listing the names (for
``--help``) imports nothing heavy; a plug-in registers its class at run time with ``register``. Each
kind may declare ``Options``, a dataclass of its settings: ``options`` builds it from a JSON dict and
names any setting it does not have.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from .errors import WgenError


class Registry:
    """Kinds of one component by name: ``names`` to list them, ``get`` to find one, ``register`` to add one."""

    def __init__(self, what: str, option: str, builtins: dict[str, str]) -> None:
        self.what, self.option = what, option  # e.g. "weight space", "--space"
        self._builtins = dict(builtins)
        self._classes: dict[str, type] = {}

    def names(self) -> list[str]:
        """Return the registered kinds, built-in ones first."""
        return [*self._builtins, *(n for n in self._classes if n not in self._builtins)]

    def register(self, name: str) -> Callable[[type], type]:
        """Return a class decorator that registers the class as kind ``name`` (and sets its ``kind``)."""
        def add(cls: type) -> type:
            cls.kind = name
            self._classes[name] = cls
            return cls
        return add

    def get(self, name: str) -> type:
        """Return the class of kind ``name``, importing a built-in one on first use."""
        if name not in self._classes and name in self._builtins:
            module, attr = self._builtins[name].split(":")
            self.register(name)(getattr(importlib.import_module(module), attr))
        if name not in self._classes:
            raise WgenError(f"unknown {self.option} {name!r}", f"use one of {', '.join(self.names())}")
        return self._classes[name]

    def options(self, name: str, args: dict[str, Any]) -> Any:
        """Return kind ``name``'s ``Options`` built from ``args`` (a JSON dict), refusing settings it lacks."""
        cls = self.get(name).Options
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise WgenError(f"the {name} {self.what} has no setting {unknown[0]!r}",
                            f"its settings: {', '.join(sorted(known)) or 'none'}")
        options = cls(**args)
        if hasattr(options, "check"):
            options.check()
        return options


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The settings of a kind that has none."""

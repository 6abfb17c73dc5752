"""The progress protocol of multi-stage commands (canonicalize, eval); the CLI renders it."""

from __future__ import annotations

from typing import Protocol


class StageProgress(Protocol):
    """Receives the start of each stage (with its item count) and each finished item."""

    def stage(self, name: str, total: int) -> None: ...
    def advance(self) -> None: ...


class SilentStages:
    """A StageProgress that ignores every event."""

    def stage(self, name: str, total: int) -> None: ...
    def advance(self) -> None: ...

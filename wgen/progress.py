"""The one progress protocol of every long command; the CLI renders it, tests may record it."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Receives a command's events: a stage of ``total`` items starts, items finish, a line to show."""

    def stage(self, name: str, total: int, done: int = 0) -> None: ...
    def advance(self, count: int = 1, status: str = "") -> None: ...
    def note(self, text: str) -> None: ...


class Silent:
    """A Progress that ignores every event."""

    def stage(self, name: str, total: int, done: int = 0) -> None: ...
    def advance(self, count: int = 1, status: str = "") -> None: ...
    def note(self, text: str) -> None: ...


SILENT = Silent()

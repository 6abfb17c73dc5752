"""Results as plain text for people: tables and percentages. The CLI renders them with rich."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class TextTable:
    """A titled table of strings; the first ``left`` columns are left-aligned, the rest right-aligned."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    left: int = 1
    header: bool = True


def pct(value: float | None) -> str:
    """Return ``value`` (a share) as a percentage with one decimal, or ``-`` when it is missing or not finite."""
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


@dataclass
class Summary:
    """What a command shows a person when it finishes: lines, tables, then warnings."""

    lines: list[str] = field(default_factory=list)
    tables: list[TextTable] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)  # lines shown below the tables

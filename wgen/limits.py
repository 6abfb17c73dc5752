"""The range of every numeric option, in one place: the checks raise from it and ``--help`` prints it.

A value outside its range (NaN and infinities included) is a WgenError naming the option, the value
and the range, raised before anything is read or written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import WgenError

SEED_MAX = 2**32 - 1  # numpy's and torch's seeds; wgen derives further seeds by small offsets


@dataclass(frozen=True)
class Limit:
    """A closed or open interval of allowed values, integers only when ``integer``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def holds(self, value: Any) -> bool:
        """Return whether ``value`` lies in the interval (a finite number, an integer if asked)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.integer and value != int(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def text(self) -> str:
        """Return the range as people read it: ``>= 1``, ``> 0``, ``in [0, 1)``."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        return f"{'<' if self.high_open else '<='} {_num(self.high)}" if self.high is not None else "any number"


def _num(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


POSITIVE = Limit(0, low_open=True)
NON_NEGATIVE = Limit(0)
COUNT = Limit(1, integer=True)
SHARE = Limit(0, 1, high_open=True)
SEED = Limit(0, SEED_MAX, integer=True)

LIMITS: dict[str, Limit] = {
    # wgen zoo
    "--count": COUNT, "--epochs": COUNT, "--lr": POSITIVE, "--batch-size": COUNT, "--weight-decay": NON_NEGATIVE,
    "--normalized-decay": NON_NEGATIVE, "--warmup-epochs": NON_NEGATIVE, "--label-smoothing": SHARE,
    "--img-size": Limit(8, 4096, integer=True), "--seed-start": SEED, "--split-seed": SEED, "--threads": COUNT,
    # wgen canonicalize
    "--restarts": COUNT, "--barrier-pairs": COUNT, "--seed": SEED,
    # wgen train (and the net's and space's settings)
    "--steps": COUNT, "--warmup-steps": Limit(0, integer=True), "--grad-clip": POSITIVE, "--ema-decay": SHARE,
    "--holdout": SHARE, "--checkpoint-every": COUNT, "--components": COUNT, "--width": Limit(4, integer=True),
    "--depth": COUNT, "--time-dim": Limit(2, integer=True), "--dropout": SHARE,
    "--subspace-epochs": POSITIVE, "--corners": Limit(0, integer=True), "--simplices": Limit(0, integer=True),
    "--alpha": POSITIVE, "--snapshots": COUNT, "--restart-epochs": POSITIVE,
    "--code-dim": COUNT, "--hidden": COUNT, "--diversity": NON_NEGATIVE, "--ensemble": Limit(0, 1),
    "--distill": Limit(0, 1),
    # wgen sample
    "--min-radius": SHARE,
    # wgen eval
    "--soup-k": Limit(2, integer=True), "--rematch": Limit(0, integer=True), "--noise-scale": POSITIVE,
}


def check(option: str, value: Any, limit: Limit | None = None) -> None:
    """Raise a WgenError unless ``value`` of ``option`` lies in its range (``LIMITS[option]`` unless given)."""
    limit = limit or LIMITS[option]
    if not limit.holds(value):
        raise WgenError(f"{option} {value} must be {limit.text()}", f"--help lists the range of every option")


def check_all(values: dict[str, Any]) -> None:
    """Check every ``{option: value}`` pair (None values are unset options and pass)."""
    for option, value in values.items():
        if value is not None:
            check(option, value)


def ranged(option: str, text: str) -> str:
    """Return ``text`` followed by the range of ``option``, for ``--help``."""
    return f"{text} ({LIMITS[option].text()})"

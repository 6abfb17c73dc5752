"""The learning-rate schedule every training loop uses: linear warm-up, then cosine decay to zero."""

from __future__ import annotations

import math


def warmup_cosine(step: int, peak: float, warmup: float, total: int) -> float:
    """Return the learning rate at ``step`` (0-based): ``peak * (step + 1) / warmup`` during the warm-up,
    then a cosine from ``peak`` down to 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

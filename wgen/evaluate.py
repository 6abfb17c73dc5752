"""Evaluation of models on a data split."""

from __future__ import annotations

import torch

from .data import SplitData


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: SplitData, split: str, device: torch.device,
             batch_size: int = 512) -> float:
    """Return the top-1 accuracy of ``model`` (in eval mode) on ``split`` of ``data``."""
    model.eval()
    correct = total = 0
    for x, y in data.batches(split, batch_size):
        logits = model(x.to(device))
        correct += int((logits.argmax(dim=1).cpu() == y).sum())
        total += len(y)
    return correct / max(total, 1)

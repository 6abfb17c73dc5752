"""Evaluation of models on a data split, and BatchNorm re-estimation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import SplitData


@torch.no_grad()
def loss_and_accuracy(model: torch.nn.Module, data: SplitData, split: str, device: torch.device,
                      batch_size: int = 512) -> tuple[float, float]:
    """Return the mean cross-entropy and top-1 accuracy of ``model`` (eval mode) on ``split``."""
    model.eval()
    loss_sum, correct, total = 0.0, 0, 0
    for x, y in data.batches(split, batch_size):
        logits = model(x.to(device)).float()
        y = y.to(device)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
        total += len(y)
    return loss_sum / max(total, 1), correct / max(total, 1)


def accuracy(model: torch.nn.Module, data: SplitData, split: str, device: torch.device,
             batch_size: int = 512) -> float:
    """Return the top-1 accuracy of ``model`` (in eval mode) on ``split`` of ``data``."""
    return loss_and_accuracy(model, data, split, device, batch_size)[1]


@torch.no_grad()
def reestimate_batchnorm(model: torch.nn.Module, data: SplitData, device: torch.device,
                         batch_size: int = 256, max_examples: int = 2048) -> bool:
    """Recompute BatchNorm running statistics on the train split; return False if there is no BatchNorm.

    Uses a cumulative average over up to ``max_examples`` training examples, in a fixed order.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    for x, _ in data.batches("train", batch_size):
        model(x.to(device))
        seen += len(x)
        if seen >= max_examples:
            break
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return True


@torch.no_grad()
def stacked_forward(model: torch.nn.Module, states: list[dict[str, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """Return the eval-mode outputs ``[models, batch, ...]`` of ``model`` under each of ``states``.

    All models run in one pass with ``torch.func.vmap`` over stacked weights; an architecture that
    cannot be vmapped falls back to one model at a time.
    """
    from torch.func import functional_call, vmap

    model.eval()
    stacked = {k: torch.stack([s[k] for s in states]).to(x.device) for k in states[0]}
    try:
        return vmap(lambda weights: functional_call(model, weights, (x,)))(stacked)
    except (RuntimeError, NotImplementedError, ValueError):
        outputs = []
        for state in states:
            model.load_state_dict(state)
            outputs.append(model(x))
        return torch.stack(outputs)

"""Measures of models: loss and accuracy on a split, many models at once, ensembles, diversity, BatchNorm re-estimation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .data import SplitData

StateDict = dict[str, torch.Tensor]
BOOTSTRAP_INDICES = 1 << 22  # group indices a bootstrap holds at once (32 MB)


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


def has_batchnorm(model: torch.nn.Module) -> bool:
    """Return whether ``model`` holds a BatchNorm layer (whose statistics a weight mix leaves stale)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reestimate_batchnorm(model: torch.nn.Module, data: SplitData, device: torch.device,
                         batch_size: int = 256, max_examples: int = 2048,
                         memory_format: torch.memory_format = torch.contiguous_format) -> bool:
    """Recompute BatchNorm running statistics on the train split; return False if there is no BatchNorm.

    Uses a cumulative average over up to ``max_examples`` training examples, in a fixed order, laid out in
    ``memory_format`` (that of the model's weights).
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    model.eval()  # dropout and drop-path stay off; only the norms collect statistics
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    for x, _ in data.batches("train", batch_size):
        model(x.to(device).contiguous(memory_format=memory_format))
        seen += len(x)
        if seen >= max_examples:
            break
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return True


def recalibrated(spec: Any, states: list[StateDict], data: SplitData, device: torch.device) -> list[StateDict]:
    """Return CPU copies of ``states`` with BatchNorm statistics re-estimated on the train split of ``data``
    (contiguous, whatever layout the passes ran in)."""
    layout = cpu_layout(data, device)
    model = spec.create(device).to(memory_format=layout)
    out = []
    for state in states:
        model.load_state_dict(state)
        reestimate_batchnorm(model, data, device, memory_format=layout)
        out.append({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()})
    return out


def cpu_layout(data: SplitData, device: torch.device) -> torch.memory_format:
    """Return the memory format passes over ``data`` run fastest in: channels-last for images on CPU (1.7-1.8x
    for BatchNorm re-estimation of test_resnet, benchmarks/eval.py), the default elsewhere."""
    return torch.channels_last if device.type == "cpu" and len(data.input_size) == 3 else torch.contiguous_format


def flatten(states: list[StateDict], keys: list[str], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return ``[N, P]``: the tensors ``keys`` of each state, concatenated in that order (the distances' space)."""
    return torch.stack([torch.cat([s[k].reshape(-1).to(dtype) for k in keys]) for s in states])


@torch.no_grad()
def forward_stacked(model: torch.nn.Module, stacked: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Return the eval-mode outputs ``[models, batch, ...]`` of ``model`` under weights stacked along dim 0.

    One ``torch.func.vmap`` pass; an architecture that cannot be vmapped runs one model at a time.
    """
    from torch.func import functional_call, vmap

    model.eval()
    try:
        return vmap(lambda weights: functional_call(model, weights, (x,)))(stacked)
    except (RuntimeError, NotImplementedError, ValueError):
        outputs = []
        for i in range(len(next(iter(stacked.values())))):
            model.load_state_dict({k: v[i] for k, v in stacked.items()})
            outputs.append(model(x))
        return torch.stack(outputs)


# ------------------------------------------------------------------------------------------------
# many models at once


@torch.no_grad()
def stacked_logits(model: torch.nn.Module, states: list[dict[str, torch.Tensor]], data: SplitData, split: str,
                   device: torch.device, models_per_pass: int = 25, batch_size: int = 256) -> torch.Tensor:
    """Return logits ``[models, examples, classes]`` of every state on ``split``.

    On CUDA the models of a pass run together (``vmap`` over stacked weights). On CPU, where that
    measured 2.3x slower than one model at a time (benchmarks/eval.py), each batch is prepared once
    and run through every model in turn, channels-last.
    """
    if device.type == "cuda":
        chunks = []
        for start in range(0, len(states), models_per_pass):
            group = states[start:start + models_per_pass]
            stacked = {k: torch.stack([s[k] for s in group]).to(device) for k in group[0]}
            chunks.append(torch.cat([forward_stacked(model, stacked, x.to(device)).float().cpu()
                                     for x, _ in data.batches(split, batch_size)], dim=1))
        return torch.cat(chunks)
    layout = cpu_layout(data, device)
    model = model.eval().to(memory_format=layout)
    outputs: list[list[torch.Tensor]] = [[] for _ in states]
    for x, _ in data.batches(split, batch_size):
        x = x.to(device).contiguous(memory_format=layout)
        for i, state in enumerate(states):
            model.load_state_dict(state)
            outputs[i].append(model(x).float().cpu())
    return torch.stack([torch.cat(parts) for parts in outputs])


def per_model_metrics(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, torch.Tensor]:
    """Return accuracy, NLL and expected calibration error of each model, as ``[models]`` tensors."""
    log_probs = logits.log_softmax(dim=-1)
    confidence, predicted = log_probs.exp().max(dim=-1)
    correct = (predicted == labels).float()
    nll = -log_probs.gather(-1, labels.expand(len(logits), -1)[..., None]).squeeze(-1).mean(dim=1)
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(len(logits))
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = ((confidence > lo) & (confidence <= hi)).float()
        count = inside.sum(dim=1)
        gap = ((confidence - correct) * inside).sum(dim=1).abs()
        ece += torch.where(count > 0, gap, torch.zeros_like(gap)) / logits.shape[1]
    return {"accuracy": correct.mean(dim=1), "nll": nll, "ece": ece}


def ensemble_curve(logits: torch.Tensor, labels: torch.Tensor) -> list[dict[str, float]]:
    """Return accuracy and NLL of the mean prediction of the first k models, k = 1, 2, 4, ..., N."""
    probs = logits.softmax(dim=-1)
    sizes = sorted({min(2 ** i, len(probs)) for i in range(len(probs).bit_length() + 1)})
    curve = []
    for k in sizes:
        mean = probs[:k].mean(dim=0)
        curve.append({"size": k, "accuracy": float((mean.argmax(-1) == labels).float().mean()),
                      "nll": float(-mean.clamp_min(1e-12).log().gather(-1, labels[:, None]).mean())})
    return curve


def ensemble_hits(logits: torch.Tensor, labels: torch.Tensor, size: int, draws: int = 200,
                  seed: int = 0) -> torch.Tensor | None:
    """Return ``[draws, examples]``: whether the mean prediction of ``size`` models drawn at random (without
    replacement, ``draws`` seeded draws) is right on each example; None when there are fewer than ``size``."""
    if len(logits) < size:
        return None
    probs, generator = logits.softmax(dim=-1), torch.Generator().manual_seed(seed)
    return torch.stack([probs[torch.randperm(len(probs), generator=generator)[:size]].mean(dim=0).argmax(-1) == labels
                        for _ in range(draws)])


def draw_summary(hits: torch.Tensor | None) -> dict[str, float] | None:
    """Return the accuracy over ``ensemble_hits``' draws: mean, std, min, max and the number of draws.

    The expected accuracy of an ensemble of that size from the set, where ``ensemble_curve``'s first
    models are one draw of it.
    """
    if hits is None:
        return None
    accuracy = hits.float().mean(dim=1)
    return {"mean": float(accuracy.mean()), "std": float(accuracy.std()), "min": float(accuracy.min()),
            "max": float(accuracy.max()), "draws": len(hits)}


def grouped_bootstrap(differences: torch.Tensor, groups: torch.Tensor, resamples: int = 2000,
                      seed: int = 0) -> dict[str, Any]:
    """Return the mean of per-example ``differences`` and its 95% interval, resampling whole ``groups``.

    Examples of one group (renderings of one digit) are not independent: resampling them together keeps
    the interval from claiming more certainty than the distinct originals give.
    """
    _, group = torch.unique(groups, return_inverse=True)
    count = int(group.max()) + 1
    sums = torch.zeros(count, dtype=torch.float64).index_add_(0, group, differences.double())
    sizes = torch.bincount(group, minlength=count).double()
    generator, step, chunks = torch.Generator().manual_seed(seed), max(1, BOOTSTRAP_INDICES // count), []
    # resamples drawn in chunks, the same draws as at once: one [resamples, groups] index would take
    # gigabytes on a 50,000-image split without groups
    for start in range(0, resamples, step):
        pick = torch.randint(count, (min(step, resamples - start), count), generator=generator)
        chunks.append(sums[pick].sum(dim=1) / sizes[pick].sum(dim=1))
    means = torch.cat(chunks)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"difference": float(differences.double().mean()), "ci95": [low, high], "groups": count,
            "resamples": resamples}


def mean_disagreement(logits: torch.Tensor) -> float:
    """Return the mean over model pairs of the share of examples on which their top-1 predictions differ."""
    models = len(logits)
    if models < 2:
        return float("nan")
    counts = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).sum(dim=0).double()  # [N, C]
    agreeing_pairs = (counts * (counts - 1) / 2).sum(dim=1)
    return float(1 - (agreeing_pairs / (models * (models - 1) / 2)).mean())


def error_iou(errors_a: torch.Tensor, errors_b: torch.Tensor) -> torch.Tensor:
    """Return ``[A, B]`` IoU of the misclassified-example sets (1 where both sets are empty)."""
    a, b = errors_a.double(), errors_b.double()
    inter = a @ b.T
    union = a.sum(1, keepdim=True) + b.sum(1)[None] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))

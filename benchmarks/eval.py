"""Benchmark wgen's evaluation of many models vs a plain per-model loop.

wgen runs the models of a pass together with torch.func vmap over stacked weights on CUDA; on CPU,
where vmap measured slower than a loop, it prepares each batch once and runs it through every model
channels-last. Both evaluate the same N models on the digits test split in the same run and must agree on every
accuracy to 1e-6. Then BatchNorm re-estimation on the train split (``recalibrated``, every ``+ BN`` set of
``wgen eval``), channels-last on CPU, against the plain layout for ``--bn-count`` of the models, with the
largest difference of a re-estimated statistic. Prints JSON with device, versions, seconds and the speed-ups.

    python benchmarks/eval.py [--samples PATH] [--count 200] [--bn-count 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import timm
import torch

import wgen
from wgen.checkpoints import ModelSpec, open_zoo
from wgen.data import SplitSpec, load_data
from wgen.metrics import per_model_metrics, recalibrated, reestimate_batchnorm, stacked_logits
from wgen.runtime import resolve_device


def models(samples: Path | None, count: int) -> tuple[ModelSpec, list[dict[str, torch.Tensor]], tuple[int, int, int]]:
    if samples is not None:
        zoo = open_zoo(samples)
        size, _, _ = zoo.preprocessing()
        return zoo.spec, [zoo.load(m) for m in zoo.members[:count]], size
    spec = ModelSpec("test_resnet", 10, {})
    states = []
    for seed in range(count):
        torch.manual_seed(seed)
        states.append(spec.create().state_dict())
    return spec, states, (3, 32, 32)


@torch.no_grad()
def loop_accuracies(spec: ModelSpec, states: list[dict[str, torch.Tensor]], data, device: torch.device) -> list[float]:
    """The baseline: one model at a time, as a user without wgen would write it."""
    accuracies = []
    for state in states:
        model = spec.create(device).eval()
        model.load_state_dict(state)
        correct = total = 0
        for x, y in data.batches("test", 256):
            correct += int((model(x.to(device)).argmax(-1).cpu() == y).sum())
            total += len(y)
        accuracies.append(correct / total)
    return accuracies


def loop_recalibrated(spec: ModelSpec, states: list[dict[str, torch.Tensor]], data,
                      device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The baseline: BatchNorm re-estimated one model at a time in the default (contiguous) layout."""
    out = []
    for state in states:
        model = spec.create(device)
        model.load_state_dict(state)
        reestimate_batchnorm(model, data, device)
        out.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return out


def timed(run, *args):
    """Return ``run(*args)`` and the seconds it took."""
    start = time.perf_counter()
    result = run(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--bn-count", type=int, default=20, help="models whose BatchNorm is re-estimated")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    spec, states, size = models(args.samples, args.count)
    data = load_data("digits", size, SplitSpec())
    labels = data.tensors("test")[1]
    model = spec.create(device).eval()
    stacked_logits(model, states[:2], data, "test", device)  # warm-up
    logits, batched_seconds = timed(stacked_logits, model, states, data, "test", device)
    batched = per_model_metrics(logits, labels)["accuracy"].tolist()
    looped, loop_seconds = timed(loop_accuracies, spec, states, data, device)
    bn_states = states[:args.bn_count]
    recalibrated(spec, bn_states[:1], data, device)  # warm-up
    ours, bn_seconds = timed(recalibrated, spec, bn_states, data, device)
    plain, bn_loop_seconds = timed(loop_recalibrated, spec, bn_states, data, device)
    stats = [k for k in ours[0] if k.endswith(("running_mean", "running_var"))]
    result = {
        "benchmark": "eval", "device": str(device), "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "versions": {"wgen": wgen.__version__, "torch": torch.__version__, "timm": timm.__version__},
        "architecture": spec.architecture, "models": len(states), "examples": len(labels),
        "batched_seconds": batched_seconds, "loop_seconds": loop_seconds, "speedup": loop_seconds / batched_seconds,
        "max_accuracy_difference": max(abs(a - b) for a, b in zip(batched, looped)),
        "bn_models": len(bn_states), "bn_seconds": bn_seconds, "bn_loop_seconds": bn_loop_seconds,
        "bn_speedup": bn_loop_seconds / bn_seconds if stats else None,
        "bn_max_statistic_difference": max((float((a[k] - b[k]).abs().max()) for a, b in zip(ours, plain) for k in stats),
                                           default=None),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Every GPU figure of docs/benchmarks.md in one command, on synthetic weights and data.

    python benchmarks/gpu.py                    # on a CUDA machine: resnet18, all GPUs
    python benchmarks/gpu.py --small --device cpu   # the same steps at toy size (the test suite runs this)

Steps, each timed, printed as one JSON object with the device, versions and figures:

1. a zoo of ``--members`` untrained members of ``--arch`` (independent seeds), written as timm members;
2. ``wgen canonicalize`` of that zoo (every member verified function-identical);
3. ``wgen train`` on the canonical zoo with DDP over every GPU (``torchrun``), ``--steps`` steps;
4. ``wgen sample -n --samples`` (decoding, checks and safetensors writes included), peak memory;
5. ``wgen eval`` of those samples on synthetic images (models run together with ``vmap`` on CUDA).

Untrained weights time the same as trained ones; the figures say nothing about quality.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

import wgen
from wgen.checkpoints import ModelSpec, member_config, open_zoo, write_member
from wgen.evaluate import EvalOptions, evaluate_models
from wgen.flow.generator import load_generator
from wgen.flow.sample import SampleOptions, sample
from wgen.permute.canonicalize import CanonOptions, canonicalize
from wgen.runtime import resolve_device

FULL = {"arch": "resnet18", "px": 64, "members": 100, "steps": 500, "samples": 200, "images": 5000}
SMALL = {"arch": "test_resnet", "px": 32, "members": 4, "steps": 20, "samples": 6, "images": 500}


def synthetic_zoo(root: Path, arch: str, members: int, px: int) -> Path:
    """Write ``members`` freshly initialised members of ``arch`` (seeds 0, 1, ...) under ``root``; return it."""
    spec = ModelSpec(arch, 10, {})
    for seed in range(members):
        torch.manual_seed(seed)
        write_member(root / f"m{seed:03d}", spec.create().state_dict(),
                     member_config(spec, (3, px, px), (0.5,) * 3, (0.5,) * 3))
    return root


def synthetic_data(path: Path, px: int, count: int = 512) -> str:
    """Write random images and labels as an npz dataset; return its spec."""
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 255, (count, px, px, 3), dtype=np.uint8), y=rng.integers(0, 10, count))
    return f"npz:{path}"


def timed(action: Any) -> tuple[Any, float]:
    """Return ``action()`` and the seconds it took (CUDA synchronised)."""
    start = time.perf_counter()
    result = action()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def train_ddp(canon: Path, out: Path, steps: int, device: str) -> float:
    """Train a generator with ``torchrun`` over every GPU (one plain process on CPU); return seconds."""
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus), "-m", "wgen"]
                if gpus > 1 else [sys.executable, "-m", "wgen"])
    # the flow (pca), which DDP spreads over GPUs; the subspace trains on one device
    command = [*launcher, "train", str(canon), "-o", str(out), "--space", "pca", "--steps", str(steps), "--device", device,
               "--checkpoint-every", str(steps)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="toy sizes, for CPU and the test suite")
    parser.add_argument("--device", default="auto")
    for key in FULL:
        parser.add_argument(f"--{key}", type=type(FULL[key]))
    args = parser.parse_args()
    settings = {k: getattr(args, k) if getattr(args, k) is not None else v
                for k, v in (SMALL if args.small else FULL).items()}
    device = resolve_device(args.device)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        zoo, seconds = timed(lambda: synthetic_zoo(root / "zoo", settings["arch"], settings["members"], settings["px"]))
        figures["write_zoo_seconds"] = seconds
        report, seconds = timed(lambda: canonicalize(open_zoo(zoo), root / "canon", CanonOptions(), device))
        figures["canonicalize"] = {"members": settings["members"], "seconds": seconds, "timings": report["timings"],
                                   "max_rel_diff": max(m["max_rel_diff"] for m in report["members"])}
        figures["train"] = {"steps": settings["steps"], "processes": max(1, torch.cuda.device_count()) if device.type == "cuda" else 1,
                            "seconds": train_ddp(root / "canon", root / "gen", settings["steps"], str(device))}
        generator = load_generator(root / "gen", device)
        manifest, seconds = timed(lambda: sample(generator, root / "samples",
                                                 SampleOptions(count=settings["samples"], min_radius=0.0), device))
        figures["sample"] = {"count": settings["samples"], "seconds": seconds, "rejected": manifest["rejected"],
                             "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        data = synthetic_data(root / "data.npz", settings["px"], settings["images"])
        options = EvalOptions(data=data, baselines=False, recalibrate=False)
        report, seconds = timed(lambda: evaluate_models(root / "samples", None, options, device))
        figures["eval"] = {"models": report["sets"]["samples"]["models"], "examples": report["examples"],
                           "seconds": seconds, "vmap": device.type == "cuda"}
    print(json.dumps({
        "benchmark": "gpu", "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpus": torch.cuda.device_count(), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "settings": settings,
        "versions": {"wgen": wgen.__version__, "torch": torch.__version__, "timm": timm.__version__},
        **figures,
    }, indent=2))


if __name__ == "__main__":
    main()

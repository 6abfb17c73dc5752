"""Benchmark `wgen sample`: time to sample and write N models vs the I/O floor, and memory vs N.

Prints JSON with the device, versions and:
- ``speed``: seconds to sample and write N=200 members with wgen (integration, decoding, the
  finiteness check, config.json, sha256), and the I/O floor measured in the same run: a plain
  ``safetensors.torch.save_file`` of 200 state dicts of the same architecture, already in memory;
- ``memory``: peak resident memory of a sampling process at N=50 and N=500 (flat means streaming).

The generator is trained on the spot from a small random zoo unless ``--generator`` is given
(timings do not depend on its quality). On a CUDA machine, pass ``--arch resnet18 --device cuda``.

    python benchmarks/sample.py [--arch test_resnet] [--device cpu] [--generator PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import safetensors.torch
import timm
import torch

import wgen
from wgen.checkpoints import ModelSpec, member_config, open_zoo, write_member
from wgen.flow.nets import NetConfig
from wgen.flow.sample import SampleOptions, load_generator, sample
from wgen.flow.train import TrainConfig, train_generator
from wgen.runtime import resolve_device

SIZES = {"test_resnet": 32, "resnet18": 64}


def quick_generator(arch: str, root: Path, device: torch.device) -> Path:
    """Return a generator trained for a few steps on 6 random members of ``arch``."""
    spec = ModelSpec(arch, 10, {})
    px = SIZES.get(arch, 32)
    for seed in range(6):
        torch.manual_seed(seed)
        write_member(root / "zoo" / f"m{seed}", spec.create().state_dict(),
                     member_config(spec, (3, px, px), (0.5,) * 3, (0.5,) * 3))
    config = TrainConfig(steps=50, holdout=0.0, net=NetConfig())
    train_generator(open_zoo(root / "zoo"), root / "gen", config, device)
    return root / "gen"


def time_sampling(generator_path: Path, count: int, device: torch.device, root: Path) -> float:
    generator = load_generator(generator_path, device)
    start = time.perf_counter()
    sample(generator, root / f"samples-{count}", SampleOptions(count=count, batch_size=50), device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def io_floor(generator_path: Path, count: int, root: Path) -> float:
    """Seconds for a plain safetensors save of ``count`` state dicts of the architecture."""
    spec = load_generator(generator_path).spec
    states = []
    for seed in range(count):
        torch.manual_seed(seed)
        states.append({k: v.contiguous() for k, v in spec.create().state_dict().items()})
    folder = root / "floor"
    folder.mkdir()
    start = time.perf_counter()
    for i, state in enumerate(states):
        safetensors.torch.save_file(state, str(folder / f"{i:03d}.safetensors"))
    return time.perf_counter() - start


def peak_memory_mib(generator_path: Path, count: int, device: str, root: Path) -> float:
    """Peak RSS (MiB) of a fresh process sampling ``count`` members."""
    code = (
        "import resource, sys, torch\n"
        "from pathlib import Path\n"
        "from wgen.flow.sample import SampleOptions, load_generator, sample\n"
        f"device = torch.device({device!r})\n"
        f"sample(load_generator({str(generator_path)!r}, device), Path({str(root / f'mem-{count}')!r}), "
        f"SampleOptions(count={count}, batch_size=50), device)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="test_resnet")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--generator", type=Path)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generator = args.generator or quick_generator(args.arch, root, device)
        time_sampling(generator, 10, device, root)  # warm-up: imports, kernels, page cache
        seconds = time_sampling(generator, args.count, device, root)
        floor = io_floor(generator, args.count, root)
        memory = {str(n): peak_memory_mib(generator, n, str(device), root) for n in (50, 500)}
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        result = {
            "benchmark": "sample", "device": str(device), "gpu": gpu, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "versions": {"wgen": wgen.__version__, "torch": torch.__version__, "timm": timm.__version__},
            "architecture": load_generator(generator).spec.architecture,
            "speed": {"count": args.count, "wgen_seconds": seconds, "io_floor_seconds": floor,
                      "ratio_to_floor": seconds / floor, "target_ratio": 1.5},
            "memory": {"peak_rss_mib": memory, "ratio_500_to_50": memory["500"] / memory["50"]},
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

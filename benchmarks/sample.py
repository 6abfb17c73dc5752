"""Benchmark `wgen sample`: time to sample and write N models vs the I/O floor, and memory vs N.

Prints JSON with the device, versions and:
- ``speed``: seconds to sample and write N=200 members with wgen (integration, decoding, the
  finiteness check, config.json, sha256), and the I/O floor measured in the same run: a plain
  ``safetensors.torch.save_file`` of 200 state dicts of the same architecture, already in memory.
  Both are timed in alternating rounds, each after an ``os.sync()`` (write-back of the previous
  segment would otherwise land in the next one), and their medians compared;
- ``memory``: peak resident memory of a sampling process at N=50 and N=500 (``--memory-counts``; flat
  means streaming).

The generator is trained on the spot from a small random zoo unless ``--generator`` is given
(timings do not depend on its quality). On a CUDA machine, pass ``--arch resnet18 --device cuda``.

    python benchmarks/sample.py [--arch test_resnet] [--device cpu] [--generator PATH]
    python benchmarks/sample.py --generator runs/r18/gen --count 100 --rounds 3 --memory-counts 50,200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch

import wgen
from wgen.checkpoints import ModelSpec, member_config, open_zoo, write_member
from wgen.flow.generator import Generator, load_generator
from wgen.flow.sample import SampleOptions, sample
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
    config = TrainConfig(steps=50, holdout=0.0)
    train_generator(open_zoo(root / "zoo"), root / "gen", config, device)
    return root / "gen"


def time_sampling(generator: Generator, count: int, device: torch.device, out: Path) -> float:
    """Seconds for wgen to sample and write ``count`` members into ``out``."""
    start = time.perf_counter()
    sample(generator, out, SampleOptions(count=count, batch_size=50, min_radius=0.0), device)  # write all N
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def floor_states(generator: Generator, count: int) -> list[dict[str, torch.Tensor]]:
    """Return ``count`` freshly initialised state dicts of the generator's architecture, in memory."""
    states = []
    for seed in range(count):
        torch.manual_seed(seed)
        states.append({k: v.contiguous() for k, v in generator.spec.create().state_dict().items()})
    return states


def time_floor(states: list[dict[str, torch.Tensor]], out: Path) -> float:
    """Seconds for a plain safetensors save of ``states`` into ``out``: the I/O floor."""
    out.mkdir()
    start = time.perf_counter()
    for i, state in enumerate(states):
        safetensors.torch.save_file(state, str(out / f"{i:03d}.safetensors"))
    return time.perf_counter() - start


def speed(generator_path: Path, count: int, device: torch.device, root: Path, rounds: int) -> dict[str, Any]:
    """Time wgen and the floor in alternating rounds (disk write-back makes single runs noisy); medians compared."""
    generator = load_generator(generator_path, device)
    states = floor_states(generator, count)
    time_sampling(generator, 10, device, root / "warm-up")  # imports, kernels, page cache
    wgen_seconds, floor_seconds = [], []
    for r in range(rounds):
        pair = [lambda: wgen_seconds.append(time_sampling(generator, count, device, root / f"wgen-{r}")),
                lambda: floor_seconds.append(time_floor(states, root / f"floor-{r}"))]
        for measure in (pair if r % 2 == 0 else pair[::-1]):
            os.sync()  # start clean: the previous segment's write-back must not land in this one
            measure()
        shutil.rmtree(root / f"wgen-{r}")
        shutil.rmtree(root / f"floor-{r}")
    wgen_median, floor_median = statistics.median(wgen_seconds), statistics.median(floor_seconds)
    return {"count": count, "rounds": rounds, "wgen_seconds": wgen_seconds, "io_floor_seconds": floor_seconds,
            "wgen_median": wgen_median, "io_floor_median": floor_median,
            "ratio_to_floor": wgen_median / floor_median, "target_ratio": 1.5}


def peak_memory_mib(generator_path: Path, count: int, device: str, root: Path) -> float:
    """Peak RSS (MiB) of a fresh process sampling ``count`` members."""
    code = (
        "import resource, sys, torch\n"
        "from pathlib import Path\n"
        "from wgen.flow.generator import load_generator\nfrom wgen.flow.sample import SampleOptions, sample\n"
        f"device = torch.device({device!r})\n"
        f"sample(load_generator({str(generator_path)!r}, device), Path({str(root / f'mem-{count}')!r}), "
        f"SampleOptions(count={count}, batch_size=50, min_radius=0.0), device)\n"
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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory-counts", default="50,500", help="sample counts whose peak memory is compared")
    args = parser.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generator = args.generator or quick_generator(args.arch, root, device)
        # memory first: a child's peak RSS starts at its parent's size when forked (Linux keeps it across exec),
        # and speed() holds the floor's state dicts in memory
        memory = {str(n): peak_memory_mib(generator, n, str(device), root) for n in map(int, args.memory_counts.split(","))}
        result_speed = speed(generator, args.count, device, root, args.rounds)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        result = {
            "benchmark": "sample", "device": str(device), "gpu": gpu, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "versions": {"wgen": wgen.__version__, "torch": torch.__version__, "timm": timm.__version__},
            "architecture": load_generator(generator).spec.architecture,
            "speed": result_speed,
            "memory": {"peak_rss_mib": memory, "ratio_largest_to_smallest": memory[max(memory, key=int)]
                       / memory[min(memory, key=int)]},
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

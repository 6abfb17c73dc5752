"""The whole chain on one architecture, stage by stage, with each stage's wall time and peak memory.

    python benchmarks/chain.py --arch resnet18 --members 8 --out runs/r18     # resnet18 at 32 px on digits

A base member is trained first and the zoo is ``--members`` fine-tunes of it (``wgen zoo --init``:
the shape of zoo practitioners hold for large models); then canonicalize, train, ``sample -n
--samples`` and ``-n --samples-small`` (peak memory must not grow with N), and eval of a subset of
``--eval-samples`` samples next to the zoo. Every stage is the CLI command a user would type, run as
its own process; its peak resident memory comes from the kernel's accounting of that process. Prints
one JSON object; the outputs stay under ``--out`` (re-running resumes every stage).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import timm
import torch

import wgen


def stage(name: str, args: list[str], results: dict[str, Any], parallel: int = 1) -> None:
    """Run ``wgen *args`` as a process (``parallel`` > 1: as that many ``--shard I/N`` processes at once, sharing
    the cores); record the wall seconds and the largest peak RSS (MiB) of its processes under ``name``."""
    commands = [args] if parallel == 1 else [[*args, "--shard", f"{i}/{parallel}"] for i in range(parallel)]
    start = time.perf_counter()
    with contextlib.ExitStack() as files:
        # output to files, not pipes: the processes are reaped with wait4, which also gives their peak memory
        logs = [(files.enter_context(tempfile.TemporaryFile()), files.enter_context(tempfile.TemporaryFile()))
                for _ in commands]
        processes = [subprocess.Popen([sys.executable, "-m", "wgen", *command], stdout=out, stderr=err)
                     for command, (out, err) in zip(commands, logs)]
        peak = 0
        for process, (out, err) in zip(processes, logs):
            _, status, usage = os.wait4(process.pid, 0)
            peak = max(peak, usage.ru_maxrss)
            if os.waitstatus_to_exitcode(status) != 0:
                err.seek(0)
                raise SystemExit(f"wgen {' '.join(args)} failed:\n{err.read().decode()[-3000:]}")
        logs[0][0].seek(0)
        stdout = logs[0][0].read().decode()
    results[name] = {"command": "wgen " + " ".join(args), "seconds": round(time.perf_counter() - start, 2),
                     "peak_rss_mib": round(peak / 1024, 1)}
    if parallel > 1:
        results[name]["processes"] = parallel
    if "--json" in args:
        results[name]["result"] = json.loads(stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--base-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="epochs of each fine-tune")
    parser.add_argument("--steps", type=int, default=2000, help="generator training steps (flows)")
    parser.add_argument("--space", default="pca", help="generator space: pca (the figures in docs/benchmarks.md) or subspace")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--samples-small", type=int, default=50)
    parser.add_argument("--eval-samples", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("runs/chain"))
    args = parser.parse_args()
    root, results = args.out, {}
    common = ["-a", args.arch, "-d", args.data]
    stage("base", ["zoo", *common, "-n", "1", "--epochs", str(args.base_epochs), "-o", str(root / "base")], results)
    stage("zoo", ["zoo", *common, "-n", str(args.members), "--epochs", str(args.epochs), "--lr", "3e-4",
                  "--init", str(root / "base" / "member-000"), "--seed-start", "1", "-o", str(root / "zoo")], results)
    stage("canonicalize", ["canonicalize", str(root / "zoo"), "-o", str(root / "canon"), "--json"], results)
    stage("train", ["train", str(root / "canon"), "-o", str(root / "gen"), "--space", args.space, "--steps", str(args.steps),
                    "--json"], results)
    for count in (args.samples, args.samples_small):
        stage(f"sample_{count}", ["sample", str(root / "gen"), "-n", str(count), "-o", str(root / f"samples-{count}"),
                                  "--json"], results)
    stage("sample_eval", ["sample", str(root / "gen"), "-n", str(args.eval_samples), "-o", str(root / "samples-eval"),
                          "--seed", "1"], results)
    stage("eval", ["eval", str(root / "samples-eval"), "--zoo", str(root / "canon"), "--noise-scales", "0.1,0.3",
                   "--rematch", "1", "--out", str(root / "report.json")], results)
    canon = results["canonicalize"].pop("result")
    results["canonicalize"]["function_preserved_max_rel_diff"] = max(m["max_rel_diff"] for m in canon["members"])
    results["canonicalize"]["pairwise_reduction"] = canon["pairwise_reduction"]
    report = json.loads((root / "report.json").read_text())
    results["eval"]["accuracy"] = {name: s["accuracy"]["mean"] for name, s in report["sets"].items()}
    small, large = (results[f"sample_{n}"]["peak_rss_mib"] for n in (args.samples_small, args.samples))
    print(json.dumps({
        "benchmark": "chain", "architecture": args.arch, "data": args.data, "members": args.members,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "versions": {"wgen": wgen.__version__, "torch": torch.__version__, "timm": timm.__version__},
        "stages": results, "sample_peak_rss_ratio": large / small,
    }, indent=2, default=str))


if __name__ == "__main__":
    main()

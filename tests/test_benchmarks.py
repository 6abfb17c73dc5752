"""The benchmark scripts run (at toy size on CPU) and print the figures they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.mark.slow
def test_the_gpu_benchmark_runs_small_on_cpu() -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu.py"), "--small", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout)
    assert figures["device"] == "cpu" and figures["settings"]["arch"] == "test_resnet"
    assert figures["canonicalize"]["members"] == 4 and figures["canonicalize"]["max_rel_diff"] <= 1e-4
    assert figures["train"]["seconds"] > 0 and figures["sample"]["count"] == 6
    assert figures["eval"]["models"] == 6 - figures["sample"]["rejected"] and figures["eval"]["examples"] == 100

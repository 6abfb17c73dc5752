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


@pytest.mark.slow
def test_the_novelty_benchmark_runs_small_and_judges_every_bar(tmp_path: Path) -> None:
    args = ["--members", "4", "--held-out", "1", "--epochs", "1", "--samples", "4", "--out", str(tmp_path),
            "--", "--space-args", '{"epochs": 0.05}']
    done = subprocess.run([sys.executable, str(BENCHMARKS / "novelty.py"), *args], capture_output=True, text=True,
                          timeout=900, cwd=BENCHMARKS)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout)
    assert figures["data"] == "digits-hard" and figures["train_args"] == ["--space-args", '{"epochs": 0.05}']
    assert figures["rows"]["held-out"]["models"] == 1 and figures["rows"]["zoo"]["models"] == 3
    assert set(figures["stages"]) == {"zoo", "canonicalize", "train", "sample", "eval"}
    assert len(figures["bars"]) == 9 and all(isinstance(bar[-1], bool) for bar in figures["bars"].values())
    assert figures["headline"]["held-out"] == {"0.3": 1.0, "0.5": 1.0, "0.8": 1.0}  # one member sets both bars
    table = subprocess.run([sys.executable, str(BENCHMARKS / "novelty.py"), *args[:-3], "--markdown", *args[-3:]],
                           capture_output=True, text=True, timeout=600, cwd=BENCHMARKS)
    assert table.returncode == 0, table.stderr[-3000:]
    assert table.stdout.startswith("| set | models |") and "| held-out | 1 |" in table.stdout
    on_val = subprocess.run([sys.executable, str(BENCHMARKS / "novelty.py"), *args[:-3], "--split", "val", *args[-3:]],
                            capture_output=True, text=True, timeout=900, cwd=BENCHMARKS)
    assert on_val.returncode == 0, on_val.stderr[-3000:]
    assert json.loads(on_val.stdout)["split"] == "val"
    report = json.loads((tmp_path / "gen-report-val.json").read_text())
    assert report["split"] == "val" and report["examples"] == 1800  # a tenth of digits-hard's 17,970 images


def test_the_eval_benchmark_compares_both_paths_with_their_baselines() -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "eval.py"), "--count", "3", "--bn-count", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout)
    assert figures["models"] == 3 and figures["bn_models"] == 2 and figures["bn_speedup"] > 0
    assert figures["max_accuracy_difference"] <= 1e-6
    assert figures["bn_max_statistic_difference"] < 1e-3  # float sums in another order, nothing more

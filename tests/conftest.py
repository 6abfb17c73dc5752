"""Shared fixtures: tiny timm members written to disk, and a CLI runner that reports exit codes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from wgen.checkpoints import ModelSpec, member_config, write_member
from wgen.cli import app

TINY = ModelSpec("test_resnet", 10, {})
INPUT_SIZE = (3, 32, 32)


def make_state(spec: ModelSpec = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return the state dict of a freshly initialised model of ``spec`` from ``seed``."""
    torch.manual_seed(seed)
    model = spec.create()
    # non-trivial BatchNorm statistics, so that buffers matter in every comparison
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.normal_(0, 0.1)
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def write_test_member(path: Path, spec: ModelSpec = TINY, seed: int = 0) -> Path:
    """Write a member of ``spec`` at ``path`` and return the path."""
    config = member_config(spec, INPUT_SIZE, (0.5,) * 3, (0.5,) * 3, {"seed": seed})
    write_member(path, make_state(spec, seed), config)
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Return {relative path: sha256} of every file under ``root`` (to prove nothing changed)."""
    if not root.exists():
        return {}
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def run_cli():
    """Invoke the wgen CLI in-process; return the click Result (exit_code, output, stderr)."""
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return run


def make_zoo(root: Path, count: int) -> Path:
    """Write ``count`` test_resnet members ``m0, m1, ...`` (seeds 0, 1, ...) under ``root``; return it."""
    for i in range(count):
        write_test_member(root / f"m{i}", seed=i)
    return root


@pytest.fixture
def tiny_zoo(tmp_path: Path) -> Path:
    """A folder of three test_resnet members in timm local-dir layout."""
    return make_zoo(tmp_path / "zoo", 3)

"""Shared fixtures: tiny timm members written to disk, one real digits chain per session, a CLI runner.

Session-scoped fixtures are built once and shared: tests read them and never write into them
(a test that needs to change one copies it first).
"""

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
# the tiny generator of the pinned-samples test: keep these settings as they are
TINY_TRAINING = {"steps": 20, "batch_size": 16, "net_args": {"width": 32, "depth": 1}}


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


def make_zoo(root: Path, count: int) -> Path:
    """Write ``count`` test_resnet members ``m0, m1, ...`` (seeds 0, 1, ...) under ``root``; return it."""
    for i in range(count):
        write_test_member(root / f"m{i}", seed=i)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Return {relative path: sha256} of every file under ``root`` (to prove nothing changed)."""
    if not root.exists():
        return {}
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def invoke(*args: object):
    """Run the wgen CLI in-process; return the click Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def drawn_generator(canon: Path, root: Path, space: str, space_args: str, samples: int) -> dict[str, Path]:
    """Train a generator of ``space`` (settings ``space_args``, 1 member in 5 held out) on ``canon`` into
    ``root / "gen"`` and draw ``samples`` samples into ``root / "samples"``; return the three folders."""
    for args in (("train", canon, "-o", root / "gen", "--space", space, "--space-args", space_args, "--holdout", "0.2"),
                 ("sample", root / "gen", "-n", str(samples), "-o", root / "samples")):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    return {"canon": canon, "gen": root / "gen", "samples": root / "samples"}


@pytest.fixture
def run_cli():
    """The in-process CLI runner, as a fixture."""
    return invoke


@pytest.fixture
def tiny_zoo(tmp_path: Path) -> Path:
    """A fresh folder of three untrained test_resnet members (tests may change it)."""
    return make_zoo(tmp_path / "zoo", 3)


@pytest.fixture(scope="session")
def random_zoo(tmp_path_factory) -> Path:
    """Five untrained test_resnet members with BatchNorm statistics (read-only)."""
    return make_zoo(tmp_path_factory.mktemp("random") / "zoo", 5)


@pytest.fixture(scope="session")
def tiny_generator(random_zoo: Path, tmp_path_factory) -> Path:
    """A 20-step generator on ``random_zoo`` (pca space, 4 training members, 1 held out; read-only)."""
    from wgen.checkpoints import open_zoo
    from wgen.flow.train import TrainConfig, train_generator

    out = tmp_path_factory.mktemp("tiny") / "gen"
    train_generator(open_zoo(random_zoo), out, TrainConfig(**TINY_TRAINING), torch.device("cpu"))
    return out


@pytest.fixture(scope="session")
def chain(tmp_path_factory) -> dict[str, Path]:
    """A small real chain on digits, through the CLI: zoo (6 members, 10 epochs) -> canonical zoo (barrier
    measured) -> pca flow generator (5 training, 1 held out) -> 8 samples. Read-only."""
    root = tmp_path_factory.mktemp("chain")
    steps = [
        ("zoo", "-a", "test_resnet", "-d", "digits", "-n", "6", "--epochs", "10", "-o", root / "zoo"),
        ("canonicalize", root / "zoo", "-o", root / "canon", "-d", "digits", "--barrier-pairs", "2"),
        ("train", root / "canon", "-o", root / "gen", "--space", "pca", "--steps", "3000", "--width", "64", "--depth", "2",
         "--batch-size", "64", "--holdout", "0.2"),
        ("sample", root / "gen", "-n", "8", "-o", root / "samples"),
    ]
    for args in steps:
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    return {name: root / name for name in ("zoo", "canon", "gen", "samples")}

"""Weight spaces, velocity nets, `wgen train` (resume, DDP) and `wgen sample`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from wgen.checkpoints import open_zoo
from wgen.flow.nets import NetConfig, VelocityMLP
from wgen.flow.sample import SampleOptions, integrate, load_generator, sample
from wgen.flow.space import FULL_SPACE_MAX_DIM, Layout, Slot, fit_space
from wgen.flow.train import TrainConfig, train_generator
from wgen.flow.writer import PackedLayout

from conftest import TINY, make_state, make_zoo, snapshot

QUICK = ("--steps", "30", "--width", "32", "--depth", "1", "--batch-size", "16", "--checkpoint-every", "10")


@pytest.fixture
def zoo5(tmp_path: Path) -> Path:
    return make_zoo(tmp_path / "zoo", 5)


def test_layout_round_trip_keeps_variances_positive_and_restores_integer_buffers() -> None:
    state = make_state()
    layout = Layout.from_state(state)
    vector = layout.flatten(state)
    back = layout.unflatten(vector)
    assert all(torch.allclose(back[k].float(), state[k].float(), rtol=1e-5, atol=1e-6) for k in state)
    noisy = layout.unflatten(vector + torch.randn_like(vector))
    assert all(bool((noisy[k] > 0).all()) for k in noisy if k.endswith("running_var"))
    assert noisy["bn1.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("order", ["sorted", "state dict"])
def test_packed_rows_are_the_bytes_safetensors_writes(order: str) -> None:
    state = make_state()
    state["bn1.num_batches_tracked"] = torch.tensor(1234)
    layout = Layout.from_state(state)
    if order == "state dict":  # the layout order of wgen 0.1 generators
        offsets = [0]
        keys = [k for k in state if state[k].is_floating_point()]
        for key in keys:
            offsets.append(offsets[-1] + state[key].numel())
        layout = Layout([Slot(k, tuple(state[k].shape), o, k.endswith("running_var")) for k, o in zip(keys, offsets)],
                        layout.fixed)
    vectors = torch.stack([layout.flatten(state), layout.flatten(make_state(seed=1))]) + torch.randn(2, layout.dim)
    vectors[1, 0] = float("inf")
    packed = PackedLayout(layout)
    values, finite = packed.pack(vectors.clone())
    assert finite.tolist() == [True, False]
    expected = safetensors.torch.save(layout.unflatten(vectors[0]), metadata={"format": "pt"})
    assert b"".join(bytes(chunk) for chunk in packed.file_chunks(values[0])) == expected
    assert all(torch.equal(packed.state(values[0])[k], v) for k, v in safetensors.torch.load(expected).items())
    stacked = packed.stacked(values)
    for i in range(2):
        assert all(torch.equal(stacked[k][i], v) for k, v in packed.state(values[i]).items())


@pytest.mark.parametrize("kind", ["full", "pca"])
def test_space_reconstructs_training_members(kind: str) -> None:
    states = [make_state(seed=i) for i in range(4)]
    space = fit_space(kind, states, None, torch.device("cpu"))
    assert space.dim == (space.layout.dim if kind == "full" else 3)
    decoded = space.decode(space.encode(states))
    for state, back in zip(states, decoded):
        for key in state:
            assert torch.allclose(back[key].float(), state[key].float(), rtol=1e-4, atol=1e-4), key
    coords = space.encode(states)
    if kind == "pca":  # unit-variance coefficients
        assert torch.allclose(coords.std(dim=0), torch.ones(3), atol=1e-4)


def test_pca_members_lie_on_one_sphere_and_projection_keeps_them() -> None:
    states = [make_state(seed=i) for i in range(5)]
    space = fit_space("pca", states, None, torch.device("cpu"))
    coords = space.encode(states)
    assert space.projects and space.radius == pytest.approx(4 / 5 ** 0.5, rel=1e-4)  # (N - 1) / sqrt(N)
    assert torch.allclose(coords.norm(dim=1), torch.full((5,), space.radius), rtol=1e-4)
    assert torch.allclose(space.project(coords), coords, atol=1e-5)
    inside = 0.3 * coords[:2] + torch.tensor([[0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.2, 0.0]])
    moved = space.project(inside)
    assert torch.allclose(moved.norm(dim=1), torch.full((2,), space.radius), rtol=1e-5)
    assert torch.allclose(moved / moved.norm(dim=1, keepdim=True), inside / inside.norm(dim=1, keepdim=True), atol=1e-6)


@pytest.mark.parametrize("kind, components", [("pca", 2), ("full", None)])
def test_spaces_without_a_common_member_norm_do_not_project(kind: str, components: int | None) -> None:
    states = [make_state(seed=i) for i in range(5)]
    space = fit_space(kind, states, components, torch.device("cpu"))
    points = torch.randn(3, space.dim)
    assert not space.projects and torch.equal(space.project(points), points)


def test_auto_space_rule() -> None:
    states = [make_state(seed=i) for i in range(3)]
    assert Layout.from_state(states[0]).dim > FULL_SPACE_MAX_DIM
    assert fit_space("auto", states, None, torch.device("cpu")).kind == "pca"


def test_velocity_net_starts_at_zero() -> None:
    net = VelocityMLP(7, NetConfig(width=16, depth=2))
    out = net(torch.randn(5, 7), torch.rand(5))
    assert out.shape == (5, 7) and bool((out == 0).all())


def test_train_and_sample_write_loadable_members(zoo5: Path, tmp_path: Path, run_cli) -> None:
    gen, samples = tmp_path / "gen", tmp_path / "samples"
    result = run_cli("train", zoo5, "-o", gen, *QUICK, "--holdout", "0.2", "--json")
    assert result.exit_code == 0, result.output
    config = json.loads((gen / "config.json").read_text())
    assert config["space"]["kind"] == "pca" and config["space"]["dim"] == 3
    assert len(config["members"]["holdout"]) == 1 and len(config["members"]["train"]) == 4
    info = json.loads(run_cli("info", gen, "--json").stdout)
    assert info["kind"] == "generator" and info["space"]["radius"] == pytest.approx(3 / 4 ** 0.5, rel=1e-4)

    result = run_cli("sample", gen, "-n", "5", "-o", samples, "--batch-size", "2", "--min-radius", "0", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads((samples / "manifest.json").read_text())
    assert manifest["rejected"] == 0 and [s["seed"] for s in manifest["samples"]] == [0, 1, 2, 3, 4]
    info = json.loads(run_cli("info", samples, "--json").stdout)
    assert info["kind"] == "samples" and info["members"] == 5

    # every sample loads in timm and computes what the in-memory sampled weights compute
    generator = load_generator(gen)
    noise = torch.randn(generator.space.dim, generator=torch.Generator().manual_seed(3))[None]
    state = generator.space.decode(generator.space.project(integrate(generator.net, noise, "rk4", 5)))[0]
    reference = TINY.create().eval()
    reference.load_state_dict(state)
    loaded = timm.create_model(f"local-dir:{samples / 'sample-003'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), reference(x), atol=1e-5, rtol=1e-5)
    import hashlib
    entry = manifest["samples"][3]
    assert entry["files"]["model.safetensors"] == hashlib.sha256(
        (samples / "sample-003" / "model.safetensors").read_bytes()).hexdigest()


def test_resumed_training_ends_bit_for_bit_where_an_uninterrupted_one_does(zoo5: Path, tmp_path: Path) -> None:
    zoo = open_zoo(zoo5)
    config = TrainConfig(steps=40, batch_size=16, checkpoint_every=10, net=NetConfig(width=32, depth=1), holdout=0.2)
    cpu = torch.device("cpu")
    train_generator(zoo, tmp_path / "whole", config, cpu)
    assert train_generator(zoo, tmp_path / "cut", config, cpu, stop_after=15) == {"stopped_at": 15}
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    first_segment = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["seconds"]
    train_generator(zoo, tmp_path / "cut", config, cpu, resume=True)
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["training"]["seconds"] >= round(first_segment, 2) > 0
    a = safetensors.torch.load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_refuses_existing_output_and_mismatching_resume(zoo5: Path, tmp_path: Path, run_cli) -> None:
    gen = tmp_path / "gen"
    assert run_cli("train", zoo5, "-o", gen, *QUICK).exit_code == 0
    before = snapshot(gen)
    result = run_cli("train", zoo5, "-o", gen, *QUICK)
    assert result.exit_code == 2 and f"{gen}: exists" in " ".join(result.stderr.split())
    result = run_cli("train", zoo5, "-o", gen, *QUICK[:-2], "--checkpoint-every", "5", "--resume")
    assert result.exit_code == 2
    assert "the checkpoint was trained with other settings (checkpoint_every)" in " ".join(result.stderr.split())
    assert snapshot(gen) == before


@pytest.mark.parametrize("args, message", [
    (("--space", "fourier"), "unknown --space 'fourier'"),
    (("--components", "9"), "--components 9 must be between 1 and training members - 1 (3)"),
    (("--holdout", "1.5"), "--holdout 1.5 must be in [0, 1)"),
    (("--time-sampling", "beta"), "unknown --time-sampling 'beta'"),
])
def test_bad_train_options(zoo5: Path, tmp_path: Path, run_cli, args, message) -> None:
    result = run_cli("train", zoo5, "-o", tmp_path / "gen", *QUICK, *args)
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split())


@pytest.fixture
def generator_dir(zoo5: Path, tmp_path: Path) -> Path:
    gen = tmp_path / "gen"
    train_generator(open_zoo(zoo5), gen, TrainConfig(steps=20, batch_size=16, net=NetConfig(width=32, depth=1)),
                    torch.device("cpu"))
    return gen


def test_samples_do_not_depend_on_batch_size_and_solvers_run(generator_dir: Path, tmp_path: Path) -> None:
    generator = load_generator(generator_dir)
    cpu = torch.device("cpu")
    sample(generator, tmp_path / "a", SampleOptions(count=3, batch_size=1, min_radius=0), cpu)
    sample(generator, tmp_path / "b", SampleOptions(count=3, batch_size=3, min_radius=0), cpu)
    for i in range(3):
        a = safetensors.torch.load_file(str(tmp_path / "a" / f"sample-00{i}" / "model.safetensors"))
        b = safetensors.torch.load_file(str(tmp_path / "b" / f"sample-00{i}" / "model.safetensors"))
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    for solver in ("euler", "rk4", "dopri5"):
        manifest = sample(generator, tmp_path / solver, SampleOptions(count=2, solver=solver, steps=4, min_radius=0), cpu)
        assert manifest["rejected"] == 0 and manifest["solver"] == solver


def test_sampling_projects_end_points_unless_told_not_to(generator_dir: Path, tmp_path: Path, monkeypatch) -> None:
    generator = load_generator(generator_dir)
    seen = []
    real = generator.space.vectors
    monkeypatch.setattr(generator.space, "vectors", lambda coords, out=None: seen.append(coords.clone()) or real(coords, out))
    cpu = torch.device("cpu")
    projected = sample(generator, tmp_path / "p", SampleOptions(count=3), cpu)
    free = sample(generator, tmp_path / "f", SampleOptions(count=3, project=False), cpu)
    assert projected["projected"] and not free["projected"]
    assert torch.allclose(seen[0].norm(dim=1), torch.full((3,), generator.space.radius), rtol=1e-5)
    assert torch.allclose(seen[0], generator.space.project(seen[1]), atol=1e-6)
    assert json.loads((tmp_path / "p" / "sample-000" / "config.json").read_text())["wgen"]["projected"] is True


def test_samples_with_finite_weights_but_non_finite_outputs_are_flagged(generator_dir: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    generator = load_generator(generator_dir)
    real = generator.space.vectors

    def overflowing(coords, out=None):
        vectors = real(coords, out)
        for slot in generator.space.layout.slots:
            if slot.key.endswith("weight") and not slot.log:
                vectors[1, slot.offset:slot.offset + slot.size] = 1e20  # finite, but outputs overflow
        return vectors

    monkeypatch.setattr(generator.space, "vectors", overflowing)
    manifest = sample(generator, tmp_path / "s", SampleOptions(count=3, min_radius=0), torch.device("cpu"))
    assert [e["rejected"] for e in manifest["samples"]] == [None, "non-finite outputs", None]
    assert not (tmp_path / "s" / "sample-001").exists() and (tmp_path / "s" / "sample-002").exists()


def test_blends_of_members_are_rejected_not_written(generator_dir: Path, tmp_path: Path, run_cli) -> None:
    result = run_cli("sample", generator_dir, "-n", "4", "-o", tmp_path / "s", "--min-radius", "0.99")
    assert result.exit_code == 0, result.output
    entries = json.loads((tmp_path / "s" / "manifest.json").read_text())["samples"]
    blends = [e for e in entries if e["radius"] < 0.99]
    assert blends, "a 20-step generator ends inside the members' sphere"
    for entry in entries:
        written = (tmp_path / "s" / entry["name"]).exists()
        assert written == (entry["radius"] >= 0.99)
        if not written:
            assert entry["rejected"] == f"a blend of members (radius {entry['radius']:.2f} < --min-radius 0.99)"
    assert f"{len(blends)} rejected ({len(blends)} a blend of members)" in " ".join(result.stdout.split())
    assert "the generator looks under-trained" in " ".join(result.stderr.split())


def test_killed_sampling_resumes(generator_dir: Path, tmp_path: Path) -> None:
    generator = load_generator(generator_dir)
    out = tmp_path / "s"

    class Kill:
        def start(self, total, done): ...
        def advance(self, count):
            raise KeyboardInterrupt

    options = SampleOptions(count=4, batch_size=2, min_radius=0)
    with pytest.raises(KeyboardInterrupt):
        sample(generator, out, options, torch.device("cpu"), progress=Kill())
    first = snapshot(out / "sample-000")
    assert not (out / "manifest.json").exists() and not (out / "sample-002").exists()
    manifest = sample(generator, out, options, torch.device("cpu"))
    assert len(manifest["samples"]) == 4 and snapshot(out / "sample-000") == first


def test_non_finite_samples_are_flagged_not_kept(generator_dir: Path, tmp_path: Path, monkeypatch) -> None:
    generator = load_generator(generator_dir)
    real = generator.space.vectors

    def poisoned(coords, out=None):
        vectors = real(coords, out)
        vectors[1, 0] = float("nan")
        return vectors

    monkeypatch.setattr(generator.space, "vectors", poisoned)
    manifest = sample(generator, tmp_path / "s", SampleOptions(count=3, batch_size=3, min_radius=0), torch.device("cpu"))
    assert manifest["rejected"] == 1
    assert manifest["samples"][1]["rejected"] == "non-finite weights"
    assert not (tmp_path / "s" / "sample-001").exists() and (tmp_path / "s" / "sample-002").exists()


def test_calibration_uses_the_train_split_only(tmp_path: Path, run_cli, monkeypatch) -> None:
    from wgen.data import SplitData

    zoo = tmp_path / "zoo"
    assert run_cli("zoo", "-a", "test_resnet", "-d", "digits", "-n", "3", "--epochs", "1", "-o", zoo).exit_code == 0
    gen = tmp_path / "gen"
    assert run_cli("train", zoo, "-o", gen, *QUICK).exit_code == 0
    seen = []
    real = SplitData.batches

    def spy(self, split, *args, **kwargs):
        seen.append(split)
        return real(self, split, *args, **kwargs)

    monkeypatch.setattr(SplitData, "batches", spy)
    result = run_cli("sample", gen, "-n", "2", "-o", tmp_path / "s", "--calibrate", "digits", "--min-radius", "0")
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {"train"}
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["calibrate"] == "digits"


@pytest.mark.parametrize("args, message", [
    (("--solver", "leapfrog"), "unknown --solver 'leapfrog'"),
    (("-n", "0"), "-n and --batch-size must be at least 1"),
    (("--min-radius", "1.5"), "--min-radius must be in [0, 1), got 1.5"),
])
def test_bad_sample_options(generator_dir: Path, tmp_path: Path, run_cli, args, message) -> None:
    result = run_cli("sample", generator_dir, "-o", tmp_path / "s", *args)
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "s").exists()


def test_sample_from_a_folder_that_is_not_a_generator(zoo5: Path, tmp_path: Path, run_cli) -> None:
    result = run_cli("sample", zoo5 / "m0", "-o", tmp_path / "s")
    assert result.exit_code == 2
    assert "not a generator" in result.stderr


@pytest.mark.slow
def test_torchrun_ddp_on_cpu_with_two_gloo_processes(zoo5: Path, tmp_path: Path) -> None:
    gen = tmp_path / "gen"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "wgen", "train", str(zoo5), "-o", str(gen), *QUICK, "--device", "cpu", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads((gen / "config.json").read_text())
    assert config["training"]["world_size"] == 2
    assert (gen / "model.safetensors").is_file()

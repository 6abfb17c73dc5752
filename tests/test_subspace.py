"""The subspace generator: Dirichlet proportions from noise, a trained simplex, calibrated samples that are new."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import scipy.stats
import timm
import torch

from wgen.flow.spaces.subspace import SubspaceOptions, proportions, simplex_of


def test_noise_becomes_dirichlet_one_proportions() -> None:
    k = 5
    mix = proportions(torch.randn(200_000, k, generator=torch.Generator().manual_seed(0)))
    assert (mix > 0).all() and torch.allclose(mix.sum(dim=1), torch.ones(len(mix)), atol=1e-6)
    # Dirichlet(1, ..., 1): mean 1/k, variance (k - 1) / (k^2 (k + 1)), P(first > 1/2) = (1/2)^(k - 1)
    assert mix.mean(dim=0) == pytest.approx([1 / k] * k, abs=2e-3)
    assert mix.var(dim=0) == pytest.approx([(k - 1) / (k * k * (k + 1))] * k, rel=0.03)
    assert float((mix[:, 0] > 0.5).float().mean()) == pytest.approx(0.5 ** (k - 1), abs=3e-3)


@pytest.mark.parametrize("alpha", [0.3, 2.0])
def test_noise_becomes_dirichlet_alpha_proportions(alpha: float) -> None:
    k = 4
    mix = proportions(torch.randn(200_000, k, generator=torch.Generator().manual_seed(0)), alpha)
    assert (mix >= 0).all() and torch.allclose(mix.sum(dim=1), torch.ones(len(mix)), atol=1e-6)
    # Dirichlet(alpha, ..., alpha): mean 1/k, variance (k - 1) / (k^2 (k alpha + 1)); the first is Beta(alpha, 3 alpha)
    assert mix.mean(dim=0) == pytest.approx([1 / k] * k, abs=2e-3)
    assert mix.var(dim=0) == pytest.approx([(k - 1) / (k * k * (k * alpha + 1))] * k, rel=0.03)
    beta = scipy.stats.beta(alpha, (k - 1) * alpha)
    assert float((mix[:, 0] > 0.5).float().mean()) == pytest.approx(beta.sf(0.5), abs=3e-3)


@pytest.fixture(scope="module")
def subspace(chain: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    """A subspace generator on the digits chain's canonical zoo (5 corners, 1 held out) and 6 samples of it."""
    from conftest import drawn_generator

    return drawn_generator(chain["canon"], tmp_path_factory.mktemp("subspace"), "subspace",
                           '{"epochs": 20, "lr": 0.001, "warmup_steps": 20}', 6)


def test_subspace_samples_are_calibrated_loadable_accurate_and_away_from_members(subspace: dict[str, Path],
                                                                                 run_cli) -> None:
    config = json.loads((subspace["gen"] / "config.json").read_text())
    assert config["net"] == {"kind": "none"} and config["net_parameters"] == 0
    assert config["space"]["corners"] == 5 and config["data"] == "digits"
    manifest = json.loads((subspace["samples"] / "manifest.json").read_text())
    assert manifest["calibrate"] == "digits" and manifest["rejected"] == 0  # BatchNorm re-estimated on train
    model = timm.create_model(f"local-dir:{subspace['samples'] / 'sample-000'}", pretrained=True)
    assert type(model).__name__ == "ResNet"
    result = run_cli("eval", subspace["samples"], "--zoo", subspace["canon"], "--no-baselines", "--json")
    assert result.exit_code == 0, result.output
    sets = json.loads(result.stdout)["sets"]
    assert "samples + BN" not in sets  # calibrated when sampled: re-estimating again would repeat the row
    samples, zoo = sets["samples"], sets["zoo"]
    assert samples["accuracy"]["mean"] >= zoo["accuracy"]["mean"] - 0.02
    assert samples["nn_ratio"]["min"] > 0.3  # a mix of every corner, not a corner


def test_subspace_samples_mix_the_trained_corners(subspace: dict[str, Path]) -> None:
    from wgen.flow.generator import load_generator

    generator = load_generator(subspace["gen"])
    noise = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    rows = generator.space.vectors(noise)
    assert torch.allclose(rows, proportions(noise) @ generator.space.corners, atol=1e-5)
    with pytest.raises(Exception, match="no coordinates for members"):
        generator.space.encode([])


def test_sample_alpha_draws_the_mixes_nearer_the_centre_and_is_recorded(subspace: dict[str, Path], tmp_path: Path,
                                                                        run_cli) -> None:
    from wgen.flow.generator import load_generator

    result = run_cli("sample", subspace["gen"], "-n", "2", "-o", tmp_path / "samples", "--alpha", "5")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "samples" / "manifest.json").read_text())
    assert manifest["alpha"] == 5.0 and manifest["rejected"] == 0
    assert json.loads((subspace["samples"] / "manifest.json").read_text())["alpha"] == 1.0  # the training's
    generator = load_generator(subspace["gen"])
    noise = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    generator.space.sample_alpha = 5.0
    assert torch.allclose(generator.space.vectors(noise), proportions(noise, 5.0) @ generator.space.corners, atol=1e-5)
    resumed = run_cli("sample", subspace["gen"], "-n", "2", "-o", tmp_path / "samples")
    assert resumed.exit_code == 2 and "holds samples drawn with other settings (alpha)" in resumed.stderr


def test_a_sample_run_without_alpha_drops_an_earlier_runs_override(subspace: dict[str, Path], tmp_path: Path) -> None:
    from wgen.flow.generator import load_generator
    from wgen.flow.sample import SampleOptions, sample

    generator = load_generator(subspace["gen"])
    assert sample(generator, tmp_path / "a", SampleOptions(count=1, alpha=5.0), torch.device("cpu"))["alpha"] == 5.0
    assert sample(generator, tmp_path / "b", SampleOptions(count=1), torch.device("cpu"))["alpha"] == 1.0


def test_sample_alpha_is_refused_for_a_flow_generator(chain: dict[str, Path], tmp_path: Path, run_cli) -> None:
    result = run_cli("sample", chain["gen"], "-n", "2", "-o", tmp_path / "samples", "--alpha", "2")
    assert result.exit_code == 2, result.output
    assert "--alpha sets the mixes of drawn spaces (subspace, codes), not of a pca generator" in result.stderr
    assert not (tmp_path / "samples").exists()
    bad = run_cli("sample", chain["gen"], "-n", "2", "-o", tmp_path / "samples", "--alpha", "0")
    assert bad.exit_code == 2 and "--alpha 0" in bad.stderr, bad.output


def test_simplex_choice_is_uniform_over_the_simplices() -> None:
    which = simplex_of(torch.randn(90_000, generator=torch.Generator().manual_seed(0)), 3)
    assert torch.bincount(which, minlength=3).div(90_000).tolist() == pytest.approx([1 / 3] * 3, abs=5e-3)


@pytest.mark.parametrize("corners, batch_size, simplices", [(5, 128, 1), (23, 128, 1), (24, 128, 2), (36, 128, 2),
                                                             (48, 256, 4), (48, 64, 1)])
def test_auto_simplices_take_one_per_twelve_corners_in_parts_of_64_or_more(corners: int, batch_size: int,
                                                                           simplices: int) -> None:
    assert SubspaceOptions(batch_size=batch_size).resolved(corners).simplices == simplices
    assert SubspaceOptions(simplices=2).resolved(corners).simplices == 2


def test_several_simplices_train_apart_and_a_sample_mixes_one_of_them(chain: dict[str, Path], tmp_path: Path,
                                                                      run_cli) -> None:
    from wgen.flow.generator import load_generator

    result = run_cli("train", chain["canon"], "-o", tmp_path / "gen", "--space", "subspace", "--space-args",
                     '{"epochs": 3, "warmup_steps": 5, "simplices": 2}', "--holdout", "0.2")
    assert result.exit_code == 0, result.output
    space = load_generator(tmp_path / "gen").space
    assert space.simplices == 2 and len(space.corners) == 4 and space.shape == (3,)  # 5 members: one left out
    assert "2 simplices of 2 corners" in space.describe()
    noise = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    which = (noise[:, 2] > 0).long()
    expected = torch.stack([proportions(z[:2]) @ space.corners[2 * s:2 * s + 2] for z, s in zip(noise, which)])
    assert 0 < int(which.sum()) < 8 and torch.allclose(space.vectors(noise), expected, atol=1e-5)
    result = run_cli("sample", tmp_path / "gen", "-n", "2", "-o", tmp_path / "samples")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "samples" / "manifest.json").read_text())["rejected"] == 0


def test_rerunning_a_finished_subspace_training_returns_it(subspace: dict[str, Path], run_cli) -> None:
    before = (subspace["gen"] / "space.safetensors").read_bytes()
    result = run_cli("train", subspace["canon"], "-o", subspace["gen"], "--space", "subspace", "--space-args",
                     '{"epochs": 20, "lr": 0.001, "warmup_steps": 20}', "--holdout", "0.2")
    assert result.exit_code == 0, result.output
    assert (subspace["gen"] / "space.safetensors").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (("--space", "subspace", "--net", "graph"), "the subspace space draws its samples: it has no use for --net graph"),
    (("--space", "pca", "--net", "none"), "--net none leaves every sample at its noise, and the pca space needs a flow"),
    (("--space", "subspace", "--space-args", "{epochs"), "--space-args is not valid JSON"),
    (("--space", "subspace", "--space-args", '{"corners": 9}'), "--corners 9 needs 2 to 5 training members"),
    (("--space", "subspace", "--space-args", '{"temperature": 2}'), "the subspace weight space has no setting 'temperature'"),
    (("--space", "subspace", "--space-args", '{"epochs": 0}'), "--subspace-epochs 0 must be > 0"),
    (("--space", "subspace", "--space-args", '{"simplices": 3}'), "--simplices 3 leaves fewer than 2 of the 5 corners a simplex"),
    (("--space", "subspace", "--space-args", '{"simplices": 2, "batch_size": 3}'),
     "--batch-size 3 splits into fewer than 2 examples a simplex"),
])
def test_bad_subspace_options(chain: dict[str, Path], tmp_path: Path, run_cli, args, message) -> None:
    result = run_cli("train", chain["canon"], "-o", tmp_path / "gen", "--holdout", "0.2", *args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "gen" / "config.json").exists()


def test_a_zoo_without_data_needs_one_for_the_subspace(random_zoo: Path, tmp_path: Path, run_cli) -> None:
    result = run_cli("train", random_zoo, "-o", tmp_path / "gen", "--space", "subspace")
    assert result.exit_code == 2 and "the zoo records no dataset" in result.stderr


@pytest.mark.parametrize("simplices", [1, 2])
def test_a_killed_subspace_training_resumes_bit_for_bit(chain: dict[str, Path], tmp_path: Path, simplices: int) -> None:
    import safetensors.torch

    from wgen.checkpoints import open_zoo
    from wgen.flow.train import TrainConfig, train_generator

    zoo = open_zoo(chain["canon"])
    config = TrainConfig(space="subspace", space_args={"epochs": 2, "warmup_steps": 2, "simplices": simplices},
                         holdout=0.2)
    whole = train_generator(zoo, tmp_path / "whole", config, torch.device("cpu"))
    assert whole is not None and whole.space["training"]["steps"] == 20  # 1,258 training digits, 128 a batch
    assert train_generator(zoo, tmp_path / "cut", config, torch.device("cpu"), stop_after=7) is None
    assert not (tmp_path / "cut" / "config.json").exists()
    assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["step"] == 7
    resumed = train_generator(zoo, tmp_path / "cut", config, torch.device("cpu"))  # the same call again resumes
    assert resumed is not None and not (tmp_path / "cut" / "checkpoint").exists()  # the corners are in the generator
    a = safetensors.torch.load_file(str(tmp_path / "whole" / "space.safetensors"))["corners"]
    b = safetensors.torch.load_file(str(tmp_path / "cut" / "space.safetensors"))["corners"]
    assert torch.equal(a, b)


def test_a_checkpoint_of_another_number_of_simplices_is_refused(chain: dict[str, Path], tmp_path: Path) -> None:
    from wgen.checkpoints import open_zoo
    from wgen.errors import WgenError
    from wgen.flow.train import TrainConfig, train_generator

    zoo = open_zoo(chain["canon"])
    config = TrainConfig(space="subspace", space_args={"epochs": 1, "warmup_steps": 2}, holdout=0.2)
    assert train_generator(zoo, tmp_path / "gen", config, torch.device("cpu"), stop_after=3) is None
    state = tmp_path / "gen" / "checkpoint" / "state.json"
    info = json.loads(state.read_text())
    assert info["simplices"] == 1  # 5 corners: one simplex
    state.write_text(json.dumps({**info, "simplices": 2}))
    before = state.read_bytes()
    with pytest.raises(WgenError, match="a checkpoint trained with simplices 2, and this run trains with 1"):
        train_generator(zoo, tmp_path / "gen", config, torch.device("cpu"))
    assert state.read_bytes() == before  # the checkpoint is kept

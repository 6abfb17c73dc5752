"""The codes generator: per-unit codes decoded by a shared decoder, on a random base; samples that load and work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from wgen.checkpoints import ModelSpec
from wgen.errors import WgenError
from wgen.flow.spaces.base import FitContext, Layout
from wgen.flow.spaces.codes import (CodeOptions, Decoder, distilled_targets, error_overlap, joint_cross_entropy,
                                    learning_rate, mixed, mixing_matrix, plans_of, random_bases, stored_values)
from wgen.flow.spaces.subspace import batch_targets, simplex_of
from wgen.flow.spaces.units import group_sizes, unit_groups

QUICK_CODES = {"epochs": 0.5, "code_dim": 8, "corners": 4, "snapshots": 1}  # a codes training of seconds


def _resnet_plans() -> tuple[Layout, list[list[tuple[str, int]]], list]:
    spec = ModelSpec("test_resnet", 10, {})
    layout = Layout.from_state(spec.create("cpu").state_dict())
    groups = unit_groups(FitContext(torch.device("cpu"), spec, (3, 32, 32)), layout)
    return layout, groups, plans_of(layout, groups)


def test_permuting_a_groups_codes_permutes_the_decoded_network_along_that_groups_axes() -> None:
    layout, groups, plans = _resnet_plans()
    scales = {p.slot.key: 1.0 for p in plans}
    decoder = Decoder(plans, scales, {})  # no base: the decoded change alone is equivariant
    sizes = group_sizes(groups, layout)
    generator = torch.Generator().manual_seed(0)
    params = Decoder.init(plans, 8, 16, {p.slot.key: 0.5 for p in plans}, generator)
    params = {k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in params.items()}  # out is 0 at init
    codes = [torch.randn(1, n, 8, generator=generator) for n in sizes]
    free = {p.slot.key: torch.randn(1, *p.slot.shape, generator=generator) for p in plans if p.free}
    g = max(range(len(groups)), key=lambda i: len(groups[i]))  # the group of most axes
    perm = torch.randperm(sizes[g], generator=generator)
    before = decoder.tensors(params, codes, free, torch.zeros(1, dtype=torch.long))
    codes[g] = codes[g][:, perm]
    after = decoder.tensors(params, codes, free, torch.zeros(1, dtype=torch.long))
    moved = 0
    for key, value in before.items():
        expected = value[0]
        for k, axis in groups[g]:
            if k == key:
                expected = expected.index_select(axis, perm)
                moved += 1
        torch.testing.assert_close(after[key][0], expected, atol=1e-5, rtol=1e-5)
    assert moved == sum(k in before for k, _ in groups[g]) >= 9  # every decoded axis of the group (not BN statistics)


def test_a_decoder_a_simplex_decodes_each_row_with_its_simplexs_own_decoder() -> None:
    layout, groups, plans = _resnet_plans()
    scales = {p.slot.key: 1.0 for p in plans}
    bases = random_bases(plans, scales, 1, 3)
    decoder = Decoder(plans, scales, bases)
    generator = torch.Generator().manual_seed(0)
    stacked = Decoder.init(plans, 8, 16, {p.slot.key: 0.5 for p in plans}, generator, copies=3)
    stacked = {k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in stacked.items()}  # out is 0 at init
    assert all(v.shape[0] == 3 for v in stacked.values())
    sizes = group_sizes(groups, layout)
    codes = [torch.randn(4, n, 8, generator=generator) for n in sizes]
    free = {p.slot.key: torch.randn(4, *p.slot.shape, generator=generator) for p in plans if p.free}
    which = torch.tensor([2, 0, 2, 1])
    together = decoder.tensors(stacked, codes, free, which)
    for row, s in enumerate(which.tolist()):
        own = {k: v[s] for k, v in stacked.items()}  # simplex s's decoder, as a shared one
        alone = decoder.tensors(own, [c[row:row + 1] for c in codes], {k: v[row:row + 1] for k, v in free.items()},
                                which[row:row + 1])
        for key, value in alone.items():
            torch.testing.assert_close(together[key][row], value[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together["layer1.0.conv1.weight"][0], decoder.tensors(
        {k: v[0] for k, v in stacked.items()}, [c[:1] for c in codes], {k: v[:1] for k, v in free.items()},
        which[:1])["layer1.0.conv1.weight"][0])  # another simplex's decoder decodes the same codes otherwise


@pytest.mark.parametrize("decoders, cold", [("shared", False), ("simplex", False), ("shared", True)])
def test_a_snapshots_simplex_is_decoded_by_the_snapshots_decoder_on_the_simplexs_base(decoders: str,
                                                                                     cold: bool) -> None:
    layout, groups, plans = _resnet_plans()
    scales = {p.slot.key: 1.0 for p in plans}
    bases = random_bases(plans, scales, 1, 2, 2 if cold else 1)  # cold: a base a simplex of each snapshot
    generator = torch.Generator().manual_seed(0)
    copies = 2 * (2 if decoders == "simplex" else 1)  # 2 snapshots of 2 simplices
    stacked = Decoder.init(plans, 8, 16, {p.slot.key: 0.5 for p in plans}, generator, copies=copies)
    stacked = {k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in stacked.items()}  # out is 0 at init
    sizes = group_sizes(groups, layout)
    codes = [torch.randn(4, n, 8, generator=generator) for n in sizes]
    free = {p.slot.key: torch.randn(4, *p.slot.shape, generator=generator) for p in plans if p.free}
    which = torch.tensor([3, 0, 2, 1])  # snapshot 1 simplex 1, snapshot 0 simplex 0, ...
    together = Decoder(plans, scales, bases, snapshots=2, cold=cold).tensors(stacked, codes, free, which)
    for row, t in enumerate(which.tolist()):
        snapshot, simplex = divmod(t, 2)
        own = {k: v[t if decoders == "simplex" else snapshot] for k, v in stacked.items()}
        base = {k: v[t if cold else simplex][None] for k, v in bases.items()}  # alone, as simplex 0 of its own
        alone = Decoder(plans, scales, base).tensors(own, [c[row:row + 1] for c in codes],
                                                     {k: v[row:row + 1] for k, v in free.items()},
                                                     torch.zeros(1, dtype=torch.long))
        for key, value in alone.items():
            torch.testing.assert_close(together[key][row], value[0], atol=1e-5, rtol=1e-5)


def test_bases_are_drawn_on_the_cpu_from_the_seed_one_per_simplex() -> None:
    _, _, plans = _resnet_plans()
    scales = {p.slot.key: 2.0 for p in plans}
    a, b = random_bases(plans, scales, 3, 2), random_bases(plans, scales, 3, 2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    conv = a["layer1.0.conv1.weight"]
    assert conv.shape == (2, 32, 32, 3, 3) and not torch.equal(conv[0], conv[1])
    assert float(conv.std()) == pytest.approx(2.0, rel=0.05)
    assert "layer1.0.bn1.weight" not in a and "fc.bias" not in a  # vectors are decoded, not based
    cold = random_bases(plans, scales, 3, 2, snapshots=3)["layer1.0.conv1.weight"]
    assert cold.shape == (6, 32, 32, 3, 3) and torch.equal(cold[:2], conv)  # snapshot 0's are those of one snapshot
    assert not torch.equal(cold[2:4], conv) and not torch.equal(cold[2:4], cold[4:])  # later ones are their own


def test_the_generator_grows_with_the_widths_not_with_the_parameters() -> None:
    options = CodeOptions(code_dim=16, hidden=32)
    sizes = {}
    for width in (2, 4):
        spec = ModelSpec("test_resnet", 10, {"channels": [c * width for c in (32, 48, 48, 96)], "stem_width": 16 * width})
        layout = Layout.from_state(spec.create("cpu").state_dict())
        groups = unit_groups(FitContext(torch.device("cpu"), spec, (3, 32, 32)), layout)
        sizes[width] = (stored_values(plans_of(layout, groups), groups, layout, options, corners=4), layout.dim)
    # doubling every width about quadruples the network's parameters and doubles the generator
    assert sizes[4][1] / sizes[2][1] > 3.5 and 1.5 < sizes[4][0] / sizes[2][0] < 2.2


def test_the_auto_lr_is_higher_behind_batchnorm() -> None:
    assert learning_rate(ModelSpec("test_resnet", 10, {}).create("meta")) == 1e-2
    assert learning_rate(ModelSpec("test_vit", 10, {"img_size": 32, "patch_size": 8}).create("meta")) == 3e-3


def test_error_overlap_is_one_for_alike_mistakes_and_zero_for_disjoint_ones() -> None:
    labels = torch.tensor([0, 0])
    confused = torch.tensor([[5.0, 3.0, -9.0, -9.0], [-9.0, 4.0, 2.0, -9.0]])  # wrong mass on 1, then on 1 and 2
    assert abs(float(error_overlap(confused, confused, labels)) - 1) < 1e-6
    elsewhere = torch.tensor([[5.0, -40.0, -40.0, 3.0], [-9.0, -40.0, -40.0, 4.0]])  # wrong mass only on 3
    assert float(error_overlap(confused, elsewhere, labels)) < 1e-5


def test_the_joint_cross_entropy_is_that_of_the_averaged_prediction_and_rewards_a_complementary_pair() -> None:
    labels = torch.tensor([0, 1])
    a = torch.tensor([[4.0, 0.0, 0.0], [0.0, -2.0, 2.0]])  # right on the first example, wrong on the second
    b = torch.tensor([[0.0, 0.0, 3.0], [0.0, 5.0, 0.0]])  # the other way round
    averaged = (a.softmax(dim=-1) + b.softmax(dim=-1)) / 2
    expected = -averaged[torch.arange(2), labels].log().mean()
    assert abs(float(joint_cross_entropy([a, b], labels)) - float(expected)) < 1e-6
    alone = (torch.nn.functional.cross_entropy(a, labels) + torch.nn.functional.cross_entropy(b, labels)) / 2
    assert float(joint_cross_entropy([a, b], labels)) < float(alone) - 1  # the pair is far better than each
    assert abs(float(joint_cross_entropy([a, a], labels)) - float(torch.nn.functional.cross_entropy(a, labels))) < 1e-6
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])  # class distributions as targets (distill)
    expected = -(soft * averaged.log()).sum(dim=1).mean()
    assert abs(float(joint_cross_entropy([a, b], soft)) - float(expected)) < 1e-6


def test_the_mixing_matrix_puts_each_draws_proportions_on_its_simplexs_corners() -> None:
    mix = torch.arange(1.0, 13.0).view(2, 3, 2)  # 2 draws, 3 simplices of 2 corners
    weights = mixing_matrix(mix)
    assert weights.shape == (6, 6)
    for d in range(2):
        for s in range(3):
            expected = torch.zeros(6)
            expected[2 * s:2 * s + 2] = mix[d, s]
            assert torch.equal(weights[d * 3 + s], expected)


def test_unit_proportions_are_placed_on_their_simplexs_corners_unit_by_unit() -> None:
    mix = torch.arange(1.0, 25.0).view(2, 3, 2, 2)  # 2 draws, 3 simplices, 2 units, 2 corners a simplex
    weights = mixing_matrix(mix)
    assert weights.shape == (6, 2, 6)
    for d in range(2):
        for s in range(3):
            for u in range(2):
                expected = torch.zeros(6)
                expected[2 * s:2 * s + 2] = mix[d, s, u]
                assert torch.equal(weights[d * 3 + s, u], expected)


def test_units_mixed_alike_give_the_network_mix() -> None:
    generator = torch.Generator().manual_seed(0)
    params = {"codes/0": torch.randn(4, 3, 5, generator=generator), "codes/1": torch.randn(4, 2, 5, generator=generator),
              "free/fc.bias": torch.randn(4, 7, generator=generator)}
    weights = torch.rand(2, 4, generator=generator)
    codes, free = mixed(params, 2, weights)
    by_unit, free_by_unit = mixed(params, 2, weights, weights[:, None].expand(2, 5, 4))
    for a, b in zip(codes, by_unit):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert torch.equal(free["fc.bias"], free_by_unit["fc.bias"])  # free tensors mix by the network's proportions
    by_group = mixed(params, 2, weights, torch.stack([weights, torch.eye(4)[[2, 3]]], dim=1))[0]
    torch.testing.assert_close(by_group[0], codes[0])
    torch.testing.assert_close(by_group[1][1], params["codes/1"][3])  # group 1 of network 1: wholly corner 3
    # one unit's own proportions move that unit's code only
    units = weights[:, None].expand(2, 5, 4).clone()
    units[:, 4] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    moved = mixed(params, 2, weights, units)[0]
    torch.testing.assert_close(moved[0], codes[0])
    torch.testing.assert_close(moved[1][:, 0], codes[1][:, 0])
    torch.testing.assert_close(moved[1][:, 1], params["codes/1"][0, 1].expand(2, 5))


@pytest.fixture(scope="module")
def codes(chain: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    """A codes generator on the digits chain's canonical zoo (4 corners of 2 simplices, 1 held out), 4 samples."""
    from conftest import drawn_generator

    return drawn_generator(chain["canon"], tmp_path_factory.mktemp("codes"), "codes",
                           '{"epochs": 25, "code_dim": 16, "corners": 4, "snapshots": 1}', 4)


def test_codes_samples_load_work_and_are_new(codes: dict[str, Path], tmp_path: Path, run_cli) -> None:
    config = json.loads((codes["gen"] / "config.json").read_text())
    assert config["space"]["kind"] == "codes" and config["space"]["size"] < config["space"]["values"]
    assert config["space"]["training"]["lr"] == 1e-2  # auto, for a BatchNorm network
    manifest = json.loads((codes["samples"] / "manifest.json").read_text())
    assert manifest["calibrate"] == "digits" and manifest["rejected"] == 0
    model = timm.create_model(f"local-dir:{codes['samples'] / 'sample-000'}", pretrained=True)
    assert type(model).__name__ == "ResNet"
    result = run_cli("eval", codes["samples"], "--zoo", codes["canon"], "--no-baselines", "--out", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    text = " ".join(result.stdout.split())
    assert ("samples: BatchNorm statistics estimated on the train split of digits when sampled, so no 'samples + BN' "
            "row (it would repeat the samples')") in text
    samples = report["sets"]["samples"]
    assert report["calibrated_on"] == "digits" and "samples + BN" not in report["sets"]  # it would repeat "samples"
    assert samples["accuracy"]["min"] > 0.8  # digits, test_resnet: members reach about 0.97
    assert samples["nn_ratio"]["min"] > 1.0  # on their own random base, nowhere near a member


def test_groups_mix_on_their_own_by_default_and_older_generators_mix_networks(codes: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    import shutil

    from wgen.flow.generator import load_generator

    space = load_generator(codes["gen"]).space
    assert space.training["mixing"] == "group" and space.parts == len(space.groups)
    assert space.shape == (2 * (1 + len(space.groups)) + 1,)  # 2 corners a simplex: the network's, each group's; simplex
    older = shutil.copytree(codes["gen"], tmp_path / "older")
    config = json.loads((older / "config.json").read_text())
    del config["space"]["training"]["mixing"]
    (older / "config.json").write_text(json.dumps(config))
    space = load_generator(older).space
    assert space.parts == 0 and space.shape == (3,)


def test_the_stored_size_is_what_stored_values_counts(codes: dict[str, Path]) -> None:
    from wgen.flow.generator import load_generator

    space = load_generator(codes["gen"]).space
    counted = stored_values(space.decoder.plans, space.groups, space.layout, CodeOptions(code_dim=16, snapshots=1),
                            corners=4)
    assert space.size == counted == json.loads((codes["gen"] / "config.json").read_text())["space"]["size"]
    own = stored_values(space.decoder.plans, space.groups, space.layout,
                        CodeOptions(code_dim=16, decoders="simplex", snapshots=1), corners=4)
    decoder = sum(v.numel() for k, v in space.params.items() if not k.startswith(("codes/", "free/")))
    assert own == counted + decoder  # two simplices: the decoder twice
    snapshots = stored_values(space.decoder.plans, space.groups, space.layout, CodeOptions(code_dim=16, snapshots=3),
                              corners=4)
    assert snapshots == 3 * counted  # every snapshot's codes and decoder


def test_an_unknown_decoders_setting_is_refused() -> None:
    with pytest.raises(WgenError, match="--decoders 'each' is not one of shared, simplex"):
        CodeOptions(decoders="each").check()


@pytest.mark.parametrize("diversity, ensemble, mixing, distill, teachers, decoders, alpha", [
    (0.0, 0.0, "network", 0.0, "mean", "shared", 1.0), (0.5, 0.0, "network", 0.0, "mean", "simplex", 1.0),
    (0.0, 0.5, "group", 0.5, "mean", "shared", 0.3), (0.5, 0.0, "unit", 0.5, "member", "shared", 1.0)])
def test_a_killed_codes_training_resumes_to_the_same_generator(chain: dict[str, Path], tmp_path: Path, diversity: float,
                                                               ensemble: float, mixing: str, distill: float,
                                                               teachers: str, decoders: str, alpha: float) -> None:
    import safetensors.torch

    from wgen.checkpoints import open_zoo
    from wgen.flow.generator import load_generator
    from wgen.flow.train import TrainConfig, train_generator

    zoo = open_zoo(chain["canon"])
    config = TrainConfig(space="codes", space_args={**QUICK_CODES, "diversity": diversity, "ensemble": ensemble,
                                                    "mixing": mixing, "distill": distill, "teachers": teachers,
                                                    "decoders": decoders, "alpha": alpha}, holdout=0.2)
    whole = train_generator(zoo, tmp_path / "whole", config, torch.device("cpu"))
    assert train_generator(zoo, tmp_path / "cut", config, torch.device("cpu"), stop_after=3) is None
    resumed = train_generator(zoo, tmp_path / "cut", config, torch.device("cpu"))
    assert whole is not None and resumed is not None
    # every tensor bit for bit (the file's metadata keys come out of safetensors' hash map in any order)
    a = safetensors.torch.load_file(str(tmp_path / "whole" / "space.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "cut" / "space.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_generator(tmp_path / "cut").space.alpha == alpha  # samples draw their mixes as training did


@pytest.mark.parametrize("decoders, restart", [("shared", "warm"), ("simplex", "warm"), ("shared", "cold")])
def test_snapshots_are_kept_at_each_restart_and_a_run_killed_in_a_restart_resumes_to_them(
        chain: dict[str, Path], tmp_path: Path, decoders: str, restart: str) -> None:
    import safetensors.torch

    from wgen.checkpoints import open_zoo
    from wgen.flow.generator import load_generator
    from wgen.flow.train import TrainConfig, train_generator

    zoo = open_zoo(chain["canon"])
    args = {**QUICK_CODES, "decoders": decoders}
    one = TrainConfig(space="codes", space_args=args, holdout=0.2)
    restarts = {"restart": "cold"} if restart == "cold" else {"restart": "warm", "restart_epochs": 0.25}
    three = TrainConfig(space="codes", space_args={**args, "snapshots": 3, **restarts}, holdout=0.2)
    train_generator(zoo, tmp_path / "one", one, torch.device("cpu"))
    train_generator(zoo, tmp_path / "whole", three, torch.device("cpu"))
    single, space = load_generator(tmp_path / "one").space, load_generator(tmp_path / "whole").space
    steps = single.training["steps"]
    assert space.simplices == 6 and space.corners == 12  # 3 snapshots of 2 simplices of 2 corners
    # a warm restart is restart_epochs long, a cold one an independent run of epochs
    assert space.training["steps"] == (3 * steps if restart == "cold" else steps + 2 * math.ceil(steps / 2))
    assert space.size == 3 * single.size
    bases = next(iter(space.decoder.bases.values()))
    assert len(bases) == (6 if restart == "cold" else 2)  # cold snapshots are decoded on bases of their own
    for name, value in single.params.items():  # the first snapshot is the run without restarts, bit for bit
        first = value if name.startswith(("codes/", "free/")) else value.unsqueeze(0)
        rows = len(value) if name.startswith(("codes/", "free/")) or decoders == "simplex" else 1
        assert torch.equal(space.params[name][:rows].reshape(first.shape), first), name
    assert not torch.equal(space.params["codes/0"][:4], space.params["codes/0"][4:8])  # the restart moved them
    last = space.training["steps"] - 1  # killed inside the last restart, after two snapshots were kept
    assert train_generator(zoo, tmp_path / "cut", three, torch.device("cpu"), stop_after=last) is None
    assert train_generator(zoo, tmp_path / "cut", three, torch.device("cpu")) is not None
    a = safetensors.torch.load_file(str(tmp_path / "whole" / "space.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "cut" / "space.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    noise = torch.randn(60, *space.shape, generator=torch.Generator().manual_seed(0))
    vectors = space.vectors(noise)
    assert torch.isfinite(vectors).all() and len(set(simplex_of(noise[:, -1], 6).tolist())) == 6  # all drawn


def test_distilled_targets_mix_each_label_with_the_members_mean_prediction(chain: dict[str, Path],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from wgen.checkpoints import open_zoo
    from wgen.data import data_for_zoo

    monkeypatch.setattr("wgen.flow.spaces.codes.TEACHERS_PER_PASS", 2)  # 3 members: two passes, summed
    zoo = open_zoo(chain["canon"])
    states = [zoo.load(m) for m in zoo.members[:3]]
    data = data_for_zoo(zoo.info, None, zoo.preprocessing()[0])
    context = FitContext(torch.device("cpu"), zoo.spec, zoo.preprocessing()[0], data)
    x, labels = data.tensors("train")
    model = zoo.spec.create("cpu").eval()
    mean = torch.zeros(len(labels), data.num_classes)
    with torch.no_grad():
        for state in states:
            model.load_state_dict(state)
            mean += model(x).softmax(dim=-1) / len(states)
    onehot = torch.nn.functional.one_hot(labels, data.num_classes).float()
    assert torch.equal(distilled_targets(states, 0.0, context), onehot)
    torch.testing.assert_close(distilled_targets(states, 1.0, context), mean, atol=1e-5, rtol=0)
    half = distilled_targets(states, 0.5, context)
    torch.testing.assert_close(half, (onehot + mean) / 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(half.sum(dim=1), torch.ones(len(labels)))
    own = distilled_targets(states, 0.5, context, "member")  # each member's own prediction, in the members' order
    assert own.shape == (3, len(labels), data.num_classes)
    torch.testing.assert_close(own.mean(dim=0), half, atol=1e-5, rtol=0)
    model.load_state_dict(states[1])
    with torch.no_grad():
        torch.testing.assert_close(own[1], (onehot + model(x).softmax(dim=-1)) / 2, atol=1e-5, rtol=0)


def test_each_simplex_of_each_cycle_takes_its_own_teachers_targets() -> None:
    targets = torch.arange(3 * 10 * 2, dtype=torch.float).view(3, 10, 2)  # 3 teachers, 10 examples, 2 classes
    rows = np.array([7, 2, 5, 0, 9])
    assert torch.equal(batch_targets(targets[0], rows, 2, 4), targets[0, rows])  # one target set: the rows
    # the batch splits as x.tensor_split(2) does: rows 7, 2, 5 to simplex 0, rows 0, 9 to simplex 1
    assert torch.equal(batch_targets(targets, rows, 2, 0), torch.cat([targets[0, [7, 2, 5]], targets[1, [0, 9]]]))
    # cycle 1: teachers 2 and 0 (in turn, wrapping round the 3)
    assert torch.equal(batch_targets(targets, rows, 2, 1), torch.cat([targets[2, [7, 2, 5]], targets[0, [0, 9]]]))


def test_a_checkpoint_of_another_auto_lr_is_refused(chain: dict[str, Path], tmp_path: Path) -> None:
    from wgen.checkpoints import open_zoo
    from wgen.flow.train import TrainConfig, train_generator

    zoo = open_zoo(chain["canon"])
    config = TrainConfig(space="codes", space_args=QUICK_CODES, holdout=0.2)
    assert train_generator(zoo, tmp_path / "gen", config, torch.device("cpu"), stop_after=2) is None
    state = tmp_path / "gen" / "checkpoint" / "state.json"
    info = json.loads(state.read_text())
    assert info["lr"] == 1e-2  # test_resnet has BatchNorm: the auto lr, as resolved in training
    state.write_text(json.dumps({**info, "lr": 1e-3}))  # as if a wgen with another auto lr had written it
    before = state.read_bytes()
    with pytest.raises(WgenError, match="a checkpoint trained with lr 0.001, and this run trains with 0.01"):
        train_generator(zoo, tmp_path / "gen", config, torch.device("cpu"))
    assert state.read_bytes() == before  # the checkpoint is kept


@pytest.mark.parametrize("args, message", [
    ('{"code_dim": 0}', "--code-dim 0 must be >= 1"),
    ('{"hidden": 0}', "--hidden 0 must be >= 1"),
    ('{"diversity": -0.5}', "--diversity -0.5 must be >= 0"),
    ('{"distill": 1.5}', "--distill 1.5 must be in [0, 1]"),
    ('{"ensemble": 1.5}', "--ensemble 1.5 must be in [0, 1]"),
    ('{"corners": 1}', "--corners 1 spans no simplex"),
    ('{"snapshots": 0}', "--snapshots 0 must be >= 1"),
    ('{"restart_epochs": 0}', "--restart-epochs 0 must be > 0"),
    ('{"mixing": "layer"}', "--mixing 'layer' is not one of network, group, unit"),
    ('{"snapshots": 4, "restart": "hot"}', "--restart 'hot' is not one of warm, cold"),
    ('{"snapshots": 2, "restart": "cold", "restart_epochs": 5}', "--restart-epochs 5 is unused with --restart cold"),
    ('{"distill": 0.25, "teachers": "all"}', "--teachers 'all' is not one of mean, member"),
    ('{"teachers": "member"}', "--teachers member has nothing to teach with --distill 0"),
    ('{"corners": 4, "simplices": 3}', "--simplices 3 leaves fewer than 2 of the 4 corners a simplex"),
    ('{"members": 3}', "the codes weight space has no setting 'members'"),
])
def test_bad_codes_options(chain: dict[str, Path], tmp_path: Path, run_cli, args: str, message: str) -> None:
    result = run_cli("train", chain["canon"], "-o", tmp_path / "gen", "--space", "codes", "--space-args", args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "gen" / "config.json").exists()

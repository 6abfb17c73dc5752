"""Permutation groups by tracing, weight matching, and `wgen canonicalize`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from wgen.checkpoints import ModelSpec, open_zoo
from wgen.errors import WgenError
from wgen.permute.groups import derive_groups
from wgen.permute.match import align_to_target, apply_alignment, identity_alignment, random_alignment

from conftest import make_state, make_zoo, snapshot, write_test_member

SMALL = [
    ModelSpec("test_resnet", 10, {}),
    ModelSpec("test_vit", 10, {"img_size": 32, "patch_size": 8}),
    ModelSpec("test_vit", 10, {"img_size": 32, "patch_size": 8, "qk_norm": True}),
    ModelSpec("test_convnext", 10, {}),
    ModelSpec("test_efficientnet", 10, {}),
    ModelSpec("test_efficientnet_gn", 10, {}),  # GroupNorm: permutations stay inside each group
]
SIZE = (3, 32, 32)


def _outputs(spec: ModelSpec, state: dict, x: torch.Tensor) -> torch.Tensor:
    model = spec.create().eval()
    model.load_state_dict(state)
    with torch.no_grad():
        return model(x)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())


@pytest.mark.parametrize("spec", SMALL, ids=lambda s: f"{s.architecture}{'-qknorm' if s.model_args.get('qk_norm') else ''}")
def test_random_element_of_every_group_preserves_the_function(spec: ModelSpec) -> None:
    state = make_state(spec)
    perm_spec = derive_groups(spec.create(), SIZE)
    assert perm_spec.groups
    x = torch.randn(4, *SIZE)
    expected = _outputs(spec, state, x)
    generator = torch.Generator().manual_seed(0)
    full = random_alignment(perm_spec, state, generator)
    for group in perm_spec.groups:  # each group alone
        one = identity_alignment(perm_spec, state)
        for ref in group.axes:
            one[ref] = full[ref]
        assert _close(expected, _outputs(spec, apply_alignment(state, one), x)), group.name
    for head in perm_spec.heads:  # each attention module alone
        one = identity_alignment(perm_spec, state)
        for key, axis, _ in head.axes:
            one[(key, axis)] = full[(key, axis)]
        assert _close(expected, _outputs(spec, apply_alignment(state, one), x)), head.name
    assert _close(expected, _outputs(spec, apply_alignment(state, full), x))  # all at once


def test_groups_of_a_resnet_cover_every_hidden_axis() -> None:
    spec = ModelSpec("test_resnet", 10, {})
    perm_spec = derive_groups(spec.create(), SIZE)
    permuted = {ref for g in perm_spec.groups for ref in g.axes}
    state = make_state(spec)
    for key, tensor in state.items():
        if tensor.ndim and not key.startswith("fc.") and key != "conv1.0.weight":
            assert (key, 0) in permuted, key  # every hidden channel is permutable
    assert ("conv1.0.weight", 1) not in permuted  # the input's channels never move
    assert ("fc.weight", 0) not in permuted and ("fc.weight", 1) in permuted  # nor the classes


def test_groupnorm_groups_are_block_constrained() -> None:
    perm_spec = derive_groups(ModelSpec("test_efficientnet_gn", 10, {}).create(), SIZE)
    assert any(g.blocks > 1 for g in perm_spec.groups)


def test_attention_becomes_head_groups() -> None:
    spec = ModelSpec("test_vit", 10, {"img_size": 32, "patch_size": 8})
    model = spec.create()
    perm_spec = derive_groups(model, SIZE)
    blocks = len(model.blocks)
    assert len(perm_spec.heads) == blocks
    head = perm_spec.heads[0]
    assert head.name == "blocks.0.attn" and head.num_heads == model.blocks[0].attn.num_heads
    layouts = {key: layout for key, _, layout in head.axes}
    assert layouts["blocks.0.attn.qkv.weight"] == ("qk", "qk", "v")
    assert layouts["blocks.0.attn.proj.weight"] == ("v",)
    assert not head.shared_qk
    with_norm = derive_groups(ModelSpec("test_vit", 10, {"img_size": 32, "patch_size": 8, "qk_norm": True}).create(), SIZE)
    assert with_norm.heads[0].shared_qk


@pytest.mark.parametrize("spec", [SMALL[0], SMALL[1]], ids=["test_resnet", "test_vit"])
def test_planted_permutation_is_recovered_exactly(spec: ModelSpec) -> None:
    state = make_state(spec, seed=4)
    perm_spec = derive_groups(spec.create(), SIZE)
    planted = apply_alignment(state, random_alignment(perm_spec, state, torch.Generator().manual_seed(7)))
    assert any(not torch.equal(planted[k], state[k]) for k in state)
    params = {k for k, _ in spec.create().named_parameters()}
    result = align_to_target(perm_spec, state, planted, params)
    recovered = apply_alignment(planted, result.alignment)
    assert all(torch.equal(recovered[k], state[k]) for k in state)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.fc(x)
        return x


class _Sorting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sort(self.fc1(x), dim=-1).values)


def test_untraceable_model_is_a_clear_error() -> None:
    with pytest.raises(WgenError) as info:
        derive_groups(_DataDependent(), (4,))
    assert info.value.message.startswith("torch.fx cannot trace _DataDependent")
    assert "--method none" in info.value.hint


def test_op_without_a_rule_names_the_op() -> None:
    with pytest.raises(WgenError) as info:
        derive_groups(_Sorting(), (4,))
    assert info.value.message == "cannot derive permutations through sort() in module '<model>'"
    assert "--method none" in info.value.hint


# --- wgen canonicalize -------------------------------------------------------------------------


def _weights(path: Path) -> dict:
    return safetensors.torch.load_file(str(path / "model.safetensors"))


def test_canonicalize_writes_a_function_identical_closer_zoo(tiny_zoo: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "canon"
    before = snapshot(tiny_zoo)
    result = run_cli("canonicalize", tiny_zoo, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert snapshot(tiny_zoo) == before  # input untouched
    assert report["groups"]["groups"] == 11
    assert report["mean_pairwise_l2_after"] < report["mean_pairwise_l2_before"]
    assert all(m["max_rel_diff"] <= 1e-4 for m in report["members"])
    assert report["members"][0]["l2_to_template_after"] == 0.0
    x = torch.randn(3, 3, 32, 32)
    for name in ("m0", "m1", "m2"):
        source = timm.create_model(f"local-dir:{tiny_zoo / name}", pretrained=True).eval()
        canon = timm.create_model(f"local-dir:{out / name}", pretrained=True).eval()
        with torch.no_grad():
            assert _close(source(x), canon(x))
    assert json.loads(run_cli("info", out, "--json").stdout)["kind"] == "canonical zoo"
    assert json.loads((out / "canonicalize.json").read_text())["template"] == "first"


def test_barycenter_template_and_method_none(tiny_zoo: Path, tmp_path: Path, run_cli) -> None:
    result = run_cli("canonicalize", tiny_zoo, "-o", tmp_path / "bary", "--template", "barycenter", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["template_index"] is None
    assert report["mean_pairwise_l2_after"] < report["mean_pairwise_l2_before"]
    result = run_cli("canonicalize", tiny_zoo, "-o", tmp_path / "none", "--method", "none", "--json")
    assert result.exit_code == 0
    for name in ("m0", "m1", "m2"):
        a, b = _weights(tiny_zoo / name), _weights(tmp_path / "none" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_alignment_lowers_the_interpolation_barrier(chain: dict[str, Path]) -> None:
    barrier = json.loads((chain["canon"] / "canonicalize.json").read_text())["barrier"]
    assert len(barrier["pairs"]) == 2
    for label in ("before", "after"):
        curve = barrier[label]["curves"][0]
        assert len(curve["loss"]) == 11 and len(curve["accuracy"]) == 11
    # the end points are the members themselves, identical before and after alignment
    assert barrier["before"]["curves"][0]["accuracy"][0] == pytest.approx(barrier["after"]["curves"][0]["accuracy"][0])
    assert barrier["after"]["mean_loss_barrier"] < 0.9 * barrier["before"]["mean_loss_barrier"]
    assert barrier["after"]["mean_accuracy_drop"] < barrier["before"]["mean_accuracy_drop"]


def test_verification_failure_writes_nothing(tiny_zoo: Path, tmp_path: Path, run_cli, monkeypatch) -> None:
    import wgen.permute.canonicalize as canon

    real = canon.apply_alignment

    def broken(state, alignment):
        out = real(state, alignment)
        out["fc.bias"] = out["fc.bias"] + 1.0  # a bug that changes the function
        return out

    monkeypatch.setattr(canon, "apply_alignment", broken)
    result = run_cli("canonicalize", tiny_zoo, "-o", tmp_path / "canon")
    assert result.exit_code == 2
    assert "m0: the permuted member computes a different function" in " ".join(result.stderr.split())
    assert not (tmp_path / "canon").exists()
    assert not list(tmp_path.glob(".canon*"))


@pytest.mark.parametrize("args, message", [
    (("--template", "9"), "--template '9' is not first, barycenter or a member index below 3"),
    (("--method", "magic"), "unknown --method 'magic'"),
    (("--restarts", "0"), "--restarts 0 must be >= 1"),
])
def test_bad_canonicalize_options(tiny_zoo: Path, tmp_path: Path, run_cli, args, message) -> None:
    result = run_cli("canonicalize", tiny_zoo, "-o", tmp_path / "canon", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert not (tmp_path / "canon").exists()


def test_existing_output_is_refused_and_force_replaces_only_wgen_outputs(tiny_zoo: Path, tmp_path: Path,
                                                                         run_cli) -> None:
    out = tmp_path / "canon"
    write_test_member(out / "keep")
    before = snapshot(out)
    result = run_cli("canonicalize", tiny_zoo, "-o", out)
    assert result.exit_code == 2 and f"{out}: exists" in " ".join(result.stderr.split())
    result = run_cli("canonicalize", tiny_zoo, "-o", out, "--force")
    assert result.exit_code == 2 and "was not written by wgen" in result.stderr
    assert snapshot(out) == before
    mine = tmp_path / "mine"
    assert run_cli("canonicalize", tiny_zoo, "-o", mine).exit_code == 0
    finished = snapshot(mine)
    assert run_cli("canonicalize", tiny_zoo, "-o", mine).exit_code == 0 and snapshot(mine) == finished  # done: kept
    result = run_cli("canonicalize", tiny_zoo, "-o", mine, "--restarts", "2")
    assert result.exit_code == 2 and "made with other settings" in result.stderr
    assert run_cli("canonicalize", tiny_zoo, "-o", mine, "--restarts", "2", "--force").exit_code == 0
    assert json.loads((mine / "canonicalize.json").read_text())["restarts"] == 2
    inside = run_cli("canonicalize", tiny_zoo, "-o", tiny_zoo / "canon")
    assert inside.exit_code == 2 and "may not be, contain or lie inside the input" in " ".join(inside.stderr.split())


def test_flat_files_canonicalize_with_arch(tmp_path: Path, run_cli) -> None:
    for i in range(2):
        torch.save({"state_dict": make_state(seed=i)}, tmp_path / f"ckpt{i}.pt")
    result = run_cli("canonicalize", tmp_path, "--arch", "test_resnet", "-o", tmp_path.parent / "canon-flat", "--json")
    assert result.exit_code == 0, result.output
    zoo = open_zoo(tmp_path.parent / "canon-flat")
    assert [m.name for m in zoo.members] == ["ckpt0", "ckpt1"]


@pytest.mark.slow
def test_member_processes_give_the_same_alignment(tmp_path: Path, monkeypatch) -> None:
    import wgen.permute.canonicalize as canon

    zoo = open_zoo(make_zoo(tmp_path / "zoo", 5))
    serial = canon.canonicalize(zoo, tmp_path / "serial", canon.CanonOptions(), torch.device("cpu"))
    monkeypatch.setattr(canon, "PARALLEL_MIN_WORK", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two workers, one thread each
    try:
        parallel = canon.canonicalize(zoo, tmp_path / "parallel", canon.CanonOptions(), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert parallel["mean_pairwise_l2_after"] == serial["mean_pairwise_l2_after"]
    for i in range(5):
        a, b = _weights(tmp_path / "serial" / f"m{i}"), _weights(tmp_path / "parallel" / f"m{i}")
        assert all(torch.equal(a[k], b[k]) for k in a)

"""Checkpoint I/O: every input form, validation errors, atomic timm-loadable members, fingerprints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from wgen.checkpoints import (ModelSpec, open_zoo, state_dict_fingerprint,
                              write_member, member_config, zoo_fingerprint)
from wgen.errors import WgenError
from wgen.readers import read_checkpoint

from conftest import INPUT_SIZE, TINY, make_state, snapshot, write_test_member


def test_written_member_loads_in_timm_with_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TINY.create().eval()
    state = make_state(TINY, seed=3)
    model.load_state_dict(state)
    config = member_config(TINY, INPUT_SIZE, (0.5,) * 3, (0.5,) * 3, {"seed": 3})
    path = tmp_path / "member"
    hashes = write_member(path, state, config)
    assert hashes["model.safetensors"] == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()

    loaded = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    x = torch.randn(4, *INPUT_SIZE)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6, rtol=0)
    assert tuple(loaded.pretrained_cfg["input_size"]) == INPUT_SIZE
    assert json.loads((path / "config.json").read_text())["wgen"]["seed"] == 3


def test_member_with_model_args_round_trips_through_timm(tmp_path: Path) -> None:
    spec = ModelSpec("test_vit", 10, {"img_size": 32, "patch_size": 8, "in_chans": 1})
    state = make_state(spec)
    path = tmp_path / "vit"
    write_member(path, state, member_config(spec, (1, 32, 32), (0.5,), (0.5,)))
    loaded = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    reference = spec.create().eval()
    reference.load_state_dict(state)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), reference(x), atol=1e-6, rtol=0)


def test_write_member_is_atomic_and_leaves_no_temporary_folder(tmp_path: Path, monkeypatch) -> None:
    def broken_save(*args, **kwargs):
        raise KeyboardInterrupt  # a run killed while writing

    monkeypatch.setattr(safetensors.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        write_test_member(tmp_path / "member")
    assert list(tmp_path.iterdir()) == []


def test_open_zoo_reads_local_dir_members(tiny_zoo: Path) -> None:
    zoo = open_zoo(tiny_zoo)
    assert zoo.spec == TINY
    assert [m.name for m in zoo.members] == ["m0", "m1", "m2"]
    assert torch.equal(zoo.load(zoo.members[1])["fc.weight"], make_state(seed=1)["fc.weight"])


def test_open_zoo_reads_pytorch_model_bin_members(tmp_path: Path) -> None:
    folder = write_test_member(tmp_path / "zoo" / "a")
    state = safetensors.torch.load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    zoo = open_zoo(tmp_path / "zoo")
    assert torch.equal(zoo.load(zoo.members[0])["fc.weight"], state["fc.weight"])


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "model_state"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_flat_torch_files_are_unwrapped_and_unprefixed(tmp_path: Path, wrapper: str | None, suffix: str) -> None:
    state = make_state(seed=5)
    ddp = {f"module.{k}": v for k, v in state.items()}
    payload = ddp if wrapper is None else {wrapper: ddp, "epoch": 3}
    torch.save(payload, tmp_path / f"ckpt{suffix}")
    loaded = read_checkpoint(tmp_path / f"ckpt{suffix}").tensors
    assert set(loaded) == set(state)
    assert torch.equal(loaded["fc.weight"], state["fc.weight"])


def test_flat_files_take_arch_and_infer_classes(tmp_path: Path) -> None:
    spec = ModelSpec("test_resnet", 7, {"in_chans": 1})
    for i in range(2):
        safetensors.torch.save_file(make_state(spec, i), str(tmp_path / f"seed{i}.safetensors"))
    torch.save(make_state(spec, 9), tmp_path / "seed10.pt")
    zoo = open_zoo(tmp_path, arch="test_resnet")
    assert zoo.spec == spec
    assert [m.name for m in zoo.members] == ["seed0", "seed1", "seed10"]


def test_flat_files_take_a_folder_level_config(tmp_path: Path) -> None:
    spec = ModelSpec("test_resnet", 4, {})
    safetensors.torch.save_file(make_state(spec), str(tmp_path / "a.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "test_resnet", "num_classes": 4}))
    assert open_zoo(tmp_path).spec == spec


def test_fingerprint_is_stable_and_format_independent(tmp_path: Path, tiny_zoo: Path) -> None:
    state = make_state(seed=1)
    torch.save(state, tmp_path / "m.pt")
    assert state_dict_fingerprint(read_checkpoint(tmp_path / "m.pt").tensors) == state_dict_fingerprint(state)
    first = zoo_fingerprint(open_zoo(tiny_zoo))
    assert first == zoo_fingerprint(open_zoo(tiny_zoo))
    write_test_member(tiny_zoo / "m3", seed=3)
    assert zoo_fingerprint(open_zoo(tiny_zoo)) != first


def test_num_batches_tracked_may_be_missing(tmp_path: Path) -> None:
    state = {k: v for k, v in make_state().items() if not k.endswith("num_batches_tracked")}
    safetensors.torch.save_file(state, str(tmp_path / "a.safetensors"))
    zoo = open_zoo(tmp_path, arch="test_resnet")
    assert zoo.load(zoo.members[0])["bn1.num_batches_tracked"].item() == 0


# --- bad inputs: exit 2, the exact message, nothing written or changed ----------------------


def _corrupt(kind: str, root: Path) -> str:
    """Make member m1 of ``root`` bad in one way; return the message expected from wgen."""
    weights = root / "m1" / "model.safetensors"
    state = make_state(seed=1)
    if kind == "missing":
        del state["fc.bias"]
        safetensors.torch.save_file(state, str(weights))
        return f"{weights}: missing key 'fc.bias'"
    if kind == "unexpected":
        state["extra.weight"] = torch.zeros(2)
        safetensors.torch.save_file(state, str(weights))
        return f"{weights}: unexpected key 'extra.weight'"
    if kind == "shape":
        state["fc.weight"] = torch.zeros(5, state["fc.weight"].shape[1])
        safetensors.torch.save_file(state, str(weights))
        return f"{weights}: 'fc.weight' has shape (5, {state['fc.weight'].shape[1]}), expected (10, {state['fc.weight'].shape[1]})"
    if kind == "nonfinite":
        state["conv1.0.weight"][0, 0, 0, 0] = float("nan")
        safetensors.torch.save_file(state, str(weights))
        return f"{weights}: 'conv1.0.weight' holds non-finite values (nan or inf)"
    if kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        return f"{weights}: unreadable safetensors file"
    if kind == "mixed":
        config = json.loads((root / "m1" / "config.json").read_text())
        config["architecture"] = "test_vit"
        (root / "m1" / "config.json").write_text(json.dumps(config))
        return "m1: architecture 'test_vit' differs from 'test_resnet' of m0"
    raise AssertionError(kind)


BAD_KINDS = ["missing", "unexpected", "shape", "nonfinite", "truncated", "mixed"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_member_is_a_clear_error_and_changes_nothing(tiny_zoo: Path, run_cli, kind: str) -> None:
    expected = _corrupt(kind, tiny_zoo)
    before = snapshot(tiny_zoo)
    result = run_cli("info", tiny_zoo)
    assert result.exit_code == 2
    assert expected in " ".join(result.stderr.split())
    assert result.stderr.lstrip().startswith("error:")
    assert "Traceback" not in result.output
    assert snapshot(tiny_zoo) == before


@pytest.mark.parametrize("kind", [k for k in BAD_KINDS if k != "mixed"])
def test_skip_bad_drops_the_bad_member_with_a_warning(tiny_zoo: Path, run_cli, kind: str) -> None:
    expected = _corrupt(kind, tiny_zoo)
    before = snapshot(tiny_zoo)
    result = run_cli("info", tiny_zoo, "--skip-bad", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["members"] == 2
    assert expected in report["skipped"][0]
    assert "skipped:" in result.stderr
    assert snapshot(tiny_zoo) == before


def test_pickle_refused_by_weights_only(tmp_path: Path, run_cli) -> None:
    torch.save({"state_dict": make_state(), "optimizer": torch.optim.SGD}, tmp_path / "evil.pt")
    before = snapshot(tmp_path)
    result = run_cli("info", tmp_path, "--arch", "test_resnet")
    assert result.exit_code == 2
    assert f"{tmp_path / 'evil.pt'}: refused by torch.load(weights_only=True)" in " ".join(result.stderr.split())
    assert snapshot(tmp_path) == before


def test_missing_path_and_empty_folder(tmp_path: Path, run_cli) -> None:
    result = run_cli("info", tmp_path / "nope")
    assert result.exit_code == 2
    assert f"{tmp_path / 'nope'}: no such file or folder" in " ".join(result.stderr.split())
    (tmp_path / "empty").mkdir()
    result = run_cli("info", tmp_path / "empty")
    assert result.exit_code == 2
    assert f"{tmp_path / 'empty'}: no checkpoints found" in " ".join(result.stderr.split())
    assert list((tmp_path / "empty").iterdir()) == []


def test_flat_files_without_arch_ask_for_it(tmp_path: Path, run_cli) -> None:
    safetensors.torch.save_file(make_state(), str(tmp_path / "a.safetensors"))
    result = run_cli("info", tmp_path)
    assert result.exit_code == 2
    assert "the checkpoints carry no architecture" in result.stderr
    assert "--arch" in result.stderr


def test_unknown_architecture(tmp_path: Path, run_cli) -> None:
    safetensors.torch.save_file(make_state(), str(tmp_path / "a.safetensors"))
    result = run_cli("info", tmp_path, "--arch", "no_such_net")
    assert result.exit_code == 2
    assert "unknown timm architecture 'no_such_net'" in result.stderr


def test_bad_model_args_json(tmp_path: Path, run_cli) -> None:
    result = run_cli("info", tmp_path, "--arch", "test_resnet", "--model-args", "{in_chans: 1}")
    assert result.exit_code == 2
    assert "--model-args is not valid JSON" in result.stderr


def test_open_zoo_errors_are_wgen_errors(tmp_path: Path) -> None:
    with pytest.raises(WgenError, match="no such file or folder"):
        open_zoo(tmp_path / "missing")


def test_info_describes_a_single_member(tmp_path: Path, run_cli) -> None:
    path = write_test_member(tmp_path / "one")
    result = run_cli("info", path, "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["kind"] == "member"
    assert report["architecture"] == "test_resnet"
    assert report["members"] == 1
    assert report["parameters"] == sum(p.numel() for p in TINY.create().parameters())
    assert report["input_size"] == list(INPUT_SIZE)


def test_written_members_are_ordinary_files_and_folders(tmp_path: Path) -> None:
    import os
    import stat

    mask = os.umask(0o022)
    try:
        path = write_test_member(tmp_path / "m")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert stat.S_IMODE((path / "config.json").stat().st_mode) == 0o644


def test_two_checkpoints_with_one_name_are_refused(tmp_path: Path, run_cli) -> None:
    state = make_state()
    torch.save(state, tmp_path / "a.pt")
    safetensors.torch.save_file(state, str(tmp_path / "a.safetensors"))
    result = run_cli("info", tmp_path, "--arch", "test_resnet")
    assert result.exit_code == 2
    assert f"{tmp_path}: two checkpoints are both named 'a' (a.pt, a.safetensors)" in " ".join(result.stderr.split())


def test_model_args_contradicting_member_configs_are_refused(tiny_zoo: Path, run_cli) -> None:
    result = run_cli("info", tiny_zoo, "--model-args", '{"in_chans": 1}')
    assert result.exit_code == 2
    assert '--model-args {"in_chans": 1} contradicts {} in m0/config.json' in " ".join(result.stderr.split())

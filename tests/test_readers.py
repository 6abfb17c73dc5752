"""Checkpoints as users have them: timm training runs, Lightning, the Hugging Face cache, and what is refused."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from timm.utils import CheckpointSaver, ModelEmaV3

from wgen.checkpoints import open_zoo
from wgen.errors import WgenError
from wgen.readers import read_checkpoint

from conftest import TINY, make_state, snapshot, write_test_member


def timm_run(folder: Path, seed: int, epochs: int = 2) -> dict[str, dict[str, torch.Tensor]]:
    """Write what timm's train script writes for one run (CheckpointSaver, EMA on); return its last states."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=10)
    ema = ModelEmaV3(model, decay=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(model="test_resnet", lr=0.1, epochs=epochs, model_kwargs={})
    folder.mkdir(parents=True)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(folder),
                            recovery_dir=str(folder), max_history=2)
    for epoch in range(epochs):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        ema.update(model)
        saver.save_checkpoint(epoch, metric=float(epoch == 0))  # the first epoch is the best
    return {"raw": {k: v.clone() for k, v in model.state_dict().items()},
            "ema": {k: v.clone() for k, v in ema.module.state_dict().items()}}


def test_a_folder_of_timm_runs_is_a_zoo_without_renaming(tmp_path: Path, run_cli) -> None:
    runs = {f"run{i}": timm_run(tmp_path / "runs" / f"run{i}", seed=i) for i in range(3)}
    assert {p.name for p in (tmp_path / "runs" / "run0").iterdir()} >= {"last.pth.tar", "model_best.pth.tar",
                                                                       "checkpoint-0.pth.tar"}
    before = snapshot(tmp_path / "runs")
    zoo = open_zoo(tmp_path / "runs")  # no --arch: the checkpoints name it
    assert zoo.spec.architecture == "test_resnet" and zoo.spec.num_classes == 10
    assert [m.name for m in zoo.members] == ["run0", "run1", "run2"]
    assert zoo.sources == {name: "state_dict_ema" for name in runs}  # EMA when present, as timm loads them
    state = zoo.load(zoo.members[1])
    assert all(torch.equal(state[k].float(), runs["run1"]["ema"][k].float()) for k in state if "num_batches" not in k)
    raw = open_zoo(tmp_path / "runs", weights="raw")
    assert torch.equal(raw.load(raw.members[1])["fc.weight"], runs["run1"]["raw"]["fc.weight"])
    best = open_zoo(tmp_path / "runs", pick="best")
    assert best.members[0].weights.name == "model_best.pth.tar"
    assert not torch.equal(best.load(best.members[0])["fc.weight"], state["fc.weight"])

    info = json.loads(run_cli("info", tmp_path / "runs", "--json").stdout)
    assert info["weights"] == {"state_dict_ema": 3}
    assert "EMA (state_dict_ema) in 3" in " ".join(run_cli("info", tmp_path / "runs").stdout.split())
    out = tmp_path / "out"
    assert run_cli("canonicalize", tmp_path / "runs", "-o", out / "canon", "--weights", "raw").exit_code == 0
    assert run_cli("train", out / "canon", "-o", out / "gen", "--steps", "20", "--width", "16", "--depth", "1",
                   "--batch-size", "8").exit_code == 0
    result = run_cli("sample", out / "gen", "-n", "2", "-o", out / "samples", "--min-radius", "0")
    assert result.exit_code == 0, result.output
    assert timm.create_model(f"local-dir:{out / 'samples' / 'sample-001'}", pretrained=True).num_classes == 10
    assert snapshot(tmp_path / "runs") == before


def test_a_flat_timm_checkpoint_and_asking_for_weights_it_lacks(tmp_path: Path) -> None:
    timm_run(tmp_path / "run", seed=0)
    checkpoint = read_checkpoint(tmp_path / "run" / "last.pth.tar", "raw")
    assert checkpoint.weights == "state_dict" and checkpoint.arch == "test_resnet"
    torch.save(make_state(), tmp_path / "plain.pth")
    with pytest.raises(WgenError) as info:
        read_checkpoint(tmp_path / "plain.pth", "ema")
    assert info.value.message == f"{tmp_path / 'plain.pth'}: has no EMA weights"
    torch.save({"state_dict": make_state()}, tmp_path / "wrapped.pth")
    with pytest.raises(WgenError, match="has no EMA weights"):
        read_checkpoint(tmp_path / "wrapped.pth", "ema")
    with pytest.raises(WgenError) as info:
        open_zoo(tmp_path / "run", pick="best", weights="sideways")
    assert info.value.message == "unknown --weights 'sideways'"


def test_a_run_without_the_file_asked_for(tmp_path: Path) -> None:
    timm_run(tmp_path / "runs" / "a", seed=0)
    (tmp_path / "runs" / "a" / "model_best.pth.tar").unlink()
    with pytest.raises(WgenError) as info:
        open_zoo(tmp_path / "runs", pick="best")
    assert info.value.message == f"{tmp_path / 'runs' / 'a'}: a timm training run without model_best.pth.tar"


def _lightning_checkpoint(path: Path, state: dict[str, torch.Tensor], attribute_dict: type | None = None) -> None:
    """Write a checkpoint with the structure PyTorch Lightning saves (the module's attribute name prefixed)."""
    hparams = argparse.Namespace(lr=0.01, arch="test_resnet") if attribute_dict is None else attribute_dict(lr=0.01)
    torch.save({"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                "state_dict": {f"model.{k}": v for k, v in state.items()},
                "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 4}}}},
                "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.3),
                                                                         "best_model_path": "/x/epoch=3.ckpt"}},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]}],
                "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": hparams}, path)


def test_lightning_checkpoints_lose_their_module_prefix(tmp_path: Path, monkeypatch) -> None:
    states = [make_state(seed=i) for i in range(2)]
    _lightning_checkpoint(tmp_path / "a.ckpt", states[0])
    # Lightning 2 keeps hyper-parameters in an AttributeDict (a dict subclass): read as a plain dict
    module = types.ModuleType("lightning.fabric.utilities.data")
    AttributeDict = type("AttributeDict", (dict,), {"__module__": module.__name__})
    module.AttributeDict = AttributeDict
    for name in ("lightning", "lightning.fabric", "lightning.fabric.utilities"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    _lightning_checkpoint(tmp_path / "b.ckpt", states[1], AttributeDict)
    monkeypatch.delitem(sys.modules, module.__name__)  # reading must not need Lightning
    zoo = open_zoo(tmp_path, arch="test_resnet")
    assert [m.name for m in zoo.members] == ["a", "b"]
    for member, state in zip(zoo.members, states):
        assert torch.equal(zoo.load(member)["fc.weight"], state["fc.weight"])


def test_a_hugging_face_cache_folder_is_a_member(tmp_path: Path, run_cli) -> None:
    source = write_test_member(tmp_path / "src", seed=5)
    for name in ("tiny-a", "tiny-b"):
        repo = tmp_path / "hub" / f"models--timm--{name}"
        (repo / "blobs").mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("abc123")
        snapshot_dir = repo / "snapshots" / "abc123"
        snapshot_dir.mkdir(parents=True)
        for i, file in enumerate(("config.json", "model.safetensors")):
            shutil.copy(source / file, repo / "blobs" / f"blob{i}")
            (snapshot_dir / file).symlink_to(Path("../../blobs") / f"blob{i}")
    (tmp_path / "hub" / "models--timm--tiny-b" / "snapshots" / "old999").mkdir()  # an older revision
    zoo = open_zoo(tmp_path / "hub")
    assert [m.name for m in zoo.members] == ["tiny-a", "tiny-b"] and zoo.spec == TINY
    single = open_zoo(tmp_path / "hub" / "models--timm--tiny-a")
    assert single.members[0].weights == tmp_path / "hub" / "models--timm--tiny-a" / "snapshots" / "abc123" / "model.safetensors"
    expected = safetensors.torch.load_file(str(source / "model.safetensors"))
    assert torch.equal(single.load(single.members[0])["fc.weight"], expected["fc.weight"])
    assert json.loads(run_cli("info", tmp_path / "hub", "--json").stdout)["members"] == 2


def test_a_pickled_class_beyond_plain_data_is_refused_by_name(tmp_path: Path, run_cli) -> None:
    torch.save({"state_dict": make_state(), "scheduler": torch.optim.lr_scheduler.StepLR}, tmp_path / "m.pth.tar")
    result = run_cli("info", tmp_path / "m.pth.tar", "--arch", "test_resnet")
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert "refused by torch.load(weights_only=True)" in message and "StepLR" in message


def test_an_unreadable_member_is_named_as_such(tiny_zoo: Path, run_cli, monkeypatch) -> None:
    import errno

    real = safetensors.torch.load_file

    def denied(path, *args, **kwargs):
        if "m1" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", denied)
    result = run_cli("info", tiny_zoo)
    assert result.exit_code == 2
    assert f"{tiny_zoo / 'm1' / 'model.safetensors'}: permission denied" in " ".join(result.stderr.split())
    result = run_cli("info", tiny_zoo, "--skip-bad", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["members"] == 2
    assert "permission denied" in result.stderr

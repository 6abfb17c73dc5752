"""`wgen zoo`: training, records, resume, shards, fine-tuning, and refusal of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from wgen.checkpoints import open_zoo
from wgen.data import SplitSpec, load_data
from wgen.metrics import accuracy
from wgen.zoo import NORMALIZED_DECAY, Recipe, feeds_batchnorm, plan_zoo, train_zoo

from conftest import snapshot, write_test_member

FAST = ("-a", "test_resnet", "-d", "digits", "--epochs", "1", "--device", "cpu")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path / "model.safetensors"))


def test_zoo_writes_timm_members_and_records(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "zoo"
    result = run_cli("zoo", *FAST, "-n", "2", "-o", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "zoo.json").read_text())
    assert record["architecture"] == "test_resnet" and record["num_classes"] == 10
    assert record["data"] == "digits" and record["input_size"] == [3, 32, 32]
    assert record["split"]["sizes"] == {"train": 1258, "val": 180, "test": 359}
    assert [m["seed"] for m in record["members"]] == [0, 1]
    assert record["recipe"]["epochs"] == 1

    # the recorded test accuracy is what the timm-loaded member scores on the recorded split
    data = load_data(record["data"], tuple(record["input_size"]), SplitSpec.from_json(record["split"]))
    model = timm.create_model(f"local-dir:{out / 'member-001'}", pretrained=True)
    assert accuracy(model, data, "test", torch.device("cpu")) == pytest.approx(record["members"][1]["test_accuracy"])
    assert not torch.equal(weights(out / "member-000")["fc.weight"], weights(out / "member-001")["fc.weight"])
    info = run_cli("info", out, "--json")
    assert json.loads(info.stdout)["kind"] == "zoo"


def test_same_seed_same_member(tmp_path: Path, run_cli) -> None:
    run_cli("zoo", *FAST, "-n", "1", "-o", tmp_path / "a")
    run_cli("zoo", *FAST, "-n", "1", "-o", tmp_path / "b")
    a, b = weights(tmp_path / "a" / "member-000"), weights(tmp_path / "b" / "member-000")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rerun_resumes_and_redoes_a_member_cut_off(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "zoo"
    plan = plan_zoo(Recipe("test_resnet", "digits", epochs=2))

    class KillDuringSecondMember:
        member = ""

        def note(self, text): ...
        def stage(self, name, total, done=0):
            self.member = name
        def advance(self, count=1, status=""):
            if self.member.startswith("member-001"):
                raise KeyboardInterrupt  # the run is killed mid-member

    with pytest.raises(KeyboardInterrupt):
        train_zoo(plan, out, 3, torch.device("cpu"), progress=KillDuringSecondMember())
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["member-000", "zoo.json"]
    finished = snapshot(out / "member-000")

    result = run_cli("zoo", "-a", "test_resnet", "-d", "digits", "--epochs", "2", "-n", "3", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["members"]
    assert [r["resumed"] for r in rows] == [True, False, False]
    assert snapshot(out / "member-000") == finished
    assert [m["name"] for m in json.loads((out / "zoo.json").read_text())["members"]] == [
        "member-000", "member-001", "member-002"]
    assert not list(out.glob(".member-*"))


def test_shards_fill_one_folder_like_a_single_run(tmp_path: Path, run_cli) -> None:
    # shards on one host split the cores by default; bit-identical results need equal thread counts
    for shard in ("1/2", "0/2"):
        assert run_cli("zoo", *FAST, "-n", "3", "-o", tmp_path / "sharded", "--shard", shard,
                       "--threads", "1").exit_code == 0
    run_cli("zoo", *FAST, "-n", "3", "-o", tmp_path / "whole", "--threads", "1")
    sharded = json.loads((tmp_path / "sharded" / "zoo.json").read_text())["members"]
    assert [m["name"] for m in sharded] == ["member-000", "member-001", "member-002"]
    for i in range(3):
        a = weights(tmp_path / "sharded" / f"member-00{i}")
        b = weights(tmp_path / "whole" / f"member-00{i}")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_other_settings_are_refused_unless_forced(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "zoo"
    run_cli("zoo", *FAST, "-n", "1", "-o", out)
    before = snapshot(out)
    result = run_cli("zoo", *FAST, "-n", "1", "-o", out, "--lr", "0.01")
    assert result.exit_code == 2
    assert f"{out}: holds a zoo made with other settings (lr: 0.001 vs 0.01)" in " ".join(result.stderr.split())
    assert snapshot(out) == before
    result = run_cli("zoo", *FAST, "-n", "1", "-o", out, "--lr", "0.01", "--force")
    assert result.exit_code == 0
    assert json.loads((out / "zoo.json").read_text())["recipe"]["lr"] == 0.01


def test_foreign_output_folder_is_refused_even_with_force(tmp_path: Path, run_cli) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    result = run_cli("zoo", *FAST, "-n", "1", "-o", tmp_path)
    assert result.exit_code == 2 and f"{tmp_path}: exists" in " ".join(result.stderr.split())
    result = run_cli("zoo", *FAST, "-n", "1", "-o", tmp_path, "--force")
    assert result.exit_code == 2
    assert f"{tmp_path}: exists and was not written by wgen" in " ".join(result.stderr.split())
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args, message", [
    (("-a", "no_such_net", "-d", "digits"), "unknown timm architecture 'no_such_net'"),
    (("-a", "test_resnet", "-d", "mnist"), "unknown dataset spec 'mnist'"),
    (("-a", "test_resnet", "-d", "npz:/nonexistent/d.npz"), "/nonexistent/d.npz: no such file or folder"),
    (("-a", "test_resnet", "-d", "digits", "--shard", "2/2"), "--shard '2/2' is not I/N with 0 <= I < N"),
    (("-a", "test_resnet", "-d", "digits", "--model-args", "[1]"), "--model-args must be a JSON object"),
    (("-a", "test_resnet", "-d", "digits", "--model-args", '{"num_classes": 3}'),
     "num_classes comes from the dataset, not --model-args"),
    (("-a", "test_resnet", "-d", "digits", "--model-args", '{"bogus": 1}'), "timm cannot build test_resnet"),
    (("-a", "test_resnet", "-d", "digits", "--optimizer", "lion"), "unknown optimizer 'lion'"),
    (("-a", "test_resnet", "-d", "digits", "--normalized-decay", "-1"), "--normalized-decay -1.0 must be >= 0"),
    (("-a", "test_vit", "-d", "digits", "--img-size", "32"), "test_vit takes a fixed input size (160, 160), not --img-size 32"),
    (("-a", "test_resnet", "-d", "digits", "--init", "/nonexistent/ckpt"), "/nonexistent/ckpt: no such file or folder"),
])
def test_bad_zoo_input_writes_nothing(tmp_path: Path, run_cli, args: tuple[str, ...], message: str) -> None:
    out = tmp_path / "out"
    result = run_cli("zoo", *args, "-n", "1", "--epochs", "1", "-o", out)
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split())
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_asked_without_cuda(tmp_path: Path, run_cli) -> None:
    result = run_cli("zoo", *FAST[:-2], "--device", "cuda", "-n", "1", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "--device cuda was asked for but no CUDA device is available" in result.stderr
    assert not (tmp_path / "out").exists()


def test_init_fine_tunes_from_one_checkpoint(tmp_path: Path, run_cli) -> None:
    init = write_test_member(tmp_path / "init", seed=7)
    out = tmp_path / "tuned"
    result = run_cli("zoo", *FAST, "-n", "2", "-o", out, "--init", init, "--lr", "1e-7")
    assert result.exit_code == 0, result.output
    start = weights(init)
    for name in ("member-000", "member-001"):
        tuned = weights(out / name)
        assert torch.allclose(tuned["conv1.0.weight"], start["conv1.0.weight"], atol=1e-4)
    a, b = weights(out / "member-000"), weights(out / "member-001")
    assert not torch.equal(a["conv1.0.weight"], b["conv1.0.weight"])  # other data orders
    recipe = json.loads((out / "zoo.json").read_text())["recipe"]
    assert json.loads((out / "zoo.json").read_text())["init_fingerprint"]
    assert recipe["normalized_decay"] == recipe["weight_decay"] == 0.05  # fine-tuning keeps the init's scale


def test_strong_decay_goes_to_the_weights_batchnorm_normalizes() -> None:
    model = timm.create_model("test_resnet", num_classes=10)
    normalized = {name for name, p in model.named_parameters() if id(p) in feeds_batchnorm(model, (3, 32, 32))}
    convs = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert normalized == convs  # every conv feeds a BatchNorm; the classifier does not
    vit = timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8)
    assert not feeds_batchnorm(vit, (3, 32, 32))
    assert plan_zoo(Recipe("test_resnet", "digits")).recipe.normalized_decay == NORMALIZED_DECAY


def test_init_with_another_class_count_gets_a_fresh_head(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (60, 16, 16), dtype=np.uint8), y=rng.integers(0, 3, 60))
    init = write_test_member(tmp_path / "init")  # 10 classes
    plan = plan_zoo(Recipe("test_resnet", f"npz:{tmp_path / 'd.npz'}", epochs=1, init=str(init)))
    assert plan.spec.num_classes == 3 and "fc.weight" not in plan.init_state
    train_zoo(plan, tmp_path / "out", 1, torch.device("cpu"))
    assert open_zoo(tmp_path / "out").spec.num_classes == 3


@pytest.mark.slow
@pytest.mark.parametrize("arch, model_args, bar", [
    ("test_resnet", None, 0.90),
    ("test_efficientnet", None, 0.90),
    ("test_vit", '{"img_size": 32, "patch_size": 8}', 0.85),
])
def test_default_settings_reach_the_accuracy_bar(tmp_path: Path, run_cli, arch: str, model_args: str | None,
                                                 bar: float) -> None:
    extra = ("--model-args", model_args) if model_args else ()
    result = run_cli("zoo", "-a", arch, "-d", "digits", "-n", "2", "-o", tmp_path / "zoo", "--device", "cpu",
                     *extra, "--json")
    assert result.exit_code == 0, result.output
    for member in json.loads(result.stdout)["members"]:
        assert member["test_accuracy"] >= bar, member

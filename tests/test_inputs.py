"""Bad input of every kind: one red line, exit 2, and every input byte for byte as it was."""

from __future__ import annotations

import errno
import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch

from conftest import make_zoo, snapshot, write_test_member

QUICK_TRAIN = ("--steps", "5", "--width", "8", "--depth", "1", "--batch-size", "4")


def refused(run_cli, inputs: list[Path], *args: object) -> str:
    """Run ``wgen *args``; assert exit 2, a one-line error and untouched ``inputs``; return the error line."""
    before = {str(p): snapshot(p) for p in inputs}
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith(("error: ", "hint: "))]
    assert len(lines) == 2 and lines[0].startswith("error: ") and result.stderr.rstrip().endswith(lines[1]), result.stderr
    assert "Traceback" not in result.output
    assert {str(p): snapshot(p) for p in inputs} == before
    return " ".join(result.stderr.split())


# ------------------------------------------------------------------------------------------------
# an output may not be, contain or lie inside an input; --force replaces only what wgen wrote


def test_canonicalize_into_the_folder_holding_the_zoo_is_refused(tmp_path: Path, run_cli) -> None:
    make_zoo(tmp_path / "p" / "zoo", 2)
    (tmp_path / "p" / "notes.txt").write_text("mine")
    message = refused(run_cli, [tmp_path / "p"], "canonicalize", tmp_path / "p" / "zoo", "-o", tmp_path / "p", "--force")
    assert "may not be, contain or lie inside the input" in message


def test_train_into_its_zoo_or_inside_it_is_refused(random_zoo: Path, run_cli) -> None:
    assert "may not be, contain or lie inside" in refused(run_cli, [random_zoo], "train", random_zoo, "-o", random_zoo,
                                                          "--force", *QUICK_TRAIN)
    refused(run_cli, [random_zoo], "train", random_zoo, "-o", random_zoo / "gen", *QUICK_TRAIN)


def test_sample_into_its_generator_is_refused(tiny_generator: Path, run_cli) -> None:
    assert "may not be, contain or lie inside" in refused(run_cli, [tiny_generator], "sample", tiny_generator, "-o",
                                                          tiny_generator, "--force")
    refused(run_cli, [tiny_generator], "sample", tiny_generator, "-o", tiny_generator / "s")


def test_zoo_into_the_folder_of_its_dataset_or_init_is_refused(tmp_path: Path, run_cli) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "d").mkdir()
    np.savez(tmp_path / "d" / "data.npz", x=rng.integers(0, 255, (40, 8, 8), dtype=np.uint8), y=rng.integers(0, 3, 40))
    refused(run_cli, [tmp_path / "d"], "zoo", "-a", "test_resnet", "-d", f"npz:{tmp_path / 'd' / 'data.npz'}",
            "-o", tmp_path / "d", "--force", "--epochs", "1", "-n", "1")
    init = write_test_member(tmp_path / "runs" / "init")
    refused(run_cli, [tmp_path / "runs"], "zoo", "-a", "test_resnet", "-d", "digits", "--init", init,
            "-o", tmp_path / "runs", "--force", "--epochs", "1", "-n", "1")


def test_eval_files_inside_what_is_evaluated_are_refused(tiny_generator: Path, random_zoo: Path, tmp_path: Path,
                                                         run_cli) -> None:
    samples = tmp_path / "s"
    assert run_cli("sample", tiny_generator, "-n", "2", "-o", samples, "--min-radius", "0").exit_code == 0
    refused(run_cli, [samples, random_zoo], "eval", samples, "--zoo", random_zoo, "-d", "digits", "--no-baselines",
            "--out", samples / "report.json")


@pytest.mark.parametrize("command", ["zoo", "canonicalize", "train", "sample"])
def test_force_never_replaces_a_folder_wgen_did_not_write(command: str, random_zoo: Path, tiny_generator: Path,
                                                          tmp_path: Path, run_cli) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    args = {"zoo": ("zoo", "-a", "test_resnet", "-d", "digits", "-n", "1", "--epochs", "1"),
            "canonicalize": ("canonicalize", random_zoo), "train": ("train", random_zoo, *QUICK_TRAIN),
            "sample": ("sample", tiny_generator, "-n", "1")}[command]
    message = refused(run_cli, [mine], *args, "-o", mine, "--force")
    assert f"{mine}: exists and was not written by wgen" in message


# ------------------------------------------------------------------------------------------------
# every bad value is a one-line error before anything is written


@pytest.mark.parametrize("args, message", [
    (("--label-smoothing", "2"), "--label-smoothing 2.0 must be in [0, 1)"),
    (("--lr", "nan"), "--lr nan must be > 0"),
    (("--img-size", "0"), "--img-size 0 must be in [8, 4096]"),
    (("--split-seed", "-1"), "--split-seed -1 must be in [0, 4294967295]"),
    (("--warmup-epochs", "-2"), "--warmup-epochs -2.0 must be >= 0"),
    (("--epochs", "0"), "--epochs 0 must be >= 1"),
    (("--threads", "0"), "--threads 0 must be >= 1"),
    (("--init", "{init}"), "--init"),  # an --init error does not suggest --skip-bad (zoo has none)
])
def test_bad_zoo_values(args: tuple[str, ...], message: str, tmp_path: Path, run_cli) -> None:
    bad = write_test_member(tmp_path / "bad")
    data = safetensors.torch.load_file(str(bad / "model.safetensors"))
    data["fc.weight"][0, 0] = float("nan")
    safetensors.torch.save_file(data, str(bad / "model.safetensors"))
    args = tuple(str(bad) if a == "{init}" else a for a in args)
    out = tmp_path / "zoo"
    text = refused(run_cli, [bad], "zoo", "-a", "test_resnet", "-d", "digits", "-n", "1", "--epochs", "1", *args, "-o", out)
    assert message in text and "--skip-bad" not in text
    assert not out.exists()  # nothing left behind that would refuse the corrected command


@pytest.mark.parametrize("args, message", [
    (("--lr", "nan"), "--lr nan must be > 0"),
    (("--weight-decay", "-1"), "--weight-decay -1.0 must be >= 0"),
    (("--width", "0"), "--width 0 must be >= 4"),
    (("--depth", "-1"), "--depth -1 must be >= 1"),
    (("--grad-clip", "-1"), "--grad-clip -1.0 must be > 0"),
    (("--seed", "-3"), "--seed -3 must be in [0, 4294967295]"),
])
def test_bad_train_values(args: tuple[str, ...], message: str, random_zoo: Path, tmp_path: Path, run_cli) -> None:
    assert message in refused(run_cli, [random_zoo], "train", random_zoo, "-o", tmp_path / "gen", *args)
    assert not (tmp_path / "gen").exists()


def test_a_seed_too_large_for_the_noise_generator(tiny_generator: Path, tmp_path: Path, run_cli) -> None:
    message = refused(run_cli, [tiny_generator], "sample", tiny_generator, "-o", tmp_path / "s", "--seed", "99999999999999")
    assert "--seed 99999999999999 must be in [0, 4294967295]" in message
    assert not (tmp_path / "s").exists()


def test_skip_bad_with_every_member_bad_says_why(tmp_path: Path, run_cli) -> None:
    for i in range(2):
        (tmp_path / "zoo").mkdir(exist_ok=True)
        (tmp_path / "zoo" / f"m{i}.pt").write_bytes(b"not a checkpoint")
    message = refused(run_cli, [tmp_path / "zoo"], "info", tmp_path / "zoo", "--arch", "test_resnet", "--skip-bad")
    assert f"{tmp_path / 'zoo'}: no usable checkpoints (2 bad; the first: {tmp_path / 'zoo' / 'm0.pt'}: " in message


def test_a_config_without_read_permission(tiny_zoo: Path, run_cli, monkeypatch) -> None:
    real = Path.read_text

    def denied(self, *args, **kwargs):
        if self.name == "config.json" and self.parent.name == "m2":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    assert f"{tiny_zoo / 'm2' / 'config.json'}: permission denied" in refused(run_cli, [tiny_zoo], "info", tiny_zoo)


def test_a_folder_without_read_permission(tiny_zoo: Path, run_cli, monkeypatch) -> None:
    real = Path.iterdir

    def denied(self):
        if self == tiny_zoo:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", denied)
    assert f"{tiny_zoo}: permission denied" in refused(run_cli, [], "info", tiny_zoo)


@pytest.mark.parametrize("command", ["zoo", "canonicalize", "train"])
def test_a_full_disk_is_a_clear_error(command: str, random_zoo: Path, tmp_path: Path, run_cli, monkeypatch) -> None:
    import wgen.outputs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if command == "train":
        monkeypatch.setattr(safetensors.torch, "save_file", full)
        args = ("train", random_zoo, *QUICK_TRAIN, "--checkpoint-every", "2")
    else:
        monkeypatch.setattr(wgen.outputs, "open", full, raising=False)  # every member file
        args = ("zoo", "-a", "test_resnet", "-d", "digits", "-n", "1", "--epochs", "1") if command == "zoo" \
            else ("canonicalize", random_zoo)
    message = refused(run_cli, [random_zoo], *args, "-o", tmp_path / "out")
    assert "no space left on the device" in message and "re-run the same command" in message
    assert not list((tmp_path / "out").glob(".*.tmp-*")) if (tmp_path / "out").exists() else True


# ------------------------------------------------------------------------------------------------
# outputs anyone on the machine can read, and help that says what options take


def test_outputs_are_ordinary_files_and_folders(chain: dict[str, Path]) -> None:
    for root in chain.values():
        for path in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_help_shows_flags_as_flags_and_names_arguments_alike(run_cli) -> None:
    usages = {}
    for command, argument in (("info", "PATH"), ("canonicalize", "ZOO"), ("train", "ZOO"), ("sample", "GEN"),
                              ("eval", "SAMPLES")):
        text = run_cli(command, "--help").stdout
        assert "--json" in text and "<bool>" not in text, command
        usages[command] = text.split("Usage:")[1].splitlines()[0]
        assert usages[command].strip().endswith(f"[OPTIONS] {{{argument}}}"), usages[command]


def test_a_corrected_zoo_command_runs_after_a_refused_one(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "zoo"
    run_cli("zoo", "-a", "test_resnet", "-d", "digits", "-n", "1", "--epochs", "1", "--label-smoothing", "2", "-o", out)
    result = run_cli("zoo", "-a", "test_resnet", "-d", "digits", "-n", "1", "--epochs", "1", "--label-smoothing", "0.1",
                     "-o", out)
    assert result.exit_code == 0, result.output
    shutil.rmtree(out)

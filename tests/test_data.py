"""Dataset specs, deterministic splits, preprocessing to the model's input size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import wgen.data
from wgen.data import (HARD_DIGITS, DataSpec, SplitSpec, _hard_digits, _TensorSource, dataset_default_size, load_data,
                       parse_data_spec)
from wgen.errors import WgenError


def test_parse_specs() -> None:
    assert parse_data_spec("digits") == DataSpec("digits")
    assert parse_data_spec("digits-hard") == DataSpec("digits-hard")
    assert parse_data_spec("npz:/x/y.npz") == DataSpec("npz", Path("/x/y.npz"))
    assert str(parse_data_spec("cifar10:/data")) == "cifar10:/data"


@pytest.mark.parametrize("text, message", [
    ("mnist", "unknown dataset spec 'mnist'"),
    ("digits:foo", "unknown dataset spec 'digits:foo'"),
    ("digits-hard:foo", "unknown dataset spec 'digits-hard:foo'"),
    ("npz:", "dataset spec 'npz:' has no path"),
])
def test_bad_specs(text: str, message: str) -> None:
    with pytest.raises(WgenError) as info:
        parse_data_spec(text)
    assert info.value.message == message


def test_missing_dataset_path_is_named(tmp_path: Path) -> None:
    for kind in ("npz", "cifar10", "cifar100", "imagefolder"):
        with pytest.raises(WgenError) as info:
            load_data(f"{kind}:{tmp_path / 'absent'}", (3, 32, 32), SplitSpec())
        assert info.value.message == f"{tmp_path / 'absent'}: no such file or folder (dataset {kind}:{tmp_path / 'absent'})"


def test_cifar_folder_without_data(tmp_path: Path) -> None:
    with pytest.raises(WgenError, match="no readable cifar10 data"):
        load_data(f"cifar10:{tmp_path}", (3, 32, 32), SplitSpec())


def test_digits_split_is_deterministic_and_disjoint() -> None:
    a = load_data("digits", (1, 32, 32), SplitSpec(seed=3))
    b = load_data("digits", (3, 16, 16), SplitSpec(seed=3))
    c = load_data("digits", (1, 32, 32), SplitSpec(seed=4))
    for split in ("train", "val", "test"):
        assert np.array_equal(a.indices[split], b.indices[split])
    assert not np.array_equal(a.indices["test"], c.indices["test"])
    all_idx = np.concatenate([a.indices[s] for s in ("train", "val", "test")])
    assert len(all_idx) == len(set(all_idx.tolist())) == 1797
    assert a.record()["sizes"] == {"train": 1258, "val": 180, "test": 359}
    assert a.record()["test_sha256"] == b.record()["test_sha256"] != c.record()["test_sha256"]
    with pytest.raises(WgenError, match="split differs"):
        c.check_record(a.record())


def test_digits_batches_match_the_model_input() -> None:
    data = load_data("digits", (3, 24, 24), SplitSpec())
    x, y = data.tensors("test")
    assert x.shape == (359, 3, 24, 24) and y.shape == (359,)
    assert torch.equal(x[:, 0], x[:, 2])  # grey images fed to a 3-channel model
    assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6  # [0,1] normalised with mean 0.5, std 0.5
    assert data.num_classes == 10 and data.mean == (0.5, 0.5, 0.5)
    shuffled = [y for _, y in data.batches("train", 100, torch.Generator().manual_seed(0))]
    again = [y for _, y in data.batches("train", 100, torch.Generator().manual_seed(0))]
    assert all(torch.equal(p, q) for p, q in zip(shuffled, again))


def test_digits_hard_images_are_fixed_and_distorted() -> None:
    x, y, groups = _hard_digits(HARD_DIGITS)
    again, y_again, groups_again = _hard_digits.__wrapped__(HARD_DIGITS)  # rendered afresh, not the cached copy
    assert torch.equal(x, again) and torch.equal(y, y_again) and np.array_equal(groups, groups_again)
    copies = HARD_DIGITS.copies
    assert x.shape == (1797 * copies, 1, 32, 32) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    plain = load_data("digits", (1, 32, 32), SplitSpec())
    assert torch.equal(y, plain.source.labels(np.arange(1797)).repeat_interleave(copies))
    assert np.array_equal(groups, np.repeat(np.arange(1797), copies))
    first = x[:copies].flatten(1)
    assert (torch.cdist(first, first) + 2 * torch.eye(copies) > 1).all()  # renderings of one digit differ


def test_digits_hard_split_keeps_renderings_together() -> None:
    a = load_data("digits-hard", (1, 32, 32), SplitSpec(seed=3))
    b = load_data("digits-hard", (3, 32, 32), SplitSpec(seed=3))
    c = load_data("digits-hard", (1, 32, 32), SplitSpec(seed=4))
    assert a.source.x is c.source.x  # rendered once per process, whatever the split seed
    copies = HARD_DIGITS.copies
    assert a.record()["sizes"] == {"train": 1258 * copies, "val": 180 * copies, "test": 359 * copies}
    plain = load_data("digits", (1, 32, 32), SplitSpec(seed=3))
    for name in ("train", "val", "test"):  # the renderings of exactly the digits that split holds
        assert np.array_equal(np.unique(a.source.groups[a.indices[name]]), np.sort(plain.indices[name]))
    assert a.record() == b.record() and a.record()["test_sha256"] != c.record()["test_sha256"]
    assert dataset_default_size(a.spec) == (32, 32) and a.mean == (0.5,) and a.std == (0.5,)
    for data in (a, c):
        groups = {name: data.source.groups[idx] for name, idx in data.indices.items()}
        all_idx = np.concatenate(list(data.indices.values()))
        assert len(all_idx) == len(set(all_idx.tolist())) == 1797 * copies
        assert not set(groups["test"]) & (set(groups["train"]) | set(groups["val"]))
        assert not set(groups["val"]) & set(groups["train"])
        for name in ("train", "val", "test"):
            assert np.all(np.bincount(groups[name]) % copies == 0)  # every group whole or absent
    x, y = a.tensors("val")
    assert x.shape == (180 * copies, 1, 32, 32) and x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("official", [False, True])
def test_uneven_groups_are_dealt_whole(monkeypatch: pytest.MonkeyPatch, official: bool) -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), rng.integers(1, 6, size=60))
    rng.shuffle(groups)
    official_test = np.flatnonzero(groups >= 50) if official else None
    source = _TensorSource(torch.rand(len(groups), 1, 4, 4), torch.tensor(groups % 3), official_test, groups=groups)
    monkeypatch.setattr(wgen.data, "_load_source", lambda spec: source)
    data = load_data("digits", (1, 4, 4), SplitSpec(seed=1, val_fraction=0.2, test_fraction=0.2))
    split_of = {}
    for name, idx in data.indices.items():
        for group in groups[idx]:
            assert split_of.setdefault(group, name) == name
    assert sorted(np.concatenate(list(data.indices.values())).tolist()) == list(range(len(groups)))
    assert len({g for g, name in split_of.items() if name == "test"}) == (10 if official else 12)


@pytest.mark.parametrize("layout", ["nhw", "nchw", "nhwc"])
def test_npz_layouts(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 3, 12, 12), dtype=np.uint8)
    x = {"nhw": images[:, 0], "nchw": images, "nhwc": images.transpose(0, 2, 3, 1)}[layout]
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 4, size=50))
    data = load_data(f"npz:{tmp_path / 'd.npz'}", (3, 12, 12), SplitSpec())
    assert data.num_classes <= 4
    batch, _ = data.batch(np.array([0]))
    expected = (torch.from_numpy(images[0, 0]).float() / 255 - 0.5) / 0.5
    assert torch.allclose(batch[0, 0], expected, atol=1e-6)


def test_npz_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", images=np.zeros((4, 8, 8)), y=np.zeros(4, dtype=int))
    with pytest.raises(WgenError) as info:
        load_data(f"npz:{tmp_path / 'a.npz'}", (1, 8, 8), SplitSpec())
    assert info.value.message == f"{tmp_path / 'a.npz'}: needs arrays 'x' and 'y', found ['images', 'y']"
    np.savez(tmp_path / "b.npz", x=np.zeros((4, 8, 8)), y=np.zeros(5, dtype=int))
    with pytest.raises(WgenError, match="x must be N images"):
        load_data(f"npz:{tmp_path / 'b.npz'}", (1, 8, 8), SplitSpec())


def test_imagefolder(tmp_path: Path) -> None:
    from PIL import Image

    for label, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.new("RGB", (20 + i, 17), colour).save(tmp_path / label / f"{i}.png")
    data = load_data(f"imagefolder:{tmp_path}", (3, 16, 16), SplitSpec(val_fraction=0.2, test_fraction=0.2))
    assert data.num_classes == 2
    x, y = data.tensors("train")
    assert x.shape == (6, 3, 16, 16)
    red = x[:, 0].mean(dim=(1, 2)) > x[:, 2].mean(dim=(1, 2))
    assert torch.equal(red, y == 0)  # class 0 (cat) is red


def test_bad_split_fractions() -> None:
    with pytest.raises(WgenError, match="split fractions"):
        load_data("digits", (1, 8, 8), SplitSpec(0, 0.5, 0.6))

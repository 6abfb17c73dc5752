"""Datasets named by spec strings, deterministic train/val/test splits, and batches for a model.

Specs: ``digits`` (scikit-learn's built-in 8x8 digits), ``digits-hard`` (each of those digits
rendered ten times at 32x32, distorted, partly erased and noisy: see Distortion), ``imagefolder:PATH``,
``cifar10:PATH``, ``cifar100:PATH`` (torchvision's readers on local files, never downloading) and
``npz:PATH`` (arrays ``x`` and ``y``). Images are kept at their native size and resized per batch to the
model's input size, with 1 <-> 3 channels adapted as the model needs.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import WgenError

SPEC_HINT = "use digits, digits-hard, imagefolder:PATH, cifar10:PATH, cifar100:PATH or npz:PATH"
BUILT_IN = ("digits", "digits-hard")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DataSpec:
    """A parsed dataset spec: its kind and, for file-backed kinds, the path."""

    kind: str
    path: Path | None = None

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def parse_data_spec(text: str) -> DataSpec:
    """Return the DataSpec of ``text`` or a WgenError naming what is wrong with it."""
    kind, sep, rest = text.partition(":")
    if kind in BUILT_IN and not sep:
        return DataSpec(kind)
    if kind in ("imagefolder", "cifar10", "cifar100", "npz"):
        if not rest:
            raise WgenError(f"dataset spec {text!r} has no path", f"write it as {kind}:PATH")
        return DataSpec(kind, Path(rest).expanduser())
    raise WgenError(f"unknown dataset spec {text!r}", SPEC_HINT)


def file_inputs(spec: str | None) -> list[Path]:
    """Return the files or folders dataset ``spec`` reads (none for built-in data or no spec)."""
    if spec is None:
        return []
    path = parse_data_spec(spec).path
    return [path] if path is not None else []


@dataclass(frozen=True)
class SplitSpec:
    """How examples are dealt into train/val/test: a seed and two fractions.

    Datasets with an official test set (CIFAR) keep it as the test split; the fractions then apply
    to the official training set.
    """

    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2

    def to_json(self) -> dict[str, Any]:
        """Return the split as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> SplitSpec:
        """Return the split recorded by ``to_json`` (extra keys such as sizes are ignored)."""
        return cls(int(value["seed"]), float(value["val_fraction"]), float(value["test_fraction"]))


class _Source:
    """All images of a dataset at native size, as float tensors in [0, 1]."""

    num_classes: int
    channels: int
    native_size: tuple[int, int]
    official_test: np.ndarray | None = None  # indices of an official test set, if the dataset has one
    groups: np.ndarray | None = None  # a non-negative int per example; a group is dealt whole into one split
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __len__(self) -> int:
        raise NotImplementedError

    def images(self, indices: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        """Return images ``indices`` as float ``[N, C, H, W]`` in [0, 1] resized to ``size``."""
        raise NotImplementedError

    def labels(self, indices: np.ndarray) -> torch.Tensor:
        raise NotImplementedError


class _TensorSource(_Source):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, official_test: np.ndarray | None = None,
                 mean: tuple[float, ...] = (0.5,), std: tuple[float, ...] = (0.5,),
                 groups: np.ndarray | None = None) -> None:
        self.x, self.y = x, y.long()
        self.num_classes = int(self.y.max()) + 1
        self.channels = x.shape[1]
        self.native_size = (x.shape[2], x.shape[3])
        self.official_test, self.mean, self.std, self.groups = official_test, mean, std, groups

    def __len__(self) -> int:
        return len(self.y)

    def images(self, indices: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        batch = self.x[torch.as_tensor(indices)]
        batch = batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
        if tuple(batch.shape[-2:]) != tuple(size):
            batch = F.interpolate(batch, size=size, mode="bilinear", align_corners=False,
                                  antialias=batch.shape[-1] > size[-1])
        return batch

    def labels(self, indices: np.ndarray) -> torch.Tensor:
        return self.y[torch.as_tensor(indices)]


class _ImageFolderSource(_Source):
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, root: Path) -> None:
        from torchvision.datasets import ImageFolder

        try:
            self.folder = ImageFolder(str(root))
        except (FileNotFoundError, RuntimeError) as exc:
            raise WgenError(f"{root}: no class folders with images", "imagefolder:PATH wants PATH/CLASS/IMAGE files"
                            ) from exc
        self.num_classes = len(self.folder.classes)
        self.channels = 3
        self.native_size = (224, 224)

    def __len__(self) -> int:
        return len(self.folder.samples)

    def images(self, indices: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        out = []
        for i in indices:
            image = self.folder.loader(self.folder.samples[int(i)][0]).convert("RGB")
            out.append(pil_to_tensor(image.resize((size[1], size[0]))).float() / 255)
        return torch.stack(out)

    def labels(self, indices: np.ndarray) -> torch.Tensor:
        return torch.tensor([self.folder.samples[int(i)][1] for i in indices], dtype=torch.long)


def _load_source(spec: DataSpec) -> _Source:
    if spec.kind == "digits":
        x, y = _digits()
        return _TensorSource(x, y)
    if spec.kind == "digits-hard":
        x, y, groups = _hard_digits(HARD_DIGITS)
        return _TensorSource(x, y, groups=groups)
    assert spec.path is not None
    if not spec.path.exists():
        raise WgenError(f"{spec.path}: no such file or folder (dataset {spec})",
                        "wgen never downloads data; point the spec at local files")
    if spec.kind == "npz":
        return _load_npz(spec.path)
    if spec.kind == "imagefolder":
        return _ImageFolderSource(spec.path)
    return _load_cifar(spec)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Return scikit-learn's digits as float images ``[1797, 1, 8, 8]`` in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0, torch.tensor(digits.target)


@dataclass(frozen=True)
class Distortion:
    """How ``digits-hard`` renders a digit: the ranges its random distortions are drawn from.

    Each rendering is drawn independently: a random affine map (rotation, shear, size, shift) of
    the 8x8 digit resampled straight to 32x32, its strokes dimmed to a random contrast, in a share
    of renderings a random rectangle blacked out, then Gaussian noise of a random strength, clipped
    back to [0, 1].
    """

    # The defaults were tuned on val accuracy: with wgen zoo's default recipe (20 epochs), test_resnet
    # members land near 95% and test_vit (img_size 32, patch_size 8) near 83% (4 and 10 epochs: 92%, 81%). The ViT is the one that
    # suffers from noise and geometric jitter, hence the mild affine ranges, and the copies it needs
    # to learn from; the erasures are what also costs the ResNet.
    copies: int = 10  # renderings of each base digit
    seed: int = 0  # fixed, so the images never depend on the split seed
    size: int = 32
    rotation: float = 10.0  # degrees, either way
    shear: float = 0.1
    scale: tuple[float, float] = (0.85, 1.0)  # digit size relative to the frame
    shift: float = 0.05  # fraction of the frame, either way
    contrast: tuple[float, float] = (0.5, 1.0)  # brightness of the strokes
    erase: float = 0.7  # share of renderings with a rectangle blacked out
    erase_side: tuple[float, float] = (0.3, 0.7)  # its sides, as fractions of the frame
    noise: tuple[float, float] = (0.04, 0.12)  # std of the additive noise


HARD_DIGITS = Distortion()


@functools.lru_cache(maxsize=2)
def _hard_digits(distortion: Distortion) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Return the digits-hard images ``[N * copies, 1, size, size]`` in [0, 1], labels and groups.

    Rendering ``k`` of base digit ``i`` is example ``i * copies + k``; its group is ``i``.
    """
    base, labels = _digits()
    generator = torch.Generator().manual_seed(distortion.seed)
    images = base.repeat_interleave(distortion.copies, dim=0)
    n, size = len(images), distortion.size
    grid = F.affine_grid(_random_affines(n, distortion, generator), [n, 1, size, size], align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    images = images * _uniform(n, distortion.contrast, generator).view(-1, 1, 1, 1)
    images = images * (1 - _random_rectangles(n, size, distortion, generator))
    noise = _uniform(n, distortion.noise, generator).view(-1, 1, 1, 1)
    images = images + noise * torch.randn(images.shape, generator=generator)
    groups = np.repeat(np.arange(len(base)), distortion.copies)
    return images.clamp_(0, 1), labels.repeat_interleave(distortion.copies), groups


def _random_affines(n: int, distortion: Distortion, generator: torch.Generator) -> torch.Tensor:
    """Return ``n`` random ``[2, 3]`` maps from output to source coordinates, as affine_grid takes them."""
    angle = _uniform(n, (-1.0, 1.0), generator) * math.radians(distortion.rotation)
    shear = _uniform(n, (-distortion.shear, distortion.shear), generator)
    scale = _uniform(n, distortion.scale, generator)
    shift = _uniform(2 * n, (-distortion.shift, distortion.shift), generator).view(n, 2) * 2  # the frame spans [-1, 1]
    cos, sin, zero, one = angle.cos(), angle.sin(), torch.zeros(n), torch.ones(n)
    rotate = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    skew = torch.stack([torch.stack([one, shear], -1), torch.stack([zero, one], -1)], -2)
    # Sampling the source at 1/scale of each output position draws the digit at scale times its size.
    linear = rotate @ skew / scale.view(-1, 1, 1)
    return torch.cat([linear, shift[:, :, None]], dim=2)


def _random_rectangles(n: int, size: int, distortion: Distortion, generator: torch.Generator) -> torch.Tensor:
    """Return ``[n, 1, size, size]`` masks: 1 inside a random rectangle in a share ``erase`` of them, else 0."""
    sides = _uniform(2 * n, distortion.erase_side, generator).view(n, 2, 1)
    corners = _uniform(2 * n, (0.0, 1.0), generator).view(n, 2, 1) * (1 - sides)
    chosen = torch.rand(n, generator=generator) < distortion.erase
    position = (torch.arange(size) + 0.5) / size
    inside = (position >= corners) & (position < corners + sides)  # [n, (rows, columns), size]
    return (inside[:, 0, :, None] & inside[:, 1, None, :] & chosen.view(-1, 1, 1))[:, None].float()


def _uniform(n: int, bounds: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """Return ``n`` draws uniform in ``bounds``."""
    low, high = bounds
    return low + (high - low) * torch.rand(n, generator=generator)


def _load_npz(path: Path) -> _Source:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays or "y" not in arrays:
                raise WgenError(f"{path}: needs arrays 'x' and 'y', found {sorted(arrays.files)}",
                                "save with np.savez(path, x=images, y=labels)")
            x, y = arrays["x"], arrays["y"]
    except (OSError, ValueError) as exc:
        raise WgenError(f"{path}: unreadable npz file ({exc})", "save with np.savez(path, x=images, y=labels)") from exc
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or y.ndim != 1 or len(x) != len(y):
        raise WgenError(f"{path}: x must be N images (N,H,W), (N,C,H,W) or (N,H,W,C) with C 1 or 3 and y "
                        f"N integer labels; got x {x.shape}, y {y.shape}", "reshape the arrays")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise WgenError(f"{path}: y must hold non-negative integer class labels", "store labels as 0..K-1")
    tensor = torch.from_numpy(np.ascontiguousarray(x))
    if tensor.dtype != torch.uint8:
        tensor = tensor.float()
    return _TensorSource(tensor, torch.from_numpy(y.astype(np.int64)))


def _load_cifar(spec: DataSpec) -> _Source:
    from torchvision.datasets import CIFAR10, CIFAR100

    reader = CIFAR10 if spec.kind == "cifar10" else CIFAR100
    try:
        train = reader(str(spec.path), train=True, download=False)
        test = reader(str(spec.path), train=False, download=False)
    except RuntimeError as exc:
        folder = "cifar-10-batches-py" if spec.kind == "cifar10" else "cifar-100-python"
        raise WgenError(f"{spec.path}: no readable {spec.kind} data ({exc})",
                        f"the folder must hold torchvision's extracted {folder}/") from exc
    x = torch.from_numpy(np.concatenate([train.data, test.data])).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(list(train.targets) + list(test.targets))
    official_test = np.arange(len(train.data), len(x))
    return _TensorSource(x, y, official_test, CIFAR_MEAN, CIFAR_STD)


@dataclass
class SplitData:
    """A dataset dealt into train/val/test index arrays, preprocessed for one input size."""

    spec: DataSpec
    split: SplitSpec
    source: _Source
    indices: dict[str, np.ndarray]
    input_size: tuple[int, int, int]  # (channels, height, width) the model takes

    @property
    def num_classes(self) -> int:
        """Return the number of classes of the dataset."""
        return self.source.num_classes

    @property
    def mean(self) -> tuple[float, ...]:
        """Return the per-channel mean the inputs are normalised with."""
        return _per_channel(self.source.mean, self.input_size[0])

    @property
    def std(self) -> tuple[float, ...]:
        """Return the per-channel std the inputs are normalised with."""
        return _per_channel(self.source.std, self.input_size[0])

    def record(self) -> dict[str, Any]:
        """Return the split as recorded in zoo.json: seed, fractions, sizes and a test-set digest."""
        sizes = {name: int(len(idx)) for name, idx in self.indices.items()}
        digest = hashlib.sha256(np.sort(self.indices["test"]).astype(np.int64).tobytes()).hexdigest()
        return {**self.split.to_json(), "sizes": sizes, "test_sha256": digest}

    def check_record(self, recorded: dict[str, Any]) -> None:
        """Raise a WgenError unless this split deals exactly the test examples ``recorded`` names."""
        if recorded.get("test_sha256") and recorded["test_sha256"] != self.record()["test_sha256"]:
            raise WgenError(f"the {self.spec} split differs from the one recorded with the zoo",
                            "the dataset files changed since the zoo was trained; use the same data")

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Return model-ready inputs ``[N, C, H, W]`` and labels for dataset ``indices``."""
        x = self.source.images(indices, self.input_size[1:])
        x = _adapt_channels(x, self.input_size[0])
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std, self.source.labels(indices)

    def positions(self, split: str, batch_size: int, generator: torch.Generator | None = None) -> Iterator[np.ndarray]:
        """Yield the positions (``0..n-1`` within ``split``) of each batch ``batches`` deals: shuffled when a
        generator is given (a training loop that looks up per-example values by position uses them)."""
        count = len(self.indices[split])
        order = torch.randperm(count, generator=generator).numpy() if generator is not None else np.arange(count)
        for start in range(0, count, batch_size):
            yield order[start:start + batch_size]

    def batches(self, split: str, batch_size: int, generator: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(inputs, labels)`` batches of ``split``; shuffled when a generator is given."""
        for rows in self.positions(split, batch_size, generator):
            yield self.batch(self.indices[split][rows])

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the whole of ``split`` as one ``(inputs, labels)`` pair."""
        return self.batch(self.indices[split])


def load_data(spec: DataSpec | str, input_size: tuple[int, int, int], split: SplitSpec) -> SplitData:
    """Return ``spec`` dealt into train/val/test by ``split``, preprocessed to ``input_size``."""
    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    if not (0 <= split.val_fraction < 1 and 0 < split.test_fraction < 1
            and split.val_fraction + split.test_fraction < 1):
        raise WgenError(f"split fractions val={split.val_fraction} test={split.test_fraction} are invalid",
                        "each in [0, 1) with a sum below 1")
    source = _load_source(spec)
    if source.channels not in (1, 3) or input_size[0] not in (1, 3):
        raise WgenError(f"cannot feed {source.channels}-channel images to a {input_size[0]}-channel model",
                        'set --model-args \'{"in_chans": 1}\' or 3')
    # Whole groups are dealt, so renderings of one original never straddle splits; a dataset without
    # groups is its own groups of one, dealt exactly as examples always were.
    groups = source.groups if source.groups is not None else np.arange(len(source))
    rng = np.random.default_rng(split.seed)
    if source.official_test is not None:
        test = source.official_test
        pool = np.setdiff1d(np.unique(groups), groups[test])  # a group touching the official test stays out
        pool = pool[rng.permutation(len(pool))]
        n_val = int(round(split.val_fraction * len(pool)))
        val, train = _expand_groups(groups, pool[:n_val]), _expand_groups(groups, pool[n_val:])
    else:
        order = np.unique(groups)
        order = order[rng.permutation(len(order))]
        n_test = int(round(split.test_fraction * len(order)))
        n_val = int(round(split.val_fraction * len(order)))
        test, val, train = (_expand_groups(groups, part) for part in
                            (order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]))
    if len(train) == 0 or len(test) == 0:
        raise WgenError(f"dataset {spec} has too few examples ({len(source)}) to split",
                        "use a larger dataset")
    indices = {"train": train, "val": val, "test": test}
    return SplitData(spec, split, source, indices, tuple(input_size))


def _expand_groups(groups: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Return the indices of the examples in groups ``chosen``: group by group in that order, each in index order."""
    position = np.full(int(groups.max()) + 1, -1)
    position[chosen] = np.arange(len(chosen))
    members = np.flatnonzero(position[groups] >= 0)
    return members[np.argsort(position[groups[members]], kind="stable")]


def dataset_default_size(spec: DataSpec) -> tuple[int, int] | None:
    """Return the input size a flexible model is trained at on ``spec`` (None: the model's own)."""
    return (32, 32) if spec.kind in ("digits", "digits-hard", "cifar10", "cifar100", "npz") else None


def _per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    if len(values) == channels:
        return tuple(values)
    return (float(np.mean(values)),) * channels


def _adapt_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    return x.mean(dim=1, keepdim=True)


def data_for_zoo(info: dict[str, Any], spec: str | None, input_size: tuple[int, int, int]) -> SplitData:
    """Return the data a zoo was trained on (its recorded split), or ``spec`` if given.

    A ``spec`` equal to the zoo's own is dealt with the recorded split and checked against its test
    digest; another dataset is dealt with the default split.
    """
    recorded = info.get("data")
    if spec is None and recorded is None:
        raise WgenError("the zoo records no dataset", "pass --data SPEC")
    chosen = parse_data_spec(spec if spec is not None else recorded)
    if recorded is not None and str(chosen) == str(parse_data_spec(recorded)) and "split" in info:
        data = load_data(chosen, input_size, SplitSpec.from_json(info["split"]))
        data.check_record(info["split"])
        return data
    return load_data(chosen, input_size, SplitSpec())

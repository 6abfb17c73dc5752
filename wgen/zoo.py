"""Train a zoo: N members of one timm architecture from independent seeds (or fine-tuned from one).

The output folder holds ``member-000/ ...`` in timm local-dir layout and ``zoo.json``. Each member
is written atomically when it finishes, so re-running the same command resumes: finished members
are kept and a member cut off mid-training is trained again. ``shard=(i, n)`` trains members
i, i+n, ... so several processes can fill one folder.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoints import (CONFIG_NAME, WEIGHTS_NAME, ZOO_JSON, ModelSpec, StateDict, create_model, member_config,
                          open_zoo, read_json, state_dict_fingerprint, write_member)
from .data import DataSpec, SplitData, SplitSpec, dataset_default_size, file_inputs, load_data, parse_data_spec
from .errors import WgenError
from .limits import Limit, check, check_all
from .metrics import accuracy
from .optim import warmup_cosine
from .outputs import atomic_write_json, prepare_output
from .progress import SILENT, Progress
from .runtime import seed_everything
from .tables import Summary, TextTable, pct
from .version import __version__

OPTIMIZERS = ("adamw", "sgd", "adam")
# Decay of the weights whose output goes straight into a BatchNorm. The norm makes the network blind
# to their scale, so strong decoupled decay leaves what they compute alone and erases what training
# never touched: the random init in taps that only ever see padding, say. Without it, a digits zoo
# of test_resnet is mostly that init noise, and permutation alignment shrinks it by 2-4%; with it, by 30%.
NORMALIZED_DECAY = 30.0
ZOO_FORMAT = "wgen.zoo/1"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides what a member of the zoo becomes (the device does not)."""

    architecture: str
    data: str
    model_args: dict[str, Any] = field(default_factory=dict)
    img_size: int | None = None
    split: SplitSpec = SplitSpec()
    seed_start: int = 0
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adamw"
    weight_decay: float = 0.05
    normalized_decay: float | None = None  # for weights feeding a BatchNorm; None: NORMALIZED_DECAY, or weight_decay with init
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    init: str | None = None  # checkpoint every member is fine-tuned from

    def check(self) -> None:
        """Raise a WgenError for a setting out of its range (before anything is read or written)."""
        if self.optimizer not in OPTIMIZERS:
            raise WgenError(f"unknown optimizer {self.optimizer!r}", f"use one of {', '.join(OPTIMIZERS)}")
        check_all({"--epochs": self.epochs, "--lr": self.lr, "--weight-decay": self.weight_decay,
                   "--normalized-decay": self.normalized_decay, "--warmup-epochs": self.warmup_epochs,
                   "--label-smoothing": self.label_smoothing, "--img-size": self.img_size,
                   "--seed-start": self.seed_start, "--split-seed": self.split.seed})
        check("--batch-size", self.batch_size, Limit(2, integer=True))  # BatchNorm cannot train on one example

    def to_json(self) -> dict[str, Any]:
        """Return the recipe as JSON (the split as its seed and fractions)."""
        value = asdict(self)
        value["split"] = self.split.to_json()
        return value


@dataclass
class MemberRecord:
    """What zoo.json says of one member."""

    name: str
    seed: int
    val_accuracy: float
    test_accuracy: float
    train_seconds: float
    resumed: bool = False


def parse_shard(text: str | None) -> tuple[int, int]:
    """Return ``(index, count)`` of a ``--shard I/N`` value (``(0, 1)`` for None)."""
    if not text:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise WgenError(f"--shard {text!r} is not I/N with 0 <= I < N", "e.g. --shard 0/4 ... --shard 3/4")
    return index, count


def member_name(index: int) -> str:
    """Return the folder name of member ``index``."""
    return f"member-{index:03d}"


def resolve_input_size(spec: ModelSpec, data: DataSpec, img_size: int | None) -> tuple[int, int, int]:
    """Return the ``(C, H, W)`` a zoo of ``spec`` is trained at on ``data``.

    ``img_size`` model arg, else the model's own size if it is fixed, else ``--img-size``, else the
    dataset's natural size for flexible models (32 for digits and CIFAR), else the model's default.
    """
    model = spec.create("meta")
    channels = int(spec.model_args.get("in_chans", 3))
    default = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:])
    fixed = bool(model.pretrained_cfg.get("fixed_input_size", False))
    if "img_size" in spec.model_args:
        size = spec.model_args["img_size"]
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if img_size is not None and (img_size, img_size) != hw:
            raise WgenError(f"--img-size {img_size} contradicts img_size {size} in --model-args",
                            "give the size once")
        return channels, int(hw[0]), int(hw[1])
    if fixed:
        if img_size is not None and (img_size, img_size) != default:
            raise WgenError(f"{spec.architecture} takes a fixed input size {default}, not --img-size {img_size}",
                            f'set it in the model instead: --model-args \'{{"img_size": {img_size}}}\'')
        return channels, int(default[0]), int(default[1])
    if img_size is not None:
        return channels, img_size, img_size
    natural = dataset_default_size(data) or default
    return channels, int(natural[0]), int(natural[1])


@dataclass
class ZooPlan:
    """A validated zoo job: recipe, model spec, data and the optional init weights."""

    recipe: Recipe
    spec: ModelSpec
    data: SplitData
    init_state: StateDict | None
    init_fingerprint: str | None

    def inputs(self) -> list[Path]:
        """Return the files and folders this job reads (an output may not touch them)."""
        return [*file_inputs(str(self.data.spec)), *([Path(self.recipe.init)] if self.recipe.init else [])]

    def header(self) -> dict[str, Any]:
        """Return the zoo.json fields that do not depend on which members exist."""
        return {"format": ZOO_FORMAT, "wgen_version": __version__, **self.spec.to_json(),
                "input_size": list(self.data.input_size), "mean": list(self.data.mean),
                "std": list(self.data.std), "data": str(self.data.spec), "split": self.data.record(),
                "recipe": self.recipe.to_json(), "init_fingerprint": self.init_fingerprint}


def plan_zoo(recipe: Recipe) -> ZooPlan:
    """Return the plan of ``recipe`` after checking every input; nothing is written."""
    recipe.check()
    if recipe.normalized_decay is None:  # fine-tuning keeps the init's weights at their scale
        recipe = replace(recipe, normalized_decay=recipe.weight_decay if recipe.init else NORMALIZED_DECAY)
    data_spec = parse_data_spec(recipe.data)
    args = dict(recipe.model_args)
    if "num_classes" in args:
        raise WgenError("num_classes comes from the dataset, not --model-args", "drop it from --model-args")
    create_model(recipe.architecture, None, args, "meta")  # fail early on a bad name or args
    probe = ModelSpec(recipe.architecture, 1, args)
    input_size = resolve_input_size(probe, data_spec, recipe.img_size)
    data = load_data(data_spec, input_size, recipe.split)
    spec = ModelSpec(recipe.architecture, data.num_classes, args)
    init_state = init_fingerprint = None
    if recipe.init:
        init_state = _read_init(recipe.init, spec)
        init_fingerprint = state_dict_fingerprint(init_state)
    return ZooPlan(recipe, spec, data, init_state, init_fingerprint)


def _read_init(path: str, spec: ModelSpec) -> StateDict:
    try:
        init = open_zoo(path, arch=spec.architecture, model_args=spec.model_args, skip_hint=False)
    except WgenError as exc:
        raise WgenError(f"--init {exc.message}", exc.hint) from exc
    if len(init.members) != 1:
        raise WgenError(f"--init {path} holds {len(init.members)} checkpoints, not one",
                        "point --init at one member folder or file")
    if init.spec.architecture != spec.architecture:
        raise WgenError(f"--init {path} is a {init.spec.architecture}, not a {spec.architecture}",
                        "use -a with the checkpoint's architecture")
    state = init.load(init.members[0])
    target = spec.reference()
    kept = {k: v for k, v in state.items() if k in target and tuple(v.shape) == target[k][0]}
    dropped = sorted(set(target) - set(kept))
    head = create_model(spec.architecture, spec.num_classes, spec.model_args, "meta").pretrained_cfg.get("classifier")
    heads = (head,) if isinstance(head, str) else tuple(head or ())
    if any(not k.startswith(tuple(f"{h}." for h in heads)) for k in dropped):
        bad = next(k for k in dropped if not k.startswith(tuple(f"{h}." for h in heads)))
        raise WgenError(f"--init {path}: {bad!r} does not fit {spec.architecture} with {spec.model_args}",
                        "use the checkpoint's own --model-args")
    return kept  # a classifier of another class count is left out and trained afresh


def train_zoo(plan: ZooPlan, out: Path, count: int, device: torch.device, shard: tuple[int, int] = (0, 1),
              force: bool = False, progress: Progress = SILENT) -> list[MemberRecord]:
    """Train the members of ``shard`` among ``count`` into ``out``; return the records of this shard.

    Members already in ``out`` from the same recipe are kept (resume). An ``out`` made with another
    recipe is refused unless ``force``, which replaces it (only if wgen wrote it).
    """
    check("--count", count)
    header = plan.header()
    prepare_output(out, "zoo", plan.inputs(), force, lambda folder: _same_recipe(folder, header))
    mine = list(range(shard[0], count, shard[1]))
    done = {i for i in mine if _finished_member(out / member_name(i), plan.recipe.seed_start + i)}
    if done:
        progress.note(f"{len(done)} of {len(mine)} members already trained")
    records = []
    with _zoo_lock(out):
        _refresh_zoo_json(out, header)
    for index in mine:
        name, seed = member_name(index), plan.recipe.seed_start + index
        if index in done:
            record = _record_from_config(read_json(out / name / CONFIG_NAME), name, resumed=True)
        else:
            for stale in out.glob(f".{name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            progress.stage(f"{name} (seed {seed})", plan.recipe.epochs)
            state, record = train_member(plan, name, seed, device, progress)
            config = member_config(plan.spec, plan.data.input_size, plan.data.mean, plan.data.std,
                                   {"kind": "zoo-member", "seed": seed, "data": str(plan.data.spec),
                                    "val_accuracy": record.val_accuracy, "test_accuracy": record.test_accuracy,
                                    "train_seconds": record.train_seconds})
            write_member(out / name, state, config)
            with _zoo_lock(out):
                _refresh_zoo_json(out, header)
        records.append(record)
    return records


def train_member(plan: ZooPlan, name: str, seed: int, device: torch.device,
                 progress: Progress = SILENT) -> tuple[StateDict, MemberRecord]:
    """Train one member from ``seed``; return its final CPU state dict and its record (one ``advance`` an epoch)."""
    recipe, data = plan.recipe, plan.data
    started = time.perf_counter()
    generator = seed_everything(seed)
    model = plan.spec.create("cpu")
    if plan.init_state is not None:
        model.load_state_dict(plan.init_state, strict=False)
    model.to(device)
    optimizer = _optimizer(model, recipe, data.input_size)
    steps_per_epoch = max(1, len(data.indices["train"]) // recipe.batch_size)
    schedule = _warmup_cosine(optimizer, recipe.warmup_epochs * steps_per_epoch, recipe.epochs * steps_per_epoch)
    val_acc = float("nan")
    for epoch in range(recipe.epochs):
        model.train()
        total_loss, batches = 0.0, 0
        for x, y in data.batches("train", recipe.batch_size, generator):
            if len(y) < 2:  # BatchNorm cannot train on a single example
                continue
            logits = model(x.to(device, non_blocking=True))
            loss = F.cross_entropy(logits, y.to(device), label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += float(loss.detach())
            batches += 1
        if not math.isfinite(total_loss):
            raise WgenError(f"{name}: training diverged (loss {total_loss}) at epoch {epoch + 1}",
                            "lower --lr or raise --warmup-epochs")
        val_acc = accuracy(model, data, "val", device) if len(data.indices["val"]) else float("nan")
        progress.advance(1, f"loss {total_loss / max(batches, 1):.3f}  val {100 * val_acc:.1f}%")
    test_acc = accuracy(model, data, "test", device)
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    record = MemberRecord(name, seed, val_acc, test_acc, round(time.perf_counter() - started, 3))
    return state, record


def _optimizer(model: torch.nn.Module, recipe: Recipe, input_size: tuple[int, ...]) -> torch.optim.Optimizer:
    # Norm weights and biases are not decayed, as in timm's own training script.
    normalized = feeds_batchnorm(model, input_size)
    groups: dict[str, list[torch.nn.Parameter]] = {"decay": [], "normalized": [], "none": []}
    for param in model.parameters():
        groups["none" if param.ndim <= 1 else "normalized" if id(param) in normalized else "decay"].append(param)
    decays = {"decay": recipe.weight_decay, "normalized": recipe.normalized_decay, "none": 0.0}
    params = [{"params": p, "weight_decay": decays[k]} for k, p in groups.items() if p]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, nesterov=True)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr)
    return torch.optim.AdamW(params, lr=recipe.lr)


@torch.no_grad()
def feeds_batchnorm(model: torch.nn.Module, input_size: tuple[int, ...]) -> set[int]:
    """Return the ids of the conv and linear weights whose output goes straight into a BatchNorm.

    Found by one eval-mode forward on random inputs, matching each norm's input to the layer that
    produced that very tensor.
    """
    produced: dict[int, tuple[torch.Tensor, torch.nn.Parameter]] = {}  # outputs kept alive: ids stay unique
    found: set[int] = set()

    def record(module: torch.nn.Module, _: Any, output: torch.Tensor) -> None:
        produced[id(output)] = (output, module.weight)

    def check(module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        if inputs and id(inputs[0]) in produced:
            found.add(id(produced[id(inputs[0])][1]))

    hooks = []
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
            hooks.append(module.register_forward_hook(record))
        elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            hooks.append(module.register_forward_pre_hook(check))
    was_training = model.training
    try:
        model.eval()
        device = next(iter(model.parameters())).device
        model(torch.randn(2, *input_size, device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return found


def _warmup_cosine(optimizer: torch.optim.Optimizer, warmup: float, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, 1.0, warmup, total))


def _same_recipe(out: Path, header: dict[str, Any]) -> bool:
    """Return whether ``out`` holds a zoo of this recipe, or one with no member yet (to resume); raise naming
    what differs when members trained with other settings would be mixed in."""
    if not (out / ZOO_JSON).is_file():
        return False
    existing = read_json(out / ZOO_JSON)
    differing = _differences(existing, header)
    if differing and existing.get("members"):
        raise WgenError(f"{out}: holds a zoo made with other settings ({differing[0]})",
                        "re-run with the same settings to resume, choose another -o, or pass --force")
    return True


def _differences(existing: dict[str, Any], header: dict[str, Any]) -> list[str]:
    keys = ("architecture", "num_classes", "model_args", "input_size", "data", "init_fingerprint")
    out = [f"{k}: {existing.get(k)!r} vs {header[k]!r}" for k in keys if existing.get(k) != header[k]]
    old, new = existing.get("recipe", {}), header["recipe"]
    out += [f"{k}: {old.get(k)!r} vs {new[k]!r}" for k in new if k != "init" and old.get(k) != new[k]]
    if existing.get("split", {}).get("test_sha256") != header["split"]["test_sha256"]:
        out.append("the data split differs")
    return out


def _finished_member(folder: Path, seed: int) -> bool:
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / CONFIG_NAME).is_file():
        return False
    return read_json(folder / CONFIG_NAME).get("wgen", {}).get("seed") == seed


def _record_from_config(config: dict[str, Any], name: str, resumed: bool = False) -> MemberRecord:
    block = config.get("wgen", {})
    return MemberRecord(name, int(block.get("seed", -1)), float(block.get("val_accuracy", float("nan"))),
                        float(block.get("test_accuracy", float("nan"))), float(block.get("train_seconds", 0.0)),
                        resumed)


def _refresh_zoo_json(out: Path, header: dict[str, Any]) -> None:
    members = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (folder / WEIGHTS_NAME).is_file() and (folder / CONFIG_NAME).is_file():
            record = _record_from_config(read_json(folder / CONFIG_NAME), folder.name)
            members.append({k: v for k, v in asdict(record).items() if k != "resumed"})
    atomic_write_json(out / ZOO_JSON, {**header, "members": members})


@contextlib.contextmanager
def _zoo_lock(out: Path) -> Iterator[None]:
    """Serialise zoo.json rewrites between shards writing into one folder."""
    try:
        import fcntl
    except ImportError:  # Windows: shards there must not share a folder at the same moment
        yield
        return
    with open(out / ".zoo.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def zoo_summary(records: list[MemberRecord], title: str) -> Summary:
    """Return the table ``wgen zoo`` shows: each member's seed, accuracies, seconds, and whether it was resumed."""
    table = TextTable(title, ["member", "seed", "val acc", "test acc", "seconds", ""])
    for r in records:
        table.rows.append([r.name, str(r.seed), pct(r.val_accuracy), pct(r.test_accuracy), f"{r.train_seconds:.1f}",
                           "resumed" if r.resumed else ""])
    return Summary(tables=[table])

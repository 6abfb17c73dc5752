"""Sampling: integrate the learned flow from noise, decode, check and write ready-to-use members.

Sample ``i`` starts from noise drawn with seed ``seed * 1_000_000 + i``, so it is the same whatever
the batch size, and a killed run resumes by skipping the samples already written. Samples are
produced in batches and written as they come, so memory stays flat as N grows.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
import torch
from torchdiffeq import odeint

from .. import __version__
from ..checkpoints import CONFIG_NAME, WEIGHTS_NAME, ModelSpec, atomic_write_json, member_config, read_json, write_member
from ..errors import WgenError
from ..evaluate import stacked_forward
from .nets import NetConfig, VelocityMLP
from .space import WeightSpace, load_space
from .train import GENERATOR_FORMAT, SPACE_NAME

MANIFEST_JSON = "manifest.json"
RUN_JSON = ".sampling.json"  # options of an unfinished run, for resume
SOLVERS = ("euler", "midpoint", "rk4", "dopri5")
SAMPLE_SEED_STRIDE = 1_000_000


@dataclass(frozen=True)
class SampleOptions:
    """How to sample: count, ODE solver and steps, batch size, seed, optional BN calibration data."""

    count: int = 100
    solver: str = "midpoint"
    steps: int = 20
    batch_size: int = 50
    seed: int = 0
    calibrate: str | None = None


class SampleProgress(Protocol):
    """Receives one event per written (or rejected) sample."""

    def start(self, total: int, done: int) -> None: ...
    def advance(self, count: int) -> None: ...


class _Silent:
    def start(self, total: int, done: int) -> None: ...
    def advance(self, count: int) -> None: ...


@dataclass
class Generator:
    """A trained generator: its config, weight space and velocity net (EMA weights)."""

    path: Path
    config: dict[str, Any]
    space: WeightSpace
    net: VelocityMLP
    fingerprint: str

    @property
    def spec(self) -> ModelSpec:
        """Return the model spec of the networks this generator emits."""
        c = self.config
        return ModelSpec(c["architecture"], int(c["num_classes"]), dict(c.get("model_args") or {}))


def load_generator(path: Path | str, device: torch.device | str = "cpu") -> Generator:
    """Return the generator stored in folder ``path``."""
    root = Path(path)
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise WgenError(f"{root}: not a generator (no config.json)", "point at the folder `wgen train` wrote")
    config = read_json(config_path)
    if config.get("format") != GENERATOR_FORMAT:
        raise WgenError(f"{root}: not a generator (format {config.get('format')!r})",
                        "point at the folder `wgen train` wrote")
    try:
        weights = safetensors.torch.load_file(str(root / WEIGHTS_NAME))
        space_tensors = safetensors.torch.load_file(str(root / SPACE_NAME))
    except Exception as exc:
        raise WgenError(f"{root}: generator files are missing or unreadable ({' '.join(str(exc).split())[:120]})",
                        "re-train the generator") from exc
    space = load_space(config["space"], space_tensors).to(device)
    net = VelocityMLP(space.dim, NetConfig(**config["net"]))
    net.load_state_dict(weights)
    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME, SPACE_NAME):
        digest.update(_file_sha256(root / name).encode())
    return Generator(root, config, space, net.to(device).eval(), digest.hexdigest())


def integrate(net: VelocityMLP, x0: torch.Tensor, solver: str, steps: int) -> torch.Tensor:
    """Return the flow's end point at t=1 from ``x0`` at t=0 (fixed steps, or adaptive dopri5)."""
    def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return net(x, t.expand(len(x)))

    times = torch.tensor([0.0, 1.0], device=x0.device)
    options = {"step_size": 1.0 / steps} if solver != "dopri5" else None
    kwargs = {"rtol": 1e-5, "atol": 1e-5} if solver == "dopri5" else {}
    with torch.no_grad():
        return odeint(velocity, x0, times, method=solver, options=options, **kwargs)[-1]


def sample(generator: Generator, out: Path, options: SampleOptions, device: torch.device, force: bool = False,
           progress: SampleProgress | None = None) -> dict[str, Any]:
    """Write ``options.count`` samples of ``generator`` to ``out``; return the manifest."""
    progress = progress or _Silent()
    if options.count < 1 or options.batch_size < 1:
        raise WgenError("-n and --batch-size must be at least 1", "e.g. -n 200 --batch-size 50")
    if options.solver not in SOLVERS:
        raise WgenError(f"unknown --solver {options.solver!r}", f"use one of {', '.join(SOLVERS)}")
    if options.steps < 1:
        raise WgenError("--steps must be at least 1", "e.g. --steps 20")
    calibration = _calibration_data(generator, options.calibrate) if options.calibrate else None
    run = {"generator_fingerprint": generator.fingerprint,
           **{k: v for k, v in asdict(options).items() if k != "batch_size"}}
    done = _prepare_output(out, run, force)
    started = time.perf_counter()
    net = generator.net.to(device)
    spec = generator.spec
    model = spec.create(device).eval()
    c = generator.config
    input_size = tuple(c["input_size"])
    check_x = torch.randn(4, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    width = max(3, len(str(options.count - 1)))
    entries: dict[int, dict[str, Any]] = {}
    progress.start(options.count, len(done))
    todo = [i for i in range(options.count) if i not in done]
    for start in range(0, len(todo), options.batch_size):
        batch = todo[start:start + options.batch_size]
        noise = torch.stack([torch.randn(generator.space.dim, generator=torch.Generator().manual_seed(_seed(options, i)))
                             for i in batch]).to(device)
        coords = integrate(net, noise, options.solver, options.steps)
        vectors = generator.space.vectors(coords.float())
        finite = torch.isfinite(vectors).all(dim=1).tolist()
        states = [generator.space.layout.unflatten(v) for v in vectors]
        outputs_ok = [False] * len(states)
        checkable = [s for s, ok in zip(states, finite) if ok]
        if checkable:
            outputs = stacked_forward(model, checkable, check_x)
            flags = iter(bool(torch.isfinite(o).all()) for o in outputs)
            outputs_ok = [next(flags) if ok else False for ok in finite]
        for i, state, ok_w, ok_o in zip(batch, states, finite, outputs_ok):
            name = f"sample-{i:0{width}d}"
            entry = {"name": name, "index": i, "seed": _seed(options, i), "rejected": None}
            if not ok_w or not ok_o:
                entry["rejected"] = "non-finite weights" if not ok_w else "non-finite outputs"
            else:
                state = {k: v.detach().cpu() for k, v in state.items()}
                if calibration is not None:
                    state = _calibrate(spec, state, calibration, device)
                config = member_config(spec, input_size, tuple(c["mean"]), tuple(c["std"]), {
                    "kind": "sample", "index": i, "seed": entry["seed"], "generator": str(generator.path),
                    "generator_fingerprint": generator.fingerprint, "solver": options.solver,
                    "steps": options.steps, "calibrated_on": options.calibrate})
                entry["files"] = write_member(out / name, state, config)
            entries[i] = entry
            _append_entry(out, entry)
        progress.advance(len(batch))
    for i, entry in done.items():
        entries[i] = entry
    ordered = [entries[i] for i in range(options.count)]
    manifest = {
        "format": "wgen.samples/1", "wgen_version": __version__, "generator": str(generator.path.resolve()),
        "generator_fingerprint": generator.fingerprint, **spec.to_json(), "count": options.count,
        "seed": options.seed, "sample_seed_rule": f"seed * {SAMPLE_SEED_STRIDE} + index", "solver": options.solver,
        "steps": options.steps, "batch_size": options.batch_size, "calibrate": options.calibrate,
        "device": str(device), "rejected": sum(e["rejected"] is not None for e in ordered),
        "seconds": round(time.perf_counter() - started, 3), "samples": ordered,
    }
    atomic_write_json(out / MANIFEST_JSON, manifest)
    (out / RUN_JSON).unlink(missing_ok=True)
    (out / ".entries.jsonl").unlink(missing_ok=True)
    return manifest


def _seed(options: SampleOptions, index: int) -> int:
    return options.seed * SAMPLE_SEED_STRIDE + index


def _prepare_output(out: Path, run: dict[str, Any], force: bool) -> dict[int, dict[str, Any]]:
    """Return entries of samples already written by an unfinished run with the same options."""
    if out.exists() and not out.is_dir():
        raise WgenError(f"{out}: exists and is not a folder", "choose another -o")
    if out.exists() and any(out.iterdir()):
        if force:
            shutil.rmtree(out)
        elif (out / RUN_JSON).is_file() and read_json(out / RUN_JSON) == run:
            for stale in out.glob(".sample-*.tmp-*"):  # members cut off mid-write
                shutil.rmtree(stale, ignore_errors=True)
            return _written_entries(out)
        else:
            raise WgenError(f"{out}: exists", "choose another -o, or pass --force to replace it")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RUN_JSON, run)
    return {}


def _append_entry(out: Path, entry: dict[str, Any]) -> None:
    log = out / ".entries.jsonl"
    cut_off = log.is_file() and log.stat().st_size > 0 and not log.read_bytes().endswith(b"\n")
    with open(log, "a") as handle:  # a line cut off by a kill must not swallow the next one
        handle.write(("\n" if cut_off else "") + json.dumps(entry) + "\n")


def _written_entries(out: Path) -> dict[int, dict[str, Any]]:
    entries: dict[int, dict[str, Any]] = {}
    log = out / ".entries.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut off by the kill
                continue
            if entry["rejected"] is not None or (out / entry["name"] / WEIGHTS_NAME).is_file():
                entries[int(entry["index"])] = entry
    return entries


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _calibration_data(generator: Generator, spec: str) -> Any:
    from ..data import data_for_zoo

    c = generator.config
    data = data_for_zoo({"data": c.get("data"), "split": c.get("split")}, spec, tuple(c["input_size"]))
    if data.num_classes != int(c["num_classes"]):
        raise WgenError(f"--calibrate {spec} has {data.num_classes} classes, the generator {c['num_classes']}",
                        "calibrate on the data the zoo was trained on")
    return data


def _calibrate(spec: ModelSpec, state: dict[str, torch.Tensor], data: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """Return ``state`` with BatchNorm statistics re-estimated on the train split (never the test split)."""
    from ..evaluate import reestimate_batchnorm

    model = spec.create(device)
    model.load_state_dict(state)
    reestimate_batchnorm(model, data, device)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}

"""Sampling: integrate the learned flow from noise, decode, check and write ready-to-use members.

Sample ``i`` starts from noise drawn with seed ``seed * 1_000_000 + i``, so it is the same whatever
the batch size, and a killed run resumes by skipping the samples already written. The flow is
integrated for up to 512 samples at once (their coordinates are small); the decoded weights go
``batch_size`` at a time and are written as they come, so memory stays flat as N grows.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
import torch
from torchdiffeq import odeint

from .. import __version__
from ..checkpoints import (CONFIG_NAME, WEIGHTS_NAME, ModelSpec, atomic_write_json, config_bytes, member_config, read_json,
                           write_member, write_member_files)
from ..errors import WgenError
from ..evaluate import forward_stacked
from .nets import NetConfig, VelocityMLP
from .space import WeightSpace, load_space
from .train import GENERATOR_FORMAT, SPACE_NAME
from .writer import PackedLayout

MANIFEST_JSON = "manifest.json"
RUN_JSON = ".sampling.json"  # options of an unfinished run, for resume
ENTRIES_LOG = ".entries.jsonl"  # samples an unfinished run has written
SOLVERS = ("euler", "midpoint", "rk4", "dopri5")
SAMPLE_SEED_STRIDE = 1_000_000
BLEND = "a blend of members"  # why an end point inside --min-radius is rejected
INTEGRATION_CHUNK = 512  # most samples integrated at once ...
INTEGRATION_BYTES = 64 << 20  # ... and most bytes for one ODE state (decoding goes --batch-size at a time)


@dataclass(frozen=True)
class SampleOptions:
    """How to sample: count, ODE solver and steps, batch size, seed, optional BN calibration data."""

    count: int = 100
    solver: str = "rk4"  # 4 evaluations a step: 20 in all, as many as midpoint x 10 (see docs/benchmarks.md)
    steps: int = 5
    batch_size: int = 50
    seed: int = 0
    calibrate: str | None = None
    project: bool = True  # pca spaces: end points back onto the training members' sphere (see space.py) ...
    min_radius: float = 0.8  # ... after rejecting those inside this fraction of it: blends, not members


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
        return net(x, t.reshape(1))  # one time for the whole batch: its embedding is computed once

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
    if not 0.0 <= options.min_radius < 1.0:
        raise WgenError(f"--min-radius must be in [0, 1), got {options.min_radius}", "e.g. 0.8, or 0 to keep every blend")
    calibration = _calibration_data(generator, options.calibrate) if options.calibrate else None
    run = {"generator_fingerprint": generator.fingerprint,
           **{k: v for k, v in asdict(options).items() if k != "batch_size"}}
    done = _prepare_output(out, run, force)
    started = time.perf_counter()
    writer = _BatchWriter(generator, out, options, device, calibration)
    entries = dict(done)
    progress.start(options.count, len(done))
    todo = [i for i in range(options.count) if i not in done]
    with _EntryLog(out / ENTRIES_LOG) as log:
        for chunk in _chunks(todo, _integration_chunk(generator.space.dim, options.batch_size)):
            coords, radii = writer.integrate(chunk)
            for start in range(0, len(chunk), options.batch_size):
                batch, end = chunk[start:start + options.batch_size], start + options.batch_size
                for entry in writer.write(batch, coords[start:end], radii[start:end]):
                    entries[entry["index"]] = entry
                    log.write(entry)
                progress.advance(len(batch))
    ordered = [entries[i] for i in range(options.count)]
    manifest = {
        "format": "wgen.samples/1", "wgen_version": __version__, "generator": str(generator.path.resolve()),
        "generator_fingerprint": generator.fingerprint, **generator.spec.to_json(), "count": options.count,
        "seed": options.seed, "sample_seed_rule": f"seed * {SAMPLE_SEED_STRIDE} + index", "solver": options.solver,
        "steps": options.steps, "projected": writer.projects, "min_radius": options.min_radius if writer.projects else None,
        "batch_size": options.batch_size, "calibrate": options.calibrate,
        "device": str(device), "rejected": sum(e["rejected"] is not None for e in ordered),
        "seconds": round(time.perf_counter() - started, 3), "samples": ordered,
    }
    atomic_write_json(out / MANIFEST_JSON, manifest)
    (out / RUN_JSON).unlink(missing_ok=True)
    (out / ENTRIES_LOG).unlink(missing_ok=True)
    return manifest


class _BatchWriter:
    """Integrates, packs, checks and writes the samples of one run, a batch at a time."""

    def __init__(self, generator: Generator, out: Path, options: SampleOptions, device: torch.device,
                 calibration: Any) -> None:
        self.generator, self.out, self.options, self.device, self.calibration = generator, out, options, device, calibration
        self.net = generator.net.to(device)
        self.packed = PackedLayout(generator.space.layout)
        self.model = generator.spec.create(device).eval()
        self.input_size = tuple(generator.config["input_size"])
        # one fixed random input: non-finite outputs of finite weights show on any
        self.check_x = torch.randn(1, *self.input_size, generator=torch.Generator().manual_seed(0)).to(device)
        self.width = max(3, len(str(options.count - 1)))
        self.projects = options.project and generator.space.projects
        self._buffer: torch.Tensor | None = None  # decoded rows of one batch, reused: written before the next

    def write(self, indices: list[int], coords: torch.Tensor, radii: list[float | None]) -> list[dict[str, Any]]:
        """Decode, check and write the samples ``indices`` at flow end points ``coords``; return their entries.

        ``radii`` are the end points' relative radii before projection (None where not projected).
        """
        if self._buffer is None or self._buffer.device != coords.device:
            self._buffer = torch.empty(self.options.batch_size, self.generator.space.layout.dim, device=coords.device)
        buffer = self._buffer[:len(coords)]  # the first rows of a contiguous tensor: contiguous
        values, finite = self.packed.pack(self.generator.space.vectors(coords, out=buffer))
        finite = finite.tolist()
        inside = [r is not None and r < self.options.min_radius for r in radii]
        keep = [ok and not blend for ok, blend in zip(finite, inside)]
        kept = [i for i, ok in enumerate(keep) if ok]
        outputs = torch.empty(0)
        if kept:
            rows = values if len(kept) == len(values) else values[kept]
            stacked = {k: v.to(self.device) for k, v in self.packed.stacked(rows).items()}
            outputs = forward_stacked(self.model, stacked, self.check_x)
        outputs_finite = iter(bool(torch.isfinite(o).all()) for o in outputs)
        entries = []
        for i, row, ok_w, blend, radius in zip(indices, values, finite, inside, radii):
            entry = {"name": f"sample-{i:0{self.width}d}", "index": i, "seed": _seed(self.options, i), "rejected": None}
            if radius is not None:
                entry["radius"] = round(radius, 4)
            if not ok_w:
                entry["rejected"] = "non-finite weights"
            elif blend:
                entry["rejected"] = f"{BLEND} (radius {radius:.2f} < --min-radius {self.options.min_radius})"
            elif not next(outputs_finite):
                entry["rejected"] = "non-finite outputs"
            else:
                entry["files"] = self._write_member(entry, row)
            entries.append(entry)
        return entries

    def integrate(self, indices: list[int]) -> tuple[torch.Tensor, list[float | None]]:
        """Return the flow's end points ``[len(indices), space.dim]`` for samples ``indices`` (on the device),
        projected when the space allows, and their relative radii before projection (None if not projected)."""
        dim = self.generator.space.dim
        noise = torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(_seed(self.options, i)))
                             for i in indices]).to(self.device)
        ends = integrate(self.net, noise, self.options.solver, self.options.steps).float()
        if not self.projects:
            return ends, [None] * len(indices)
        radii = self.generator.space.relative_radius(ends).tolist()
        return self.generator.space.project(ends), radii

    def _write_member(self, entry: dict[str, Any], row: torch.Tensor) -> dict[str, str]:
        g, c, options = self.generator, self.generator.config, self.options
        config = member_config(g.spec, self.input_size, tuple(c["mean"]), tuple(c["std"]), {
            "kind": "sample", "index": entry["index"], "seed": entry["seed"], "generator": str(g.path),
            "generator_fingerprint": g.fingerprint, "solver": options.solver, "steps": options.steps,
            "projected": self.projects, "calibrated_on": options.calibrate})
        if self.calibration is not None:
            state = _calibrate(g.spec, self.packed.state(row), self.calibration, self.device)
            return write_member(self.out / entry["name"], state, config)
        return write_member_files(self.out / entry["name"], {WEIGHTS_NAME: self.packed.file_chunks(row),
                                                             CONFIG_NAME: [config_bytes(config)]})


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _integration_chunk(dim: int, batch_size: int) -> int:
    """Samples integrated at once: many (large matrix products run faster) while the states stay small."""
    return max(batch_size, min(INTEGRATION_CHUNK, INTEGRATION_BYTES // (4 * dim)))


class _EntryLog:
    """The append-only log of samples written by an unfinished run, read back on resume."""

    def __init__(self, path: Path) -> None:
        cut_off = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self._handle = open(path, "a")
        if cut_off:  # a line cut off by a kill must not swallow the next one
            self._handle.write("\n")

    def write(self, entry: dict[str, Any]) -> None:
        self._handle.write(json.dumps(entry) + "\n")
        self._handle.flush()

    def __enter__(self) -> _EntryLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


def rejection_counts(entries: list[dict[str, Any]]) -> dict[str, int]:
    """Return how many of a manifest's ``entries`` were rejected for each reason (details dropped)."""
    return dict(Counter(e["rejected"].split(" (")[0] for e in entries if e.get("rejected")))


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


def _written_entries(out: Path) -> dict[int, dict[str, Any]]:
    entries: dict[int, dict[str, Any]] = {}
    log = out / ENTRIES_LOG
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

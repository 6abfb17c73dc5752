"""`wgen sample`: integrate the learned flow from noise, settle, decode, check and write ready-to-use members.

Sample ``i`` starts from noise drawn with seed ``seed * 1_000_000 + i``, so it is the same whatever
the batch size, and a killed run resumes by skipping the samples already written. The flow is
integrated for up to 512 samples at once (their coordinates are small); the decoded weights go
``batch_size`` at a time and are written as they come, so memory stays flat as N grows.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import CONFIG_NAME, WEIGHTS_NAME, config_bytes, member_config, read_json, write_member
from ..data import data_for_zoo, file_inputs
from ..errors import WgenError
from ..limits import check_all
from ..metrics import forward_stacked, has_batchnorm, recalibrated
from ..outputs import atomic_write_json, prepare_output, write_folder
from ..progress import SILENT, Progress
from ..tables import Summary
from ..version import __version__
from .generator import Generator
from .solve import SOLVERS, integrate
from .spaces.base import EndPoints
from .spaces.pca import BLEND
from .spaces.subspace import DrawnSpace
from .writer import PackedLayout

MANIFEST_JSON = "manifest.json"
RUN_JSON = ".sampling.json"  # options of the run, for resume (kept: a re-run of a finished one returns it)
ENTRIES_LOG = ".entries.jsonl"  # samples an unfinished run has written
SAMPLE_SEED_STRIDE = 1_000_000
INTEGRATION_CHUNK = 512  # most samples integrated at once ...
INTEGRATION_BYTES = 64 << 20  # ... and most bytes for one ODE state (decoding goes --batch-size at a time)
CHECK_BYTES = 256 << 20  # weights of the networks whose outputs are checked in one pass
MANY_BLENDS = 0.1  # warn when more end points than this share are blends: a healthy generator leaves ~0.3%


@dataclass(frozen=True)
class SampleOptions:
    """How to sample: count, ODE solver and steps, batch size, seed, optional BN calibration data."""

    count: int = 100
    solver: str = "rk4"  # 4 evaluations a step: 20 in all, as many as midpoint x 10 (see docs/benchmarks.md)
    steps: int = 5
    batch_size: int = 50
    seed: int = 0
    calibrate: str | None = None
    project: bool = True  # spaces that know the members' set (pca): end points back onto it ...
    min_radius: float = 0.8  # ... after rejecting those inside this fraction of it: blends, not members
    alpha: float | None = None  # drawn spaces: the Dirichlet parameter of the samples' mixes (None: the training's)

    def check(self) -> None:
        """Raise a WgenError for an option out of range."""
        if self.solver not in SOLVERS:
            raise WgenError(f"unknown --solver {self.solver!r}", f"use one of {', '.join(SOLVERS)}")
        check_all({"--count": self.count, "--batch-size": self.batch_size, "--steps": self.steps, "--seed": self.seed,
                   "--min-radius": self.min_radius, "--alpha": self.alpha})

    def run(self, generator: Generator) -> dict[str, Any]:
        """Return what decides the samples of a run (a run with the same values resumes this one)."""
        return {"generator_fingerprint": generator.fingerprint,
                **{k: v for k, v in asdict(self).items() if k != "batch_size"}}


def sample(generator: Generator, out: Path, options: SampleOptions, device: torch.device, force: bool = False,
           progress: Progress = SILENT) -> dict[str, Any]:
    """Write ``options.count`` samples of ``generator`` to ``out``; return the manifest.

    Re-running the same command resumes an unfinished run, and returns a finished one's manifest.
    """
    options.check()
    _set_alpha(generator, options.alpha)
    options = _with_calibration(generator, options)
    calibration = _calibration_data(generator, options.calibrate) if options.calibrate else None
    run = options.run(generator)
    inputs = [generator.path, *file_inputs(options.calibrate)]
    if prepare_output(out, "samples", inputs, force, lambda folder: _same_run(folder, run)):
        if (out / MANIFEST_JSON).is_file():
            return read_json(out / MANIFEST_JSON)
        for stale in out.glob(".sample-*.tmp-*"):  # members cut off mid-write
            shutil.rmtree(stale, ignore_errors=True)
    else:
        atomic_write_json(out / RUN_JSON, run)
    started = time.perf_counter()
    writer = _BatchWriter(generator, out, options, device, calibration)
    entries = _written_entries(out)
    progress.stage("sampling", options.count, len(entries))
    todo = [i for i in range(options.count) if i not in entries]
    with _EntryLog(out / ENTRIES_LOG) as log:
        for chunk in _chunks(todo, _integration_chunk(generator.space.numel, options.batch_size)):
            ends = writer.integrate(chunk)
            for start in range(0, len(chunk), options.batch_size):
                batch = chunk[start:start + options.batch_size]
                for entry in writer.write(batch, ends[start:start + options.batch_size]):
                    entries[entry["index"]] = entry
                    log.write(entry)
                progress.advance(len(batch))
    manifest = _manifest(generator, options, writer.projects, device, [entries[i] for i in range(options.count)],
                         time.perf_counter() - started)
    atomic_write_json(out / MANIFEST_JSON, manifest)
    (out / ENTRIES_LOG).unlink(missing_ok=True)
    return manifest


def _manifest(generator: Generator, options: SampleOptions, projects: bool, device: torch.device,
              entries: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    return {
        "format": "wgen.samples/1", "wgen_version": __version__, "generator": str(generator.path.resolve()),
        "generator_fingerprint": generator.fingerprint, **generator.spec.to_json(), "count": options.count,
        "seed": options.seed, "sample_seed_rule": f"seed * {SAMPLE_SEED_STRIDE} + index", "solver": options.solver,
        "steps": options.steps, "drawn": generator.space.drawn, "projected": projects,
        "alpha": generator.space.alpha if isinstance(generator.space, DrawnSpace) else None,
        "min_radius": options.min_radius if projects else None, "batch_size": options.batch_size,
        "calibrate": options.calibrate, "device": str(device), "rejected": sum(e["rejected"] is not None for e in entries),
        "seconds": round(seconds, 3), "samples": entries,
    }


def sample_summary(manifest: dict[str, Any], out: Path) -> Summary:
    """Return what ``wgen sample`` shows: how many were written and rejected (by reason), and what to watch."""
    reasons = rejection_counts(manifest["samples"])
    kept = manifest["count"] - manifest["rejected"]
    how = "drawn, no flow" if manifest.get("drawn") else f"{manifest['solver']}, {manifest['steps']} steps"
    line = (f"{kept} samples written to {out} ({how}) in "
            f"{manifest['seconds']:.1f}s; {manifest['rejected']} rejected" + (f" ({reason_text(reasons)})" if reasons else ""))
    warnings = []
    if manifest["rejected"]:
        warnings.append(f"{manifest['rejected']} samples were rejected; see {out}/manifest.json")
    if reasons.get(BLEND, 0) > MANY_BLENDS * manifest["count"]:
        warnings.append("many end points fell between members: the generator looks under-trained "
                        "(train longer), or lower --min-radius")
    return Summary(lines=[line], warnings=warnings)


def reason_text(reasons: dict[str, int]) -> str:
    """Return rejection counts as text, e.g. ``2 a blend of members, 1 non-finite weights``."""
    return ", ".join(f"{n} {reason}" for reason, n in reasons.items())


def rejection_counts(entries: list[dict[str, Any]]) -> dict[str, int]:
    """Return how many of a manifest's ``entries`` were rejected for each reason (details dropped)."""
    return dict(Counter(e["rejected"].split(" (")[0] for e in entries if e.get("rejected")))


class _BatchWriter:
    """Integrates, settles, packs, checks and writes the samples of one run, a batch at a time."""

    def __init__(self, generator: Generator, out: Path, options: SampleOptions, device: torch.device,
                 calibration: Any) -> None:
        self.generator, self.out, self.options, self.device, self.calibration = generator, out, options, device, calibration
        self.net = generator.net.to(device)
        self.packed = PackedLayout(generator.space.layout)
        self.model = generator.spec.create(device).eval()
        self.input_size = tuple(generator.config.input_size)
        # one fixed random input: non-finite outputs of finite weights show on any
        self.check_x = torch.randn(1, *self.input_size, generator=torch.Generator().manual_seed(0)).to(device)
        self.width = max(3, len(str(options.count - 1)))
        self.projects = options.project and generator.space.projects
        self._buffer: torch.Tensor | None = None  # decoded rows of one batch, reused: written before the next

    def integrate(self, indices: list[int]) -> EndPoints:
        """Return the settled flow end points of samples ``indices`` (on the device)."""
        space = self.generator.space
        noise = torch.stack([torch.randn(*space.shape, generator=torch.Generator().manual_seed(_seed(self.options, i)))
                             for i in indices]).to(self.device)
        ends = integrate(self.net, noise, self.options.solver, self.options.steps).float()
        return space.settle(ends, self.options.min_radius) if self.projects else EndPoints.as_they_are(ends)

    def write(self, indices: list[int], ends: EndPoints) -> list[dict[str, Any]]:
        """Decode, check and write the samples ``indices`` at settled end points ``ends``; return their entries."""
        space = self.generator.space
        if self._buffer is None or self._buffer.device != ends.coords.device:
            self._buffer = torch.empty(self.options.batch_size, space.layout.dim, device=ends.coords.device)
        buffer = self._buffer[:len(indices)]  # the first rows of a contiguous tensor: contiguous
        values, finite = self.packed.pack(space.vectors(ends.coords, out=buffer))
        reasons = ["non-finite weights" if not ok else why for ok, why in zip(finite.tolist(), ends.rejected)]
        outputs_finite = self._outputs_finite(values, [r is None for r in reasons])
        entries = []
        for i, row, note, reason in zip(indices, values, ends.notes, reasons):
            entry = {"name": f"sample-{i:0{self.width}d}", "index": i, "seed": _seed(self.options, i), "rejected": None,
                     **note}
            if reason is None and not next(outputs_finite):
                reason = "non-finite outputs"
            entry["rejected"] = reason
            if reason is None:
                entry["files"] = self._write_member(entry, row)
            entries.append(entry)
        return entries

    def _outputs_finite(self, values: torch.Tensor, keep: list[bool]) -> Any:
        """Return an iterator over the kept rows: whether the network's outputs on the check input are finite.

        The kept networks run together (vmap), as many at a time as CHECK_BYTES of weights: vmapped
        convolutions copy every model's weights, which for a batch of resnet18s would double the memory.
        """
        kept = [i for i, ok in enumerate(keep) if ok]
        per_pass = max(1, CHECK_BYTES // (4 * values.shape[1]))
        finite: list[bool] = []
        for start in range(0, len(kept), per_pass):
            part = kept[start:start + per_pass]
            rows = values[part[0]:part[-1] + 1] if part[-1] - part[0] + 1 == len(part) else values[part]
            stacked = {k: v.to(self.device) for k, v in self.packed.stacked(rows).items()}
            finite += [bool(torch.isfinite(o).all()) for o in forward_stacked(self.model, stacked, self.check_x)]
        return iter(finite)

    def _write_member(self, entry: dict[str, Any], row: torch.Tensor) -> dict[str, str]:
        g, options = self.generator, self.options
        config = member_config(g.spec, self.input_size, tuple(g.config.mean), tuple(g.config.std), {
            "kind": "sample", "index": entry["index"], "seed": entry["seed"], "generator": str(g.path),
            "generator_fingerprint": g.fingerprint, "solver": options.solver, "steps": options.steps,
            "projected": self.projects, "calibrated_on": options.calibrate})
        if self.calibration is not None:
            state = recalibrated(g.spec, [self.packed.state(row)], self.calibration, self.device)[0]
            return write_member(self.out / entry["name"], state, config)
        return write_folder(self.out / entry["name"], {WEIGHTS_NAME: self.packed.file_chunks(row),
                                                       CONFIG_NAME: [config_bytes(config)]})


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _integration_chunk(numel: int, batch_size: int) -> int:
    """Samples integrated at once: many (large matrix products run faster) while the states stay small."""
    return max(batch_size, min(INTEGRATION_CHUNK, INTEGRATION_BYTES // (4 * numel)))


def _seed(options: SampleOptions, index: int) -> int:
    return options.seed * SAMPLE_SEED_STRIDE + index


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


def _same_run(out: Path, run: dict[str, Any]) -> bool:
    """Return whether ``out`` holds samples of this run (finished or not); raise naming what differs."""
    if not (out / RUN_JSON).is_file():
        return False
    differing = sorted(k for k, v in run.items() if read_json(out / RUN_JSON).get(k) != v)
    if differing:
        raise WgenError(f"{out}: holds samples drawn with other settings ({', '.join(differing)})",
                        "re-run with the same settings to resume, choose another -o, or pass --force to replace it")
    return True


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


def _set_alpha(generator: Generator, alpha: float | None) -> None:
    """Draw the samples' mixes with Dirichlet(``alpha``) (None: as trained, also after an earlier run's override),
    or raise a WgenError for a space that draws none."""
    if isinstance(generator.space, DrawnSpace):
        generator.space.sample_alpha = alpha
    elif alpha is not None:
        raise WgenError(f"--alpha sets the mixes of drawn spaces (subspace, codes), not of a {generator.space.kind} generator",
                        "leave --alpha out for this generator")


def _with_calibration(generator: Generator, options: SampleOptions) -> SampleOptions:
    """Return ``options``, calibrating on the generator's own data when its space decodes stale BatchNorm
    statistics (``space.calibrates``) and no --calibrate was given."""
    if options.calibrate is not None or not generator.space.calibrates or not has_batchnorm(generator.spec.create("cpu")):
        return options
    if generator.config.data is None:
        raise WgenError(f"the {generator.space.kind} generator's samples need BatchNorm statistics, and it records no data",
                        "pass --calibrate SPEC (the dataset the zoo was trained on)")
    return replace(options, calibrate=generator.config.data)


def _calibration_data(generator: Generator, spec: str) -> Any:
    c = generator.config
    data = data_for_zoo({"data": c.data, "split": c.split}, spec, tuple(c.input_size))
    if data.num_classes != c.spec.num_classes:
        raise WgenError(f"--calibrate {spec} has {data.num_classes} classes, the generator {c.spec.num_classes}",
                        "calibrate on the data the zoo was trained on")
    return data

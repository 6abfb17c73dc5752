"""Canonicalize a zoo: align every member to one template, verify each, write a canonical zoo.

The output is written to a hidden temporary folder and renamed into place when everything is done,
so a killed run leaves no half-written zoo (re-running starts again; it is fast).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..checkpoints import (ZOO_JSON, MemberRef, StateDict, Zoo, atomic_dir, atomic_write_json, member_config,
                           write_member, zoo_fingerprint)
from ..errors import WgenError
from ..progress import SilentStages, StageProgress
from .groups import PermSpec, derive_groups
from .match import Alignment, align_to_target, apply_alignment, identity_alignment, merge_many

CANONICAL_JSON = "canonicalize.json"
METHODS = ("weight-matching", "none")
VERIFY_TOLERANCE = 1e-4
VERIFY_BATCH = 8
# Below this many (members x parameters) starting worker processes costs more than it saves.
PARALLEL_MIN_WORK = 30_000_000


@dataclass(frozen=True)
class CanonOptions:
    """How to canonicalize: method, template (``first``, an index, or ``barycenter``), restarts, seed."""

    method: str = "weight-matching"
    template: str = "first"
    restarts: int = 1
    seed: int = 0
    data: str | None = None  # with a dataset, also measure the interpolation barrier
    barrier_pairs: int = 3


def parse_template(template: str, count: int) -> int | None:
    """Return the template member index, or None for ``barycenter``."""
    if template == "barycenter":
        return None
    if template == "first":
        return 0
    if template.isdigit() and int(template) < count:
        return int(template)
    raise WgenError(f"--template {template!r} is not first, barycenter or a member index below {count}",
                    "e.g. --template 3")


def canonicalize(zoo: Zoo, out: Path, options: CanonOptions, device: torch.device, force: bool = False,
                 progress: StageProgress | None = None) -> dict[str, Any]:
    """Write the canonical form of ``zoo`` to ``out``; return the report stored in canonicalize.json."""
    progress = progress or SilentStages()
    if options.method not in METHODS:
        raise WgenError(f"unknown --method {options.method!r}", f"use one of {', '.join(METHODS)}")
    template_index = parse_template(options.template, len(zoo.members))
    if options.restarts < 1:
        raise WgenError("--restarts must be at least 1", "e.g. --restarts 3")
    if options.barrier_pairs < 1:
        raise WgenError("--barrier-pairs must be at least 1", "e.g. --barrier-pairs 3")
    _check_output(out, zoo.root, force)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    input_size, mean, std = zoo.preprocessing()
    progress.stage("loading members", len(zoo.members))
    states = []
    for member in zoo.members:
        states.append(zoo.load(member))
        progress.advance()
    timings["load"] = _lap(clock)

    clock = time.perf_counter()
    model = zoo.spec.create("cpu")
    spec = derive_groups(model, input_size) if options.method != "none" else PermSpec()
    timings["groups"] = _lap(clock)
    score_keys = {k for k, _ in model.named_parameters()}

    clock = time.perf_counter()
    on_device = [{k: v.to(device) for k, v in s.items()} for s in states]
    progress.stage("matching", len(states))
    if options.method == "none" or not (spec.groups or spec.heads):
        alignments = [identity_alignment(spec, s) for s in states]
    elif template_index is None:
        alignments = merge_many(spec, on_device, score_keys, options.restarts,
                                generator=torch.Generator().manual_seed(options.seed))
    else:
        alignments = _align_to_template(spec, on_device, template_index, score_keys, options, device, progress)
    canonical = [{k: v.cpu() for k, v in apply_alignment(s, a).items()} for s, a in zip(on_device, alignments)]
    timings["match"] = _lap(clock)

    clock = time.perf_counter()
    progress.stage("verifying", len(states))
    max_rel_diff = []
    for member, source, result in zip(zoo.members, states, canonical):
        max_rel_diff.append(verify_same_function(zoo, member, source, result, input_size, device))
        progress.advance()
    timings["verify"] = _lap(clock)

    distances = _distances(states, canonical, score_keys, template_index)
    barrier = None
    if options.data is not None:
        clock = time.perf_counter()
        progress.stage("interpolation barrier", 2 * options.barrier_pairs)
        barrier = _barriers(zoo, states, canonical, options, input_size, device, progress)
        timings["barrier"] = _lap(clock)

    report = {
        "format": "wgen.canonicalize/1", "wgen_version": __version__, "method": options.method,
        "template": options.template, "template_index": template_index, "restarts": options.restarts,
        "seed": options.seed, "device": str(device), "source": str(zoo.root),
        "source_fingerprint": zoo_fingerprint(zoo, states), "architecture": zoo.spec.architecture,
        "groups": {**spec.summary(),
                   "plain": [{"name": g.name, "size": g.size, "axes": len(g.axes), "blocks": g.blocks}
                             for g in spec.groups],
                   "attention": [{"module": h.name, "heads": h.num_heads, "head_dim": h.head_dim,
                                  "shared_qk": h.shared_qk} for h in spec.heads]},
        "members": [{"name": m.name, "source": str(m.weights), "max_rel_diff": d,
                     "l2_to_template_before": b, "l2_to_template_after": a}
                    for m, d, b, a in zip(zoo.members, max_rel_diff, distances["to_template_before"],
                                          distances["to_template_after"])],
        "mean_pairwise_l2_before": distances["mean_pairwise_before"],
        "mean_pairwise_l2_after": distances["mean_pairwise_after"],
        "pairwise_reduction": 1 - distances["mean_pairwise_after"] / max(distances["mean_pairwise_before"], 1e-30),
        "verify_tolerance": VERIFY_TOLERANCE, "barrier": barrier, "timings": timings,
    }
    clock = time.perf_counter()
    progress.stage("writing", len(states))
    with atomic_dir(out) as tmp:
        for member, result in zip(zoo.members, canonical):
            config = dict(member.config) if member.config else member_config(zoo.spec, input_size, mean, std)
            config["wgen"] = {**config.get("wgen", {}), "version": __version__, "kind": "canonical-member",
                              "canonical_source": str(member.weights)}
            write_member(tmp / member.name, result, config)
            progress.advance()
        atomic_write_json(tmp / ZOO_JSON, _zoo_json(zoo, input_size, mean, std))
        report["timings"]["write"] = _lap(clock)
        atomic_write_json(tmp / CANONICAL_JSON, report)
    return report


def _align_to_template(spec: PermSpec, states: list[StateDict], template_index: int, score_keys: set[str],
                       options: CanonOptions, device: torch.device, progress: StageProgress) -> list[Alignment]:
    """Align every member to the template; on CPU, spread members over processes (one per core)."""
    jobs = [i for i in range(len(states)) if i != template_index]
    workers = min(len(jobs), os.cpu_count() or 1) if device.type == "cpu" else 1
    results: dict[int, Alignment] = {template_index: identity_alignment(spec, states[template_index])}
    args = [(spec, states[template_index], states[i], score_keys, options.restarts, options.seed + i) for i in jobs]
    work = len(jobs) * sum(states[template_index][k].numel() for k in score_keys)
    if workers > 1 and work >= PARALLEL_MIN_WORK:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                 initargs=(max(1, torch.get_num_threads() // workers),)) as pool:
            for i, alignment in zip(jobs, pool.map(_align_one, args)):
                results[i] = alignment
                progress.advance()
    else:
        for i, job in zip(jobs, args):
            results[i] = _align_one(job)
            progress.advance()
    progress.advance()  # the template itself
    return [results[i] for i in range(len(states))]


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _align_one(job: tuple) -> Alignment:
    spec, template, member, score_keys, restarts, seed = job
    generator = torch.Generator().manual_seed(seed)
    return align_to_target(spec, template, member, score_keys, restarts, generator).alignment


def verify_same_function(zoo: Zoo, member: MemberRef, source: StateDict, result: StateDict,
                         input_size: tuple[int, int, int], device: torch.device) -> float:
    """Return max |output difference| / output scale of ``result`` vs ``source``; raise above tolerance."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(VERIFY_BATCH, *input_size, generator=generator).to(device)
    model = zoo.spec.create(device).eval()
    with torch.no_grad():
        model.load_state_dict(source)
        expected = model(x).float()
        model.load_state_dict(result)
        got = model(x).float()
    scale = float(expected.abs().max().clamp_min(1e-12))
    rel = float((got - expected).abs().max()) / scale
    if not rel <= VERIFY_TOLERANCE:
        raise WgenError(f"{member.name}: the permuted member computes a different function "
                        f"(max |diff| {rel:.2e} of the output scale, tolerance {VERIFY_TOLERANCE:g})",
                        "this is a wgen bug for this architecture; use --method none and report it")
    return rel


def _check_output(out: Path, source: Path, force: bool) -> None:
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise WgenError(f"{out}: the output may not be the input zoo or lie inside it", "choose another -o")
    if out.exists() and not out.is_dir():
        raise WgenError(f"{out}: exists and is not a folder", "choose another -o")
    if out.exists() and any(out.iterdir()) and not force:
        raise WgenError(f"{out}: exists", "choose another -o, or pass --force to replace it")


def _zoo_json(zoo: Zoo, input_size: tuple[int, ...], mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    members = []
    for m in zoo.members:
        p = m.provenance
        members.append({"name": m.name, **{k: p[k] for k in ("seed", "val_accuracy", "test_accuracy") if k in p}})
    base = {k: v for k, v in zoo.info.items() if k != "members"}
    return {**base, "format": base.get("format", "wgen.zoo/1"), **zoo.spec.to_json(),
            "input_size": list(input_size), "mean": list(mean), "std": list(std), "canonical": True,
            "members": members}


def _flat(state: StateDict, keys: list[str]) -> torch.Tensor:
    return torch.cat([state[k].reshape(-1).double() for k in keys])


def _distances(before: list[StateDict], after: list[StateDict], score_keys: set[str],
               template_index: int | None) -> dict[str, Any]:
    keys = sorted(score_keys)
    out: dict[str, Any] = {}
    for label, states in (("before", before), ("after", after)):
        flat = torch.stack([_flat(s, keys) for s in states])
        template = flat[template_index] if template_index is not None else flat.mean(dim=0)
        out[f"to_template_{label}"] = [float(v) for v in (flat - template).norm(dim=1)]
        n = len(states)
        pairwise = torch.cdist(flat, flat)
        out[f"mean_pairwise_{label}"] = float(pairwise.sum() / (n * (n - 1))) if n > 1 else 0.0
    return out


def _barriers(zoo: Zoo, before: list[StateDict], after: list[StateDict], options: CanonOptions,
              input_size: tuple[int, int, int], device: torch.device, progress: StageProgress) -> dict[str, Any]:
    from ..data import data_for_zoo
    from ..evaluate import loss_and_accuracy, reestimate_batchnorm

    data = data_for_zoo(zoo.info, options.data, input_size)
    if data.num_classes != zoo.spec.num_classes:
        raise WgenError(f"dataset {options.data} has {data.num_classes} classes, the zoo {zoo.spec.num_classes}",
                        "measure the barrier on the data the zoo was trained on")
    n = len(before)
    if n < 2:
        return {"pairs": [], "note": "needs at least two members"}
    generator = torch.Generator().manual_seed(options.seed)
    pairs = []
    while len(pairs) < min(options.barrier_pairs, n * (n - 1) // 2):
        i, j = sorted(torch.randperm(n, generator=generator)[:2].tolist())
        if (i, j) not in pairs:
            pairs.append((i, j))
    model = zoo.spec.create(device)
    float_keys = [k for k, v in before[0].items() if v.is_floating_point()]
    result: dict[str, Any] = {"split": "test", "points": 11, "pairs": [list(p) for p in pairs]}
    for label, states in (("before", before), ("after", after)):
        curves = []
        for i, j in pairs:
            losses, accs = [], []
            for step in range(11):
                t = step / 10
                mixed = dict(states[i])
                mixed.update({k: (1 - t) * states[i][k] + t * states[j][k] for k in float_keys})
                model.load_state_dict(mixed)
                reestimate_batchnorm(model, data, device)
                loss, acc = loss_and_accuracy(model, data, "test", device)
                losses.append(loss)
                accs.append(acc)
            barrier = max(losses[s] - ((1 - s / 10) * losses[0] + s / 10 * losses[-1]) for s in range(11))
            curves.append({"loss": losses, "accuracy": accs, "loss_barrier": barrier,
                           "accuracy_drop": min(accs[0], accs[-1]) - min(accs)})
            progress.advance()
        result[label] = {"curves": curves,
                         "mean_loss_barrier": sum(c["loss_barrier"] for c in curves) / len(curves),
                         "mean_accuracy_drop": sum(c["accuracy_drop"] for c in curves) / len(curves)}
    return result


def _lap(start: float) -> float:
    return round(time.perf_counter() - start, 4)


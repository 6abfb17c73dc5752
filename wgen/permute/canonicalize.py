"""Canonicalize a zoo: align every member to one template, verify each, write a canonical zoo.

The output is written to a hidden temporary folder and renamed into place when everything is done,
so a killed run leaves no half-written zoo (re-running starts again; it is fast); re-running on a
finished output of the same zoo and settings returns its report.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import ZOO_JSON, MemberRef, StateDict, Zoo, member_config, read_json, write_member, zoo_fingerprint
from ..data import SplitData, data_for_zoo, file_inputs
from ..errors import WgenError
from ..limits import check_all
from ..metrics import flatten, loss_and_accuracy, reestimate_batchnorm
from ..outputs import atomic_dir, atomic_write_json, check_output, write_marker
from ..progress import SILENT, Progress
from ..tables import Summary, TextTable, pct
from ..version import __version__
from .groups import PermSpec, derive_groups
from .match import Alignment, align_to_target, apply_alignment, identity_alignment, merge_many

CANONICAL_JSON = "canonicalize.json"
METHODS = ("weight-matching", "none")
VERIFY_TOLERANCE = 1e-4
VERIFY_BATCH = 8
BARRIER_POINTS = 11
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

    def check(self, members: int) -> int | None:
        """Raise a WgenError for an option out of range; return the template's member index (None: barycenter)."""
        if self.method not in METHODS:
            raise WgenError(f"unknown --method {self.method!r}", f"use one of {', '.join(METHODS)}")
        check_all({"--restarts": self.restarts, "--barrier-pairs": self.barrier_pairs, "--seed": self.seed})
        return parse_template(self.template, members)


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
                 progress: Progress = SILENT) -> dict[str, Any]:
    """Write the canonical form of ``zoo`` to ``out``; return the report stored in canonicalize.json.

    Re-running on a finished output of the same zoo and settings returns its report.
    """
    template_index = options.check(len(zoo.members))
    action = check_output(out, [zoo.root, *file_inputs(options.data)], force, lambda folder: _same_run(folder, zoo, options))
    if action == "resume":
        return read_json(out / CANONICAL_JSON)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    progress.stage("loading members", len(zoo.members))
    states = []
    for member in zoo.members:
        states.append(zoo.load(member))
        progress.advance()
    timings["load"] = _lap(clock)
    model = zoo.spec.create("cpu")
    clock = time.perf_counter()
    spec = derive_groups(model, zoo.preprocessing()[0]) if options.method != "none" else PermSpec()
    timings["groups"] = _lap(clock)
    score_keys = sorted(k for k, _ in model.named_parameters())
    clock = time.perf_counter()
    canonical = _align(spec, states, template_index, set(score_keys), options, device, progress)
    timings["match"] = _lap(clock)
    clock = time.perf_counter()
    max_rel_diff = _verify(zoo, states, canonical, device, progress)
    timings["verify"] = _lap(clock)
    barrier = None
    if options.data is not None:
        clock = time.perf_counter()
        progress.stage("interpolation barrier", 2 * options.barrier_pairs)
        barrier = _barriers(zoo, states, canonical, options, device, progress)
        timings["barrier"] = _lap(clock)
    report = _report(zoo, options, template_index, spec, states, canonical, score_keys, max_rel_diff, barrier,
                     timings, device)
    _write(zoo, out, canonical, report, progress)
    return report


def _same_run(out: Path, zoo: Zoo, options: CanonOptions) -> bool:
    """Return whether ``out`` is the finished canonical form of ``zoo`` with ``options``; raise if it is of another run."""
    if not (out / CANONICAL_JSON).is_file():
        return False
    recorded = read_json(out / CANONICAL_JSON)
    if recorded.get("source_fingerprint") != zoo_fingerprint(zoo) or recorded.get("options") != asdict(options):
        raise WgenError(f"{out}: holds a canonical zoo of another zoo or made with other settings",
                        "choose another -o, or pass --force to replace it")
    return True


def _align(spec: PermSpec, states: list[StateDict], template_index: int | None, score_keys: set[str],
           options: CanonOptions, device: torch.device, progress: Progress) -> list[StateDict]:
    """Return every member permuted into the template's frame (CPU state dicts)."""
    on_device = [{k: v.to(device) for k, v in s.items()} for s in states]
    progress.stage("matching", len(states))
    if options.method == "none" or not (spec.groups or spec.heads):
        alignments = [identity_alignment(spec, s) for s in states]
        progress.advance(len(states))
    elif template_index is None:
        alignments = merge_many(spec, on_device, score_keys, options.restarts,
                                generator=torch.Generator().manual_seed(options.seed))
        progress.advance(len(states))
    else:
        alignments = _align_to_template(spec, on_device, template_index, score_keys, options, device, progress)
    return [{k: v.cpu() for k, v in apply_alignment(s, a).items()} for s, a in zip(on_device, alignments)]


def _verify(zoo: Zoo, sources: list[StateDict], results: list[StateDict], device: torch.device,
            progress: Progress) -> list[float]:
    """Return each member's max relative output difference after permutation; raise above tolerance."""
    progress.stage("verifying", len(sources))
    input_size = zoo.preprocessing()[0]
    diffs = []
    for member, source, result in zip(zoo.members, sources, results):
        diffs.append(verify_same_function(zoo, member, source, result, input_size, device))
        progress.advance()
    return diffs


def _report(zoo: Zoo, options: CanonOptions, template_index: int | None, spec: PermSpec, before: list[StateDict],
            after: list[StateDict], score_keys: list[str], max_rel_diff: list[float], barrier: dict[str, Any] | None,
            timings: dict[str, float], device: torch.device) -> dict[str, Any]:
    distances = _distances(before, after, score_keys, template_index)
    return {
        "format": "wgen.canonicalize/1", "wgen_version": __version__, "method": options.method,
        "template": options.template, "template_index": template_index, "restarts": options.restarts,
        "seed": options.seed, "options": asdict(options), "device": str(device), "source": str(zoo.root),
        "source_fingerprint": zoo_fingerprint(zoo, before), "architecture": zoo.spec.architecture,
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


def _write(zoo: Zoo, out: Path, canonical: list[StateDict], report: dict[str, Any], progress: Progress) -> None:
    """Write the canonical zoo at ``out`` in one atomic rename (an earlier output stays until it is in)."""
    clock = time.perf_counter()
    input_size, mean, std = zoo.preprocessing()
    progress.stage("writing", len(canonical))
    with atomic_dir(out) as tmp:
        write_marker(tmp, "canonical zoo")
        for member, result in zip(zoo.members, canonical):
            config = dict(member.config) if member.config else member_config(zoo.spec, input_size, mean, std)
            config["wgen"] = {**config.get("wgen", {}), "version": __version__, "kind": "canonical-member",
                              "canonical_source": str(member.weights)}
            write_member(tmp / member.name, result, config)
            progress.advance()
        atomic_write_json(tmp / ZOO_JSON, _zoo_json(zoo, input_size, mean, std))
        report["timings"]["write"] = _lap(clock)
        atomic_write_json(tmp / CANONICAL_JSON, report)


def _align_to_template(spec: PermSpec, states: list[StateDict], template_index: int, score_keys: set[str],
                       options: CanonOptions, device: torch.device, progress: Progress) -> list[Alignment]:
    """Align every member to the template; on CPU, spread members over processes (one per core)."""
    jobs = [i for i in range(len(states)) if i != template_index]
    workers = min(len(jobs), torch.get_num_threads()) if device.type == "cpu" else 1  # the threads this run was given
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


def _zoo_json(zoo: Zoo, input_size: tuple[int, ...], mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    members = []
    for m in zoo.members:
        p = m.provenance
        members.append({"name": m.name, **{k: p[k] for k in ("seed", "val_accuracy", "test_accuracy") if k in p}})
    base = {k: v for k, v in zoo.info.items() if k != "members"}
    return {**base, "format": base.get("format", "wgen.zoo/1"), **zoo.spec.to_json(),
            "input_size": list(input_size), "mean": list(mean), "std": list(std), "canonical": True,
            "members": members}


def _distances(before: list[StateDict], after: list[StateDict], keys: list[str],
               template_index: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, states in (("before", before), ("after", after)):
        flat = flatten(states, keys, torch.float64)
        template = flat[template_index] if template_index is not None else flat.mean(dim=0)
        out[f"to_template_{label}"] = [float(v) for v in (flat - template).norm(dim=1)]
        n = len(states)
        pairwise = torch.cdist(flat, flat)
        out[f"mean_pairwise_{label}"] = float(pairwise.sum() / (n * (n - 1))) if n > 1 else 0.0
    return out


def _barriers(zoo: Zoo, before: list[StateDict], after: list[StateDict], options: CanonOptions,
              device: torch.device, progress: Progress) -> dict[str, Any]:
    """Return loss and accuracy along the straight line of random member pairs, before and after alignment."""
    data = data_for_zoo(zoo.info, options.data, zoo.preprocessing()[0])
    if data.num_classes != zoo.spec.num_classes:
        raise WgenError(f"dataset {options.data} has {data.num_classes} classes, the zoo {zoo.spec.num_classes}",
                        "measure the barrier on the data the zoo was trained on")
    if len(before) < 2:
        return {"pairs": [], "note": "needs at least two members"}
    pairs = _random_pairs(len(before), options.barrier_pairs, options.seed)
    model = zoo.spec.create(device)
    result: dict[str, Any] = {"split": "test", "points": BARRIER_POINTS, "pairs": [list(p) for p in pairs]}
    for label, states in (("before", before), ("after", after)):
        curves = []
        for i, j in pairs:
            curves.append(_interpolation_curve(model, states[i], states[j], data, device))
            progress.advance()
        result[label] = {"curves": curves,
                         "mean_loss_barrier": sum(c["loss_barrier"] for c in curves) / len(curves),
                         "mean_accuracy_drop": sum(c["accuracy_drop"] for c in curves) / len(curves)}
    return result


def _random_pairs(n: int, count: int, seed: int) -> list[tuple[int, int]]:
    generator = torch.Generator().manual_seed(seed)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < min(count, n * (n - 1) // 2):
        i, j = sorted(torch.randperm(n, generator=generator)[:2].tolist())
        if (i, j) not in pairs:
            pairs.append((i, j))
    return pairs


def _interpolation_curve(model: torch.nn.Module, a: StateDict, b: StateDict, data: SplitData,
                         device: torch.device) -> dict[str, Any]:
    """Return test loss and accuracy at evenly spaced points from ``a`` to ``b`` (BatchNorm re-estimated at each)."""
    losses, accs = [], []
    for step in range(BARRIER_POINTS):
        t = step / (BARRIER_POINTS - 1)
        model.load_state_dict({k: (1 - t) * v + t * b[k] if v.is_floating_point() else v for k, v in a.items()})
        reestimate_batchnorm(model, data, device)
        loss, acc = loss_and_accuracy(model, data, "test", device)
        losses.append(loss)
        accs.append(acc)
    last = BARRIER_POINTS - 1
    barrier = max(losses[s] - ((1 - s / last) * losses[0] + s / last * losses[-1]) for s in range(BARRIER_POINTS))
    return {"loss": losses, "accuracy": accs, "loss_barrier": barrier, "accuracy_drop": min(accs[0], accs[-1]) - min(accs)}


def _lap(start: float) -> float:
    return round(time.perf_counter() - start, 4)



def canonical_summary(report: dict[str, Any], out: Path) -> Summary:
    """Return what ``wgen canonicalize`` shows: groups found, distances to the template, barrier, timings."""
    g = report["groups"]
    table = TextTable(f"canonical zoo {out}", ["member", "L2 to template before", "after", "max |diff| / scale"])
    for m in report["members"]:
        table.rows.append([m["name"], f"{m['l2_to_template_before']:.3f}", f"{m['l2_to_template_after']:.3f}",
                           f"{m['max_rel_diff']:.1e}"])
    after = [f"mean pairwise L2: {report['mean_pairwise_l2_before']:.3f} -> {report['mean_pairwise_l2_after']:.3f} "
             f"({100 * report['pairwise_reduction']:.1f}% lower)"]
    b = report["barrier"]
    if b and b.get("before"):
        after.append(f"loss barrier ({len(b['pairs'])} pairs, test split): {b['before']['mean_loss_barrier']:.3f} -> "
                     f"{b['after']['mean_loss_barrier']:.3f}; accuracy drop {pct(b['before']['mean_accuracy_drop'])} -> "
                     f"{pct(b['after']['mean_accuracy_drop'])}")
    after.append("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in report["timings"].items()))
    line = (f"{report['architecture']}: {g['groups']} permutation groups ({g['units']} units), {g['head_groups']} "
            f"attention modules ({g['heads']} heads); template {report['template']}, device {report['device']}")
    return Summary(lines=[line], tables=[table], after=after)

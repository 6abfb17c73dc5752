"""The ``wgen`` command line: parse, call one library function, render the result with rich."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .errors import WgenError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Generate ensembles of ready-to-use timm networks from a zoo of checkpoints.")
console = Console()
err_console = Console(stderr=True)

DeviceOption = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N (auto = cuda if available)")]
ArchOption = Annotated[Optional[str], typer.Option("--arch", "-a", help="timm architecture of flat checkpoint files")]
ModelArgsOption = Annotated[Optional[str], typer.Option("--model-args", help='timm model args as JSON, e.g. \'{"in_chans": 1}\'')]
JsonOption = Annotated[bool, typer.Option("--json", help="print the result as JSON")]
SkipBadOption = Annotated[bool, typer.Option("--skip-bad", help="drop unreadable or mismatching members with a warning")]
ForceOption = Annotated[bool, typer.Option(help="replace an existing output")]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a WgenError into one red line plus its hint, and exit status 2."""
    try:
        yield
    except WgenError as exc:
        err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False, soft_wrap=True)
        if exc.hint:
            err_console.print(f"[dim]hint: {exc.hint}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _version(value: bool) -> None:
    if value:
        console.print(f"wgen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """wgen: zoo -> canonicalize -> train -> sample -> eval."""


@app.command()
def zoo(
    arch: Annotated[str, typer.Option("--arch", "-a", help="timm architecture, e.g. test_resnet")],
    data: Annotated[str, typer.Option("--data", "-d", help="digits | imagefolder:PATH | cifar10:PATH | cifar100:PATH | npz:PATH")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder (re-run to resume)")],
    count: Annotated[int, typer.Option("--count", "-n", help="number of members")] = 8,
    model_args: ModelArgsOption = None,
    img_size: Annotated[Optional[int], typer.Option(help="input size for size-flexible models (default: 32 for digits/CIFAR)")] = None,
    seed_start: Annotated[int, typer.Option(help="member i is trained from seed SEED_START + i")] = 0,
    split_seed: Annotated[int, typer.Option(help="seed of the train/val/test split")] = 0,
    epochs: Annotated[int, typer.Option(help="training epochs per member")] = 20,
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="training batch size")] = 64,
    optimizer: Annotated[str, typer.Option(help="adamw | sgd | adam")] = "adamw",
    weight_decay: Annotated[float, typer.Option(help="weight decay (not applied to norms and biases)")] = 0.05,
    normalized_decay: Annotated[Optional[float], typer.Option(
        help="decay of weights feeding a BatchNorm (default 30; --weight-decay with --init)")] = None,
    warmup_epochs: Annotated[float, typer.Option(help="linear warm-up before the cosine decay")] = 1.0,
    label_smoothing: Annotated[float, typer.Option(help="label smoothing of the loss")] = 0.0,
    init: Annotated[Optional[Path], typer.Option(help="fine-tune every member from this checkpoint")] = None,
    shard: Annotated[Optional[str], typer.Option(help="I/N: train members I, I+N, ... only")] = None,
    device: DeviceOption = "auto",
    force: Annotated[bool, typer.Option(help="replace an existing output made with other settings")] = False,
    as_json: JsonOption = False,
) -> None:
    """Train a zoo of N members of one timm architecture (only if you have none)."""
    from .checkpoints import parse_model_args
    from .data import SplitSpec
    from .runtime import resolve_device
    from .zoo import Recipe, plan_zoo, train_zoo, parse_shard

    with user_errors():
        recipe = Recipe(arch, data, parse_model_args(model_args), img_size, SplitSpec(split_seed), seed_start,
                        epochs, lr, batch_size, optimizer, weight_decay, normalized_decay, warmup_epochs,
                        label_smoothing, str(init) if init else None)
        shard_spec = parse_shard(shard)
        torch_device = resolve_device(device)
        plan = plan_zoo(recipe)
        with _ZooBar(quiet=as_json) as bar:
            records = train_zoo(plan, out, count, torch_device, shard_spec, force, bar)
    rows = [{"member": r.name, "seed": r.seed, "val_acc": r.val_accuracy, "test_acc": r.test_accuracy,
             "seconds": r.train_seconds, "resumed": r.resumed} for r in records]
    if as_json:
        print(json.dumps({"out": str(out), "members": rows}, indent=2))
        return
    table = Table(title=f"zoo {out}  ({arch} on {data}, device {torch_device})")
    for column in ("member", "seed", "val acc", "test acc", "seconds", ""):
        table.add_column(column, justify="right" if column not in ("member", "") else "left")
    for r in rows:
        table.add_row(r["member"], str(r["seed"]), _pct(r["val_acc"]), _pct(r["test_acc"]),
                      f"{r['seconds']:.1f}", "resumed" if r["resumed"] else "")
    console.print(table)


class _Bar:
    """A rich progress display on stderr (silent with --json); subclasses receive a command's events."""

    def __init__(self, quiet: bool, *columns: Any) -> None:
        columns = columns or (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.progress = Progress(*columns, console=err_console, disable=quiet)
        self.task: Any = None

    def __enter__(self) -> Any:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)


_STATUS_COLUMNS = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn())


class _ZooBar(_Bar):
    """Rich progress for ``wgen zoo``: one bar over members, one over the current member's epochs."""

    def __init__(self, quiet: bool) -> None:
        super().__init__(quiet, *_STATUS_COLUMNS)
        self.overall: Any = None
        self.member: Any = None

    def start(self, total: int, todo: int) -> None:
        self.overall = self.progress.add_task("members", total=total, status=f"{total - todo} already done")

    def member_start(self, name: str, seed: int, epochs: int) -> None:
        if self.member is not None:
            self.progress.remove_task(self.member)
        self.member = self.progress.add_task(f"{name} (seed {seed})", total=epochs, status="")

    def epoch_end(self, name: str, epoch: int, loss: float, val_accuracy: float) -> None:
        self.progress.update(self.member, completed=epoch, status=f"loss {loss:.3f}  val {_pct(val_accuracy)}")

    def member_end(self, record: Any) -> None:
        self.progress.advance(self.overall)


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="a zoo, canonical zoo, samples folder, member or checkpoint file")],
    arch: ArchOption = None,
    model_args: ModelArgsOption = None,
    skip_bad: SkipBadOption = False,
    as_json: JsonOption = False,
) -> None:
    """Say what PATH is: kind, architecture, members, parameters, accuracies."""
    from .checkpoints import parse_model_args
    from .info import describe

    with user_errors():
        report = describe(path, arch, parse_model_args(model_args), skip_bad)
    _warn_skipped(report["skipped"])
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=str(path), show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [("kind", report["kind"]), ("architecture", report["architecture"]),
            ("num classes", str(report["num_classes"])), ("model args", json.dumps(report["model_args"]))]
    if report["kind"] == "generator":
        space, training = report["space"], report["training"]
        rows += [("space", f"{space['kind']}, {space['dim']} dims over {space['values']:,} weights"
                           + (f"; members on a sphere of radius {space['radius']:.3f}" if space.get("radius") else "")),
                 ("velocity net", f"{report['net_parameters']:,} parameters (width {report['net']['width']}, "
                                  f"depth {report['net']['depth']})"),
                 ("members", f"{report['members']} training, {report['holdout_members']} held out"),
                 ("source", f"{report['source']}" + (" (canonical)" if report["canonical_source"] else "")),
                 ("training", f"{training['steps']} steps, {training['seconds']}s on {training['device']}, "
                              f"loss {training['final_loss']:.4f}"
                              + (f", held-out {training['final_val_loss']:.4f}" if training["final_val_loss"] is not None else ""))]
    else:
        rows += [("members", str(report["members"])), ("parameters", f"{report['parameters']:,}")]
    for key in ("input_size", "data"):
        if report.get(key) is not None:
            rows.append((key.replace("_", " "), str(report[key])))
    for key in ("val_accuracy", "test_accuracy"):
        if key in report:
            s = report[key]
            rows.append((key.replace("_", " "), f"mean {_pct(s['mean'])}  min {_pct(s['min'])}  max {_pct(s['max'])}"))
    if "samples" in report:
        m = report["samples"]
        rows.append(("sampling", f"{m['count']} asked, {m['rejected']} rejected; {m['solver']} x{m['steps']}, seed "
                                 f"{m['seed']}" + (", projected" if m.get("projected") else "")
                                 + (f", calibrated on {m['calibrate']}" if m["calibrate"] else "")))
    if report["skipped"]:
        rows.append(("skipped", str(len(report["skipped"]))))
    rows.append(("fingerprint", report["fingerprint"][:16]))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


@app.command()
def canonicalize(
    zoo_path: Annotated[Path, typer.Argument(metavar="ZOO", help="zoo folder (or checkpoint folder with --arch)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder for the canonical zoo")],
    method: Annotated[str, typer.Option(help="weight-matching | none (copy members through)")] = "weight-matching",
    template: Annotated[str, typer.Option(help="first | INDEX | barycenter (MergeMany)")] = "first",
    restarts: Annotated[int, typer.Option(help="random restarts per member; the best objective is kept")] = 1,
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="also measure the interpolation barrier on this data")] = None,
    barrier_pairs: Annotated[int, typer.Option(help="member pairs for the barrier")] = 3,
    seed: Annotated[int, typer.Option(help="seed of restarts, member order and barrier pairs")] = 0,
    arch: ArchOption = None,
    model_args: ModelArgsOption = None,
    skip_bad: SkipBadOption = False,
    device: DeviceOption = "auto",
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Permutation-align a zoo to one template; every member is verified to compute the same function."""
    from .permute.canonicalize import CanonOptions
    from .permute.canonicalize import canonicalize as run
    from .runtime import resolve_device

    with user_errors():
        torch_device = resolve_device(device)
        zoo_obj = _open_input(zoo_path, arch, model_args, skip_bad)
        options = CanonOptions(method, template, restarts, seed, data, barrier_pairs)
        with _StageBar(quiet=as_json) as bar:
            report = run(zoo_obj, out, options, torch_device, force, bar)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    groups = report["groups"]
    console.print(f"[bold]{report['architecture']}[/]: {groups['groups']} permutation groups "
                  f"({groups['units']} units), {groups['head_groups']} attention modules "
                  f"({groups['heads']} heads); template {report['template']}, device {report['device']}")
    table = Table(title=f"canonical zoo {out}")
    for column in ("member", "L2 to template before", "after", "max |diff| / scale"):
        table.add_column(column, justify="left" if column == "member" else "right")
    for m in report["members"]:
        table.add_row(m["name"], f"{m['l2_to_template_before']:.3f}", f"{m['l2_to_template_after']:.3f}",
                      f"{m['max_rel_diff']:.1e}")
    console.print(table)
    console.print(f"mean pairwise L2: {report['mean_pairwise_l2_before']:.3f} -> {report['mean_pairwise_l2_after']:.3f} "
                  f"({100 * report['pairwise_reduction']:.1f}% lower)")
    if report["barrier"] and report["barrier"].get("before"):
        b = report["barrier"]
        console.print(f"loss barrier ({len(b['pairs'])} pairs, test split): {b['before']['mean_loss_barrier']:.3f} -> "
                      f"{b['after']['mean_loss_barrier']:.3f}; accuracy drop {_pct(b['before']['mean_accuracy_drop'])} -> "
                      f"{_pct(b['after']['mean_accuracy_drop'])}")
    console.print("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in report["timings"].items()))


@app.command()
def train(
    zoo_path: Annotated[Path, typer.Argument(metavar="ZOO", help="canonical zoo (or any zoo)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder for the generator")],
    space: Annotated[str, typer.Option(help="auto | full | pca (auto: full up to 50,000 values, else pca)")] = "auto",
    components: Annotated[Optional[int], typer.Option(help="PCA components (default: training members - 1)")] = None,
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 5000,
    batch_size: Annotated[int, typer.Option(help="flow-matching batch size")] = 256,
    lr: Annotated[float, typer.Option(help="peak learning rate (AdamW, warm-up then cosine)")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = 0.0,
    warmup_steps: Annotated[int, typer.Option(help="linear warm-up steps")] = 200,
    grad_clip: Annotated[float, typer.Option(help="gradient norm clip")] = 1.0,
    ema_decay: Annotated[float, typer.Option(help="EMA decay of the weights that are saved")] = 0.999,
    time_sampling: Annotated[str, typer.Option(help="uniform | logit-normal")] = "uniform",
    ot: Annotated[bool, typer.Option("--ot/--no-ot", help="minibatch optimal-transport coupling")] = True,
    holdout: Annotated[float, typer.Option(help="fraction of members kept out of training")] = 0.1,
    width: Annotated[int, typer.Option(help="velocity MLP width")] = 512,
    depth: Annotated[int, typer.Option(help="velocity MLP residual blocks")] = 3,
    checkpoint_every: Annotated[int, typer.Option(help="write a resumable checkpoint every K steps")] = 500,
    seed: Annotated[int, typer.Option(help="seed of init, noise, times and holdout")] = 0,
    resume: Annotated[bool, typer.Option(help="continue from OUT/checkpoint")] = False,
    arch: ArchOption = None,
    model_args: ModelArgsOption = None,
    skip_bad: SkipBadOption = False,
    device: DeviceOption = "auto",
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Fit a flow-matching generator in weight space (GPU if present; torchrun for several)."""
    from .flow.nets import NetConfig
    from .flow.train import TrainConfig, train_generator
    from .runtime import resolve_device

    with user_errors():
        torch_device = resolve_device(device)
        config = TrainConfig(space, components, steps, batch_size, lr, weight_decay, warmup_steps, grad_clip,
                             ema_decay, time_sampling, ot, holdout, seed, checkpoint_every,
                             NetConfig(width=width, depth=depth))
        zoo_obj = _open_input(zoo_path, arch, model_args, skip_bad)
        main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 draws
        with _TrainBar(quiet=as_json or not main_rank) as bar:
            result = train_generator(zoo_obj, out, config, torch_device, resume, force, bar)
    if not result:  # a non-zero rank of a torchrun job
        return
    if as_json:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
        return
    t = result["training"]
    console.print(f"generator {out}: {result['architecture']}, {result['space']['kind']} space of "
                  f"{result['space']['dim']} dims ({result['space']['values']:,} weights), velocity net "
                  f"{result['net_parameters']:,} parameters; {len(result['members']['train'])} training, "
                  f"{len(result['members']['holdout'])} held-out members")
    val = t["final_val_loss"]
    console.print(f"{t['steps']} steps in {t['seconds']:.1f}s on {t['device']}: loss {t['final_loss']:.4f}"
                  + (f", held-out loss {val:.4f}" if val is not None else ""))


class _TrainBar(_Bar):
    """Rich progress for ``wgen train``: steps, loss, held-out loss."""

    def __init__(self, quiet: bool) -> None:
        super().__init__(quiet, *_STATUS_COLUMNS)

    def start(self, total: int, done: int, info: dict[str, Any]) -> None:
        err_console.print(f"{info['space']} space, {info['dim']} dims; velocity net {info['net_parameters']:,} "
                          f"parameters; {info['train_members']} training / {info['holdout_members']} held-out "
                          f"members; {info['device']}" + (f" x{info['world_size']}" if info["world_size"] > 1 else ""))
        self.task = self.progress.add_task("training", total=total, completed=done, status="")

    def update(self, step: int, loss: float, val_loss: float | None, lr: float) -> None:
        status = f"loss {loss:.4f}" + (f"  held-out {val_loss:.4f}" if val_loss is not None else "")
        self.progress.update(self.task, completed=step, status=status)


@app.command()
def sample(
    generator_path: Annotated[Path, typer.Argument(metavar="GEN", help="generator folder from wgen train")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder for the samples")],
    count: Annotated[int, typer.Option("--count", "-n", help="number of samples")] = 100,
    solver: Annotated[str, typer.Option(help="euler | midpoint | rk4 (fixed steps) | dopri5 (adaptive)")] = "rk4",
    steps: Annotated[int, typer.Option(help="integration steps of fixed-step solvers")] = 5,
    batch_size: Annotated[int, typer.Option(help="samples decoded and written together (bounds memory)")] = 50,
    seed: Annotated[int, typer.Option(help="sample i starts from noise seeded SEED * 1e6 + i")] = 0,
    calibrate: Annotated[Optional[str], typer.Option(help="re-estimate BatchNorm statistics on this data's train split")] = None,
    project: Annotated[bool, typer.Option(help="pca spaces: put end points back on the sphere the members lie on")] = True,
    min_radius: Annotated[float, typer.Option(help="pca spaces: reject end points inside this fraction of that sphere "
                                                   "(blends of members; 0 keeps all, as does --no-project)")] = 0.8,
    device: DeviceOption = "auto",
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Sample N new checkpoints (timm local-dir folders + manifest.json); re-run to resume."""
    from .flow.sample import BLEND, SampleOptions, load_generator, rejection_counts
    from .flow.sample import sample as run
    from .runtime import resolve_device

    with user_errors():
        torch_device = resolve_device(device)
        generator = load_generator(generator_path, torch_device)
        options = SampleOptions(count, solver, steps, batch_size, seed, calibrate, project, min_radius)
        with _CountBar("sampling", quiet=as_json) as bar:
            manifest = run(generator, out, options, torch_device, force, bar)
    if as_json:
        print(json.dumps({k: v for k, v in manifest.items() if k != "samples"}, indent=2))
        return
    kept = manifest["count"] - manifest["rejected"]
    reasons = rejection_counts(manifest["samples"])
    console.print(f"{kept} samples written to {out} ({manifest['solver']}, {manifest['steps']} steps) in "
                  f"{manifest['seconds']:.1f}s; {manifest['rejected']} rejected"
                  + (f" ({_rejection_reasons(reasons)})" if reasons else ""))
    if manifest["rejected"]:
        err_console.print(f"[yellow]{manifest['rejected']} samples were rejected; see {out}/manifest.json[/]")
    if reasons.get(BLEND, 0) > manifest["count"] // 10:  # a healthy generator leaves ~0.3%
        err_console.print("[yellow]many end points fell between members: the generator looks under-trained "
                          "(train longer), or lower --min-radius[/]")


class _CountBar(_Bar):
    """Rich progress over a count of items."""

    def __init__(self, label: str, quiet: bool) -> None:
        super().__init__(quiet)
        self.label = label

    def start(self, total: int, done: int) -> None:
        self.task = self.progress.add_task(self.label, total=total, completed=done)

    def advance(self, count: int) -> None:
        self.progress.advance(self.task, count)


@app.command(name="eval")
def eval_command(
    target: Annotated[Path, typer.Argument(metavar="SAMPLES", help="samples folder (or any zoo)")],
    zoo_path: Annotated[Optional[Path], typer.Option("--zoo", help="the (canonical) zoo the generator was trained on")] = None,
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="dataset spec (default: the one recorded)")] = None,
    split: Annotated[str, typer.Option(help="train | val | test")] = "test",
    out: Annotated[Optional[Path], typer.Option("--out", help="write the JSON report here")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="write the PNG figure here")] = None,
    noise_scales: Annotated[str, typer.Option(help="relative scales of the noise baselines, comma-separated")] = "0.01,0.03,0.1,0.3",
    soup_k: Annotated[int, typer.Option(help="members per soup baseline")] = 3,
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines", help="build baselines from the zoo")] = True,
    seed: Annotated[int, typer.Option(help="seed of the baselines")] = 0,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Accuracy, ensembles, diversity and novelty of samples, next to the zoo and baselines."""
    from .report import EvalOptions, evaluate, write_report
    from .runtime import resolve_device

    with user_errors():
        torch_device = resolve_device(device)
        try:
            scales = tuple(float(v) for v in noise_scales.split(",") if v.strip())
        except ValueError:
            raise WgenError(f"--noise-scales {noise_scales!r} is not a list of numbers", "e.g. 0.01,0.1") from None
        options = EvalOptions(data, split, scales, soup_k, seed, baselines)
        with _StageBar(quiet=as_json) as bar:
            report = evaluate(target, zoo_path, options, torch_device, bar)
        write_report(report, out, plot)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_eval(report, out, plot)


def _print_eval(report: dict[str, Any], out: Optional[Path], plot: Optional[Path]) -> None:
    sets = report["sets"]

    def label(name: str) -> str:
        return name + (" (matched)" if name == report.get("matched_noise") else "")

    quality = Table(title=f"{report['architecture']} on {report['data']}: {report['examples']} {report['split']} examples")
    for column in ("set", "models", "acc", "min acc", "NLL", "ECE", "ensemble acc", "disagree"):
        quality.add_column(column, justify="left" if column == "set" else "right")
    for name, s in sets.items():
        quality.add_row(label(name), str(s["models"]), _pct(s["accuracy"]["mean"]), _pct(s["accuracy"]["min"]),
                        f"{s['nll']['mean']:.3f}", f"{s['ece']['mean']:.3f}", _pct(s["ensemble"][-1]["accuracy"]),
                        _pct(s["disagreement"]))
    console.print(quality)
    if any("nn_ratio" in s for s in sets.values()):
        novelty = Table(title="novelty against the zoo's training members")
        for column in ("set", "NN ratio", "max err-IoU", "NN agree", "copies", "nearer held-out"):
            novelty.add_column(column, justify="left" if column == "set" else "right")
        for name, s in sets.items():
            novelty.add_row(label(name), f"{s['nn_ratio']['mean']:.3f}", f"{s['max_error_iou']['mean']:.2f}",
                            _pct(s["nn_agreement"]["mean"]), _pct(s["copy_rate"]),
                            _pct(s["holdout_nearer"]) if "holdout_nearer" in s else "-")
        console.print(novelty)
    if "sampling" in report:
        m = report["sampling"]
        console.print(f"samples: {m['asked']} asked, {m['rejected']} rejected"
                      + (f" ({_rejection_reasons(m['reasons'])})" if m["reasons"] else "") + ": the sets above hold the rest")
    for path, what in ((out, "report"), (plot, "figure")):
        if path is not None:
            console.print(f"{what}: {path}")


def _rejection_reasons(reasons: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in reasons.items())


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for every stage's output (re-run to resume)")] = Path("wgen-demo"),
    device: DeviceOption = "auto",
) -> None:
    """The whole chain on built-in digits: zoo -> canonicalize -> train -> sample -> eval."""
    import time

    from .demo import run_demo
    from .runtime import resolve_device

    started = time.perf_counter()
    bars: dict[str, Any] = {}

    def close_bars() -> None:
        for bar in bars.values():
            bar.__exit__(None, None, None)
        bars.clear()

    def announce(stage: str, command: str) -> None:
        close_bars()
        console.print(f"[bold cyan]==> {stage}[/]  [dim]({command})[/]")

    def progress(stage: str) -> Any:
        close_bars()
        bar = {"zoo": _ZooBar, "train": _TrainBar}.get(stage, None)
        bar = bar(quiet=False) if bar else (_CountBar(stage, quiet=False) if stage == "sample" else _StageBar(quiet=False))
        bars[stage] = bar.__enter__()
        return bar

    with user_errors():
        try:
            report = run_demo(out, resolve_device(device), announce=announce, progress=progress)
        finally:
            close_bars()
    _print_eval(report, out / "report.json", out / "report.png")
    console.print(f"demo finished in {time.perf_counter() - started:.0f}s")


class _StageBar(_Bar):
    """Rich progress for multi-stage commands: one bar per stage."""

    def stage(self, name: str, total: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=self.progress.tasks[-1].total)
        self.task = self.progress.add_task(name, total=total)

    def advance(self) -> None:
        self.progress.advance(self.task)


def _open_input(path: Path, arch: Optional[str], model_args: Optional[str], skip_bad: bool) -> Any:
    """Open the zoo a command reads, warning about each member --skip-bad dropped."""
    from .checkpoints import open_zoo, parse_model_args

    zoo_obj = open_zoo(path, arch, parse_model_args(model_args), skip_bad)
    _warn_skipped(zoo_obj.skipped)
    return zoo_obj


def _warn_skipped(messages: list[str]) -> None:
    for message in messages:
        err_console.print(f"[yellow]skipped:[/] {message}", highlight=False, soft_wrap=True)


def _pct(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def main() -> None:
    """Entry point of the ``wgen`` console script."""
    app()

"""The ``wgen`` command line: parse, call one library function, render its result with rich.

Nothing heavy is imported at module level: torch and timm load when a command runs, so ``--help``
answers at once.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import WgenError
from .limits import ranged
from .flow.nets import NETS
from .flow.spaces import FULL_SPACE_MAX_DIM, space_choices
from .tables import Summary
from .version import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Generate ensembles of ready-to-use timm networks from a zoo of checkpoints.")
console = Console()
err_console = Console(stderr=True)

# Options several commands share, added to a command's signature by @shared (Typer reads the signature).
SHARED_OPTIONS: dict[str, tuple[Any, Any]] = {
    "arch": (Annotated[Optional[str], typer.Option("--arch", "-a", help="timm architecture of flat checkpoint files")],
             None),
    "model_args": (Annotated[Optional[str], typer.Option("--model-args", metavar="JSON",
                                                         help='timm model args as JSON, e.g. \'{"in_chans": 1}\'')], None),
    "skip_bad": (Annotated[bool, typer.Option("--skip-bad", metavar="", help="drop unreadable or mismatching members with a warning")],
                 False),
    "weights": (Annotated[str, typer.Option("--weights", help="training checkpoints holding EMA and raw weights: "
                                                              "auto (EMA when present, as timm loads them) | ema | raw")],
                "auto"),
    "pick": (Annotated[str, typer.Option("--run-checkpoint", help="timm training runs: the file of each run that is "
                                                               "the member, last (last.pth.tar) | best (model_best.pth.tar)")],
             "last"),
    "threads": (Annotated[Optional[int], typer.Option("--threads", help=ranged(
        "--threads", "CPU threads (default: OMP_NUM_THREADS, else the cores this process may use, divided among "
                     "--shard processes)"))], None),
    "device": (Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N (auto = cuda if available)")],
               "auto"),
    "force": (Annotated[bool, typer.Option("--force", metavar="", help="replace an existing output that wgen wrote")], False),
    "as_json": (Annotated[bool, typer.Option("--json", metavar="", help="print the result as JSON")], False),
}


OutOption = Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="output folder (re-run the same command to resume)")]


@dataclass
class Shared:
    """The shared options of one command call (those the command takes; the others keep their defaults)."""

    arch: Optional[str] = None
    model_args: Optional[str] = None
    skip_bad: bool = False
    weights: str = "auto"
    pick: str = "last"
    threads: Optional[int] = None
    device: str = "auto"
    force: bool = False
    as_json: bool = False


def shared(*names: str) -> Any:
    """Return a decorator adding the options ``names`` of SHARED_OPTIONS to a command, passed to it as ``opts``."""
    def add(command: Any) -> Any:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "opts"]
        extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=SHARED_OPTIONS[name][0],
                                   default=SHARED_OPTIONS[name][1]) for name in names]

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            return command(**{k: v for k, v in kwargs.items() if k not in names},
                           opts=Shared(**{k: kwargs[k] for k in names}))

        run.__signature__ = signature.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
        return run
    return add


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a WgenError into one red line plus its hint, and exit status 2."""
    try:
        yield
    except WgenError as exc:
        err_console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
        if exc.hint:
            err_console.print(f"[dim]hint: {escape(exc.hint)}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


class RichProgress:
    """The progress protocol (``wgen.progress.Progress``) on stderr as rich bars; silent with ``--json``."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=err_console,
                             disable=quiet)
        self.task: Any = None

    def __enter__(self) -> RichProgress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.__exit__(*exc)

    def stage(self, name: str, total: int, done: int = 0) -> None:
        self.task = self.bars.add_task(name, total=total, completed=done, status="")

    def advance(self, count: int = 1, status: str = "") -> None:
        self.bars.update(self.task, advance=count, **({"status": status} if status else {}))

    def note(self, text: str) -> None:
        if not self.quiet:
            self.bars.console.print(text, style="bold cyan" if text.startswith("==>") else None, highlight=False,
                                    markup=False)


def show(summary: Summary) -> None:
    """Print a command's summary: its lines, its tables, the lines after them, then warnings (stderr)."""
    for line in summary.lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    for t in summary.tables:
        table = Table(title=t.title, show_header=t.header)
        for i, column in enumerate(t.columns):
            table.add_column(column, justify="left" if i < t.left else "right", style="bold" if not t.header and i == 0 else None)
        for row in t.rows:
            table.add_row(*row)
        console.print(table)
    for line in summary.after:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    for line in summary.warnings:
        err_console.print(line, style="yellow", highlight=False, markup=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"wgen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(ctx: typer.Context,
          version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, metavar="",
                                                help="print the version and exit")] = False) -> None:
    """wgen: zoo -> canonicalize -> train -> sample -> eval."""
    _list_registered_kinds(ctx.command)
    _bare_flags(ctx.command, ctx)


def _list_registered_kinds(group: Any) -> None:
    """Name every registered space and net in ``wgen train --help``, plug-ins registered after import included."""
    help_of = {"space": _space_help(), "net": _net_help()}
    for param in group.commands["train"].params:
        if param.name in help_of:
            param.help = help_of[param.name]


def _bare_flags(group: Any, ctx: Any) -> None:
    """Show ``--help`` as the flag it is, not as an option taking a ``<bool>`` (Typer's default)."""
    for command in [group, *group.commands.values()]:
        option = command.get_help_option(ctx)
        if option is not None:
            option.metavar = ""


def _space_help() -> str:
    return (f"weight space: {' | '.join(space_choices())} (auto: codes when the zoo's data is known, else full "
            f"up to {FULL_SPACE_MAX_DIM:,} values, else pca)")


def _net_help() -> str:
    return f"velocity net: {' | '.join(NETS.names())}"


@app.command()
@shared("model_args", "threads", "device", "force", "as_json")
def zoo(
    arch: Annotated[str, typer.Option("--arch", "-a", help="timm architecture, e.g. test_resnet")],
    data: Annotated[str, typer.Option("--data", "-d", metavar="SPEC",
                                      help="digits | digits-hard | imagefolder:PATH | cifar10:PATH | cifar100:PATH | npz:PATH")],
    out: OutOption,
    count: Annotated[int, typer.Option("--count", "-n", help=ranged("--count", "number of members"))] = 8,
    img_size: Annotated[Optional[int], typer.Option(help=ranged("--img-size", "input size for size-flexible models (default: 32 for digits/CIFAR)"))] = None,
    seed_start: Annotated[int, typer.Option(help=ranged("--seed-start", "member i is trained from seed SEED_START + i"))] = 0,
    split_seed: Annotated[int, typer.Option(help=ranged("--split-seed", "seed of the train/val/test split"))] = 0,
    epochs: Annotated[int, typer.Option(help=ranged("--epochs", "training epochs per member"))] = 20,
    lr: Annotated[float, typer.Option(help=ranged("--lr", "peak learning rate"))] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="training batch size (>= 2)")] = 64,
    optimizer: Annotated[str, typer.Option(help="adamw | sgd | adam")] = "adamw",
    weight_decay: Annotated[float, typer.Option(help=ranged("--weight-decay", "weight decay (not applied to norms and biases)"))] = 0.05,
    normalized_decay: Annotated[Optional[float], typer.Option(
        help=ranged("--normalized-decay", "decay of weights feeding a BatchNorm (default 30; --weight-decay with --init)"))] = None,
    warmup_epochs: Annotated[float, typer.Option(help=ranged("--warmup-epochs", "linear warm-up before the cosine decay"))] = 1.0,
    label_smoothing: Annotated[float, typer.Option(help=ranged("--label-smoothing", "label smoothing of the loss"))] = 0.0,
    init: Annotated[Optional[Path], typer.Option(metavar="PATH", help="fine-tune every member from this checkpoint")] = None,
    shard: Annotated[Optional[str], typer.Option(metavar="I/N", help="train members I, I+N, ... only")] = None,
    opts: Shared = Shared(),
) -> None:
    """Train a zoo of N members of one timm architecture (only if you have none)."""
    from dataclasses import asdict

    from .checkpoints import parse_model_args
    from .data import SplitSpec
    from .zoo import Recipe, parse_shard, plan_zoo, train_zoo, zoo_summary

    with user_errors():
        recipe = Recipe(arch, data, parse_model_args(opts.model_args), img_size, SplitSpec(split_seed), seed_start,
                        epochs, lr, batch_size, optimizer, weight_decay, normalized_decay, warmup_epochs,
                        label_smoothing, str(init) if init else None)
        shard_spec = parse_shard(shard)
        torch_device = _start(opts, shard_spec[1])
        plan = plan_zoo(recipe)
        with RichProgress(quiet=opts.as_json) as progress:
            records = train_zoo(plan, out, count, torch_device, shard_spec, opts.force, progress)
    if opts.as_json:
        print(json.dumps({"out": str(out), "members": [asdict(r) for r in records]}, indent=2))
        return
    show(zoo_summary(records, f"zoo {out}  ({arch} on {data}, device {torch_device})"))


@app.command()
@shared("arch", "model_args", "skip_bad", "weights", "pick", "threads", "as_json")
def info(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="a zoo, canonical zoo, generator, samples folder, member or checkpoint file")],
    opts: Shared = Shared(),
) -> None:
    """Say what PATH is: kind, architecture, members, parameters, accuracies."""
    from .checkpoints import parse_model_args
    from .info import describe, info_summary

    with user_errors():
        _start(opts)
        report = describe(path, opts.arch, parse_model_args(opts.model_args), opts.skip_bad, opts.weights, opts.pick)
    _warn_skipped(report["skipped"])
    if opts.as_json:
        print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))
        return
    show(info_summary(report))


@app.command()
@shared("arch", "model_args", "skip_bad", "weights", "pick", "threads", "device", "force", "as_json")
def canonicalize(
    zoo_path: Annotated[Path, typer.Argument(metavar="ZOO", help="zoo folder (or checkpoint folder with --arch)")],
    out: OutOption,
    method: Annotated[str, typer.Option(help="weight-matching | none (copy members through)")] = "weight-matching",
    template: Annotated[str, typer.Option(help="first | INDEX | barycenter (MergeMany)")] = "first",
    restarts: Annotated[int, typer.Option(help=ranged("--restarts", "random restarts per member; the best objective is kept"))] = 1,
    data: Annotated[Optional[str], typer.Option("--data", "-d", metavar="SPEC",
                                                help="also measure the interpolation barrier on this data")] = None,
    barrier_pairs: Annotated[int, typer.Option(help=ranged("--barrier-pairs", "member pairs for the barrier"))] = 3,
    seed: Annotated[int, typer.Option(help=ranged("--seed", "seed of restarts and barrier pairs"))] = 0,
    opts: Shared = Shared(),
) -> None:
    """Permutation-align a zoo to one template; every member is verified to compute the same function."""
    from .permute.canonicalize import CanonOptions, canonical_summary
    from .permute.canonicalize import canonicalize as run

    with user_errors():
        torch_device = _start(opts)
        zoo_obj = _open_input(zoo_path, opts)
        options = CanonOptions(method, template, restarts, seed, data, barrier_pairs)
        with RichProgress(quiet=opts.as_json) as progress:
            report = run(zoo_obj, out, options, torch_device, opts.force, progress)
    if opts.as_json:
        print(json.dumps(report, indent=2))
        return
    show(canonical_summary(report, out))


@app.command()
@shared("arch", "model_args", "skip_bad", "weights", "pick", "threads", "device", "force", "as_json")
def train(
    zoo_path: Annotated[Path, typer.Argument(metavar="ZOO", help="canonical zoo (or any zoo)")],
    out: OutOption,
    space: Annotated[str, typer.Option(help=_space_help())] = "auto",
    components: Annotated[Optional[int], typer.Option(help=ranged("--components", "pca space: components (default: training members - 1)"))] = None,
    space_args: Annotated[Optional[str], typer.Option(metavar="JSON", help="the space's settings, e.g. subspace: '{\"epochs\": 20, \"lr\": 3e-4}'")] = None,
    data: Annotated[Optional[str], typer.Option("--data", "-d", metavar="SPEC", help="data of spaces that train on it (subspace, codes; default: the zoo's recorded dataset)")] = None,
    net: Annotated[str, typer.Option(help=_net_help())] = "mlp",
    width: Annotated[Optional[int], typer.Option(help=ranged("--width", "velocity net width (mlp default 512)"))] = None,
    depth: Annotated[Optional[int], typer.Option(help=ranged("--depth", "velocity net blocks (mlp default 3)"))] = None,
    steps: Annotated[int, typer.Option(help=ranged("--steps", "optimizer steps"))] = 5000,
    batch_size: Annotated[int, typer.Option(help=ranged("--batch-size", "flow-matching batch size"))] = 256,
    lr: Annotated[float, typer.Option(help=ranged("--lr", "peak learning rate (AdamW, warm-up then cosine)"))] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help=ranged("--weight-decay", "AdamW weight decay"))] = 0.0,
    warmup_steps: Annotated[int, typer.Option(help=ranged("--warmup-steps", "linear warm-up steps"))] = 200,
    grad_clip: Annotated[float, typer.Option(help=ranged("--grad-clip", "gradient norm clip"))] = 1.0,
    ema_decay: Annotated[float, typer.Option(help=ranged("--ema-decay", "EMA decay of the weights that are saved"))] = 0.999,
    time_sampling: Annotated[str, typer.Option(help="uniform | logit-normal")] = "uniform",
    ot: Annotated[bool, typer.Option("--ot/--no-ot", metavar="", help="minibatch optimal-transport coupling")] = True,
    holdout: Annotated[float, typer.Option(help=ranged("--holdout", "fraction of members kept out of training"))] = 0.1,
    checkpoint_every: Annotated[int, typer.Option(help=ranged("--checkpoint-every", "write a resumable checkpoint every K steps"))] = 500,
    seed: Annotated[int, typer.Option(help=ranged("--seed", "seed of init, noise, times and holdout"))] = 0,
    opts: Shared = Shared(),
) -> None:
    """Fit a flow-matching generator in weight space (GPU if present; torchrun for several)."""
    from .checkpoints import parse_json_object
    from .flow.distributed import is_main_process
    from .flow.train import TrainConfig, generator_summary, train_generator

    with user_errors():
        torch_device = _start(opts)
        settings = parse_json_object(space_args, "--space-args", '{"epochs": 20}')
        settings.update({"components": components} if components is not None else {})
        net_args = {k: v for k, v in (("width", width), ("depth", depth)) if v is not None}
        config = TrainConfig(space, settings, net, net_args, steps, batch_size, lr, weight_decay, warmup_steps,
                             grad_clip, ema_decay, time_sampling, ot, holdout, seed, checkpoint_every, data)
        zoo_obj = _open_input(zoo_path, opts)
        with RichProgress(quiet=opts.as_json or not is_main_process()) as progress:
            result = train_generator(zoo_obj, out, config, torch_device, opts.force, progress)
    if result is None:  # a rank other than 0 of a torchrun job
        return
    if opts.as_json:
        print(json.dumps({k: v for k, v in result.to_json().items() if k != "history"}, indent=2))
        return
    show(generator_summary(result, out))


@app.command()
@shared("threads", "device", "force", "as_json")
def sample(
    generator_path: Annotated[Path, typer.Argument(metavar="GEN", help="generator folder from wgen train")],
    out: OutOption,
    count: Annotated[int, typer.Option("--count", "-n", help=ranged("--count", "number of samples"))] = 100,
    solver: Annotated[str, typer.Option(help="euler | midpoint | rk4 (fixed steps) | dopri5 (adaptive)")] = "rk4",
    steps: Annotated[int, typer.Option(help=ranged("--steps", "integration steps of fixed-step solvers"))] = 5,
    batch_size: Annotated[int, typer.Option(help=ranged("--batch-size", "samples decoded and written together (bounds memory)"))] = 50,
    seed: Annotated[int, typer.Option(help=ranged("--seed", "sample i starts from noise seeded SEED * 1e6 + i"))] = 0,
    calibrate: Annotated[Optional[str], typer.Option(metavar="SPEC",
                                                     help="re-estimate BatchNorm statistics on this data's train split")] = None,
    project: Annotated[bool, typer.Option(metavar="", help="pca spaces: put end points back on the sphere the members lie on")] = True,
    min_radius: Annotated[float, typer.Option(help=ranged("--min-radius", "pca spaces: reject end points inside this "
                                                   "fraction of that sphere (blends of members; 0 keeps all, as does "
                                                   "--no-project)"))] = 0.8,
    alpha: Annotated[Optional[float], typer.Option(help=ranged("--alpha", "subspace and codes spaces: draw the mixes "
                                                  "from Dirichlet(ALPHA); over 1 nearer each simplex's centre (default: "
                                                  "the training's)"))] = None,
    opts: Shared = Shared(),
) -> None:
    """Sample N new checkpoints (timm local-dir folders + manifest.json); re-run to resume."""
    from .flow.generator import load_generator
    from .flow.sample import SampleOptions, sample_summary
    from .flow.sample import sample as run

    with user_errors():
        torch_device = _start(opts)
        options = SampleOptions(count, solver, steps, batch_size, seed, calibrate, project, min_radius, alpha)
        options.check()
        generator = load_generator(generator_path, torch_device)
        with RichProgress(quiet=opts.as_json) as progress:
            manifest = run(generator, out, options, torch_device, opts.force, progress)
    if opts.as_json:
        print(json.dumps({k: v for k, v in manifest.items() if k != "samples"}, indent=2))
        return
    show(sample_summary(manifest, out))


@app.command(name="eval")
@shared("threads", "device", "as_json")
def eval_command(
    target: Annotated[Path, typer.Argument(metavar="SAMPLES", help="samples folder (or any zoo)")],
    zoo_path: Annotated[Optional[Path], typer.Option("--zoo", metavar="ZOO",
                                                     help="the (canonical) zoo the generator was trained on")] = None,
    data: Annotated[Optional[str], typer.Option("--data", "-d", metavar="SPEC", help="dataset spec (default: the one recorded)")] = None,
    split: Annotated[str, typer.Option(help="train | val | test")] = "test",
    out: Annotated[Optional[Path], typer.Option("--out", metavar="FILE", help="write the JSON report here")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", metavar="FILE", help="write the PNG figure here")] = None,
    noise_scales: Annotated[str, typer.Option(help="relative scales of the noise baselines, comma-separated")] = "0.05,0.1,0.2,0.3,0.5,0.8",
    soup_k: Annotated[int, typer.Option(help=ranged("--soup-k", "members per soup baseline"))] = 3,
    baselines: Annotated[bool, typer.Option("--baselines/--no-baselines", metavar="", help="build baselines from the zoo")] = True,
    recalibrate: Annotated[bool, typer.Option("--recalibrate/--no-recalibrate", metavar="",
                                              help="also measure samples and baselines with BatchNorm re-estimated on "
                                                   "the train split")] = True,
    rematch: Annotated[int, typer.Option(help=ranged("--rematch", "nearest training members each model is re-matched "
                                                              "to by weight matching before distances count"))] = 3,
    seed: Annotated[int, typer.Option(help=ranged("--seed", "seed of the baselines"))] = 0,
    baseline_cache: Annotated[Optional[Path], typer.Option(
        "--baseline-cache", metavar="DIR", help="keep measured baselines here and reuse them: a second generator on "
                                                "the same zoo and held-out members measures only its samples")] = None,
    opts: Shared = Shared(),
) -> None:
    """Are the samples new networks as good as fresh runs? Quality and novelty next to held-out members and baselines."""
    from .evaluate import EvalOptions, eval_summary, evaluate_models, parse_scales, write_report

    with user_errors():
        torch_device = _start(opts)
        options = EvalOptions(data, split, parse_scales(noise_scales), soup_k, seed, baselines, recalibrate,
                              rematch=rematch)
        with RichProgress(quiet=opts.as_json) as progress:
            report = evaluate_models(target, zoo_path, options, torch_device, progress, baseline_cache)
        write_report(report, out, plot)
    if opts.as_json:
        print(json.dumps(report, indent=2))
        return
    show(eval_summary(report, out, plot))


@app.command()
@shared("threads", "device")
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR",
                                      help="folder for every stage's output (re-run to resume)")] = Path("wgen-demo"),
    opts: Shared = Shared(),
) -> None:
    """The whole chain on the built-in benchmark (digits-hard): zoo -> canonicalize -> train -> sample -> eval."""
    from .demo import run_demo
    from .evaluate import eval_summary

    started = time.perf_counter()
    with user_errors():
        with RichProgress() as progress:
            report = run_demo(out, _start(opts), progress=progress)
    show(eval_summary(report, out / "report.json", out / "report.png"))
    console.print(f"demo finished in {time.perf_counter() - started:.0f}s")


def _start(opts: Shared, shards: int = 1) -> Any:
    """Set a command's CPU threads and return its torch device (torch is imported here, not at start-up)."""
    from .runtime import resolve_device, set_threads

    set_threads(opts.threads, shards)
    return resolve_device(opts.device)


def _open_input(path: Path, opts: Shared) -> Any:
    """Open the zoo a command reads, warning about each member --skip-bad dropped."""
    from .checkpoints import open_zoo, parse_model_args

    zoo_obj = open_zoo(path, opts.arch, parse_model_args(opts.model_args), opts.skip_bad, opts.weights, opts.pick)
    _warn_skipped(zoo_obj.skipped)
    return zoo_obj


def _warn_skipped(messages: list[str]) -> None:
    for message in messages:
        err_console.print(f"[yellow]skipped:[/] {message}", highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point of the ``wgen`` console script."""
    command = typer.main.get_command(app)
    with command.make_context("wgen", [], resilient_parsing=True) as ctx:
        _bare_flags(command, ctx)  # the root's --help is shown before any callback runs
    command(prog_name="wgen")

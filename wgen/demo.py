"""`wgen demo`: the whole chain on the built-in digits with small settings, resumable stage by stage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoints import open_zoo
from .flow.nets import NetConfig
from .flow.sample import MANIFEST_JSON, SampleOptions, load_generator, sample
from .flow.train import CHECKPOINT_DIR, TrainConfig, train_generator
from .permute.canonicalize import CANONICAL_JSON, CanonOptions, canonicalize
from .report import EvalOptions, evaluate, write_report
from .zoo import Recipe, plan_zoo, train_zoo


@dataclass(frozen=True)
class DemoSettings:
    """The small settings of the demo (about 5 minutes on 2 CPU cores)."""

    arch: str = "test_resnet"
    members: int = 16
    epochs: int = 20
    train_steps: int = 5000
    train_batch: int = 128  # smaller than `wgen train` defaults, to stay within minutes on a CPU
    net_width: int = 256
    samples: int = 100
    min_radius: float = SampleOptions.min_radius


def run_demo(out: Path, device: torch.device, settings: DemoSettings = DemoSettings(),
             announce: Callable[[str, str], None] = lambda stage, command: None,
             progress: Callable[[str], Any] = lambda stage: None) -> dict[str, Any]:
    """Run zoo -> canonicalize -> train -> sample -> eval under ``out``; return the eval report.

    Each stage whose output is already complete is skipped, so re-running resumes.
    ``announce(stage, equivalent_command)`` is called before each stage; ``progress(stage)`` returns
    the progress receiver for it.
    """
    zoo_dir, canon_dir, gen_dir, samples_dir = out / "zoo", out / "canon", out / "gen", out / "samples"
    announce("zoo", f"wgen zoo -a {settings.arch} -d digits -n {settings.members} --epochs {settings.epochs} -o {zoo_dir}")
    plan = plan_zoo(Recipe(settings.arch, "digits", epochs=settings.epochs))
    train_zoo(plan, zoo_dir, settings.members, device, progress=progress("zoo"))

    announce("canonicalize", f"wgen canonicalize {zoo_dir} -o {canon_dir}")
    if not (canon_dir / CANONICAL_JSON).is_file():
        canonicalize(open_zoo(zoo_dir), canon_dir, CanonOptions(), device, force=True, progress=progress("canonicalize"))

    announce("train", f"wgen train {canon_dir} -o {gen_dir} --steps {settings.train_steps} "
                      f"--batch-size {settings.train_batch} --width {settings.net_width}")
    if not (gen_dir / "config.json").is_file():
        resume = (gen_dir / CHECKPOINT_DIR / "state.json").is_file()
        config = TrainConfig(steps=settings.train_steps, batch_size=settings.train_batch,
                             net=NetConfig(width=settings.net_width))
        train_generator(open_zoo(canon_dir), gen_dir, config, device, resume=resume, force=not resume,
                        progress=progress("train"))

    announce("sample", f"wgen sample {gen_dir} -n {settings.samples} -o {samples_dir}")
    if not (samples_dir / MANIFEST_JSON).is_file():
        options = SampleOptions(count=settings.samples, min_radius=settings.min_radius)
        sample(load_generator(gen_dir, device), samples_dir, options, device, progress=progress("sample"))

    report_json, report_png = out / "report.json", out / "report.png"
    announce("eval", f"wgen eval {samples_dir} --zoo {canon_dir} -d digits --out {report_json} --plot {report_png}")
    report = evaluate(samples_dir, canon_dir, EvalOptions(data="digits"), device, progress=progress("eval"))
    write_report(report, report_json, report_png)
    return report

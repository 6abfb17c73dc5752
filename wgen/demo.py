"""`wgen demo`: the whole chain on the built-in benchmark with small settings; re-running resumes every stage."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoints import open_zoo
from .evaluate import EvalOptions, evaluate_models, write_report
from .flow.generator import load_generator
from .flow.sample import SampleOptions, sample
from .flow.spaces.subspace import SubspaceOptions
from .flow.train import TrainConfig, train_generator
from .permute.canonicalize import CanonOptions, canonicalize
from .progress import SILENT, Progress
from .zoo import Recipe, plan_zoo, train_zoo


@dataclass(frozen=True)
class DemoSettings:
    """The small settings of the demo.

    The data is ``digits-hard``, where members make mistakes (about 92% accurate after 4 epochs), so
    that agreement and error overlap with the zoo mean something; a quarter of the members are held
    out of the generator's training as the yardstick of a fresh training run.
    """

    arch: str = "test_resnet"
    data: str = "digits-hard"
    members: int = 16
    epochs: int = 4
    holdout: float = 0.25
    train_epochs: float = SubspaceOptions.epochs  # of the subspace generator over the train split
    samples: int = 32  # and as many models per baseline: the eval is most of the demo's time


def run_demo(out: Path, device: torch.device, settings: DemoSettings = DemoSettings(),
             progress: Progress = SILENT) -> dict[str, Any]:
    """Run zoo -> canonicalize -> train -> sample -> eval under ``out``; return the eval report.

    Every command resumes its own output, so re-running picks up where a killed demo stopped. Before
    each stage ``progress.note`` receives the equivalent command.
    """
    zoo_dir, canon_dir, gen_dir, samples_dir = out / "zoo", out / "canon", out / "gen", out / "samples"
    progress.note(f"==> zoo  (wgen zoo -a {settings.arch} -d {settings.data} -n {settings.members} "
                  f"--epochs {settings.epochs} -o {zoo_dir})")
    train_zoo(plan_zoo(Recipe(settings.arch, settings.data, epochs=settings.epochs)), zoo_dir, settings.members, device,
              progress=progress)
    progress.note(f"==> canonicalize  (wgen canonicalize {zoo_dir} -o {canon_dir})")
    canonicalize(open_zoo(zoo_dir), canon_dir, CanonOptions(), device, progress=progress)
    space_args = {"epochs": settings.train_epochs}
    progress.note(f"==> train  (wgen train {canon_dir} -o {gen_dir} --space subspace --space-args "
                  f"'{json.dumps(space_args)}' --holdout {settings.holdout})")
    config = TrainConfig(space="subspace", space_args=space_args, holdout=settings.holdout)
    train_generator(open_zoo(canon_dir), gen_dir, config, device, progress=progress)
    progress.note(f"==> sample  (wgen sample {gen_dir} -n {settings.samples} -o {samples_dir})")
    sample(load_generator(gen_dir, device), samples_dir, SampleOptions(count=settings.samples), device,
           progress=progress)
    report_json, report_png = out / "report.json", out / "report.png"
    progress.note(f"==> eval  (wgen eval {samples_dir} --zoo {canon_dir} -d {settings.data} --out {report_json} "
                  f"--plot {report_png})")
    report = evaluate_models(samples_dir, canon_dir, EvalOptions(data=settings.data), device, progress=progress)
    write_report(report, report_json, report_png)
    return report

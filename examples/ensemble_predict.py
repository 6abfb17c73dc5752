"""Load N sampled checkpoints with plain timm and predict with their ensemble.

    python examples/ensemble_predict.py quickstart/samples --count 16
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch


def load_ensemble(folder: Path, count: int) -> list[torch.nn.Module]:
    """Return up to ``count`` sample models of ``folder`` (timm local-dir members), in eval mode."""
    members = sorted(p for p in folder.iterdir() if (p / "model.safetensors").is_file())[:count]
    return [timm.create_model(f"local-dir:{p}", pretrained=True).eval() for p in members]


@torch.no_grad()
def ensemble_predict(models: list[torch.nn.Module], images: torch.Tensor) -> torch.Tensor:
    """Return the mean class probabilities of ``models`` on ``images`` ([batch, classes])."""
    return torch.stack([m(images).softmax(dim=-1) for m in models]).mean(dim=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", type=Path)
    parser.add_argument("--count", type=int, default=16)
    args = parser.parse_args()
    models = load_ensemble(args.samples, args.count)
    config = timm.data.resolve_data_config({}, model=models[0])
    # an image tensor, already resized and normalised as config["input_size"], mean and std say;
    # here a digit from scikit-learn's built-in set, prepared the same way wgen trained on it
    from wgen.data import SplitSpec, load_data

    data = load_data("digits", tuple(config["input_size"]), SplitSpec())
    images, labels = data.tensors("test")
    probs = ensemble_predict(models, images[:8])
    print(f"{len(models)} models; input {tuple(config['input_size'])}")
    print("predicted:", probs.argmax(-1).tolist())
    print("true:     ", labels[:8].tolist())
    print("confidence:", [round(float(p), 3) for p in probs.max(-1).values])


if __name__ == "__main__":
    main()

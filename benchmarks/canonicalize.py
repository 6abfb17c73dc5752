"""Benchmark `wgen canonicalize` against the `rebasin` package (Git Re-Basin port) in one run.

Prints JSON: device, versions, and
- ``pair``: wall time of aligning one resnet18 pair (untrained, seeds 0 and 1) with wgen and with
  rebasin's PermutationCoordinateDescent, and each tool's output change after permuting
  (max |diff| relative to the output scale; 0 means the function is preserved);
- ``zoo``: the same over a 16-member test_resnet zoo (members 1..15 aligned to member 0);
- ``families``: wgen on small zoos of every family the canonicalize issue names: function
  preservation, mean pairwise L2 before/after, time.

    pip install rebasin==0.0.47        # only for the comparison; wgen does not need it
    python benchmarks/canonicalize.py [--zoo PATH_TO_16_MEMBER_ZOO] [--skip-families]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import timm
import torch

import wgen
from wgen.checkpoints import ModelSpec, member_config, open_zoo, write_member
from wgen.permute.canonicalize import CanonOptions, canonicalize
from wgen.permute.groups import derive_groups
from wgen.permute.match import align_to_target, apply_alignment

FAMILIES = [
    ("test_resnet", {}, 32), ("resnet18", {}, 64), ("resnet50", {}, 64),
    ("test_vit", {"img_size": 32, "patch_size": 8}, 32), ("vit_tiny_patch16_224", {}, 224),
    ("deit_tiny_patch16_224", {}, 224), ("test_convnext", {}, 32), ("convnext_atto", {}, 64),
    ("test_efficientnet", {}, 32), ("efficientnet_b0", {}, 64), ("mobilenetv3_small_050", {}, 64),
]


def _model(arch: str, seed: int, args: dict | None = None, num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(arch, num_classes=num_classes, **(args or {})).eval()


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def wgen_pair(model_a: torch.nn.Module, model_b: torch.nn.Module, size: tuple[int, ...], x: torch.Tensor) -> dict:
    """Align b to a with wgen (tracing included); return time and the output change of b."""
    start = time.perf_counter()
    spec = derive_groups(model_b, size)
    params = {k for k, _ in model_b.named_parameters()}
    a, b = model_a.state_dict(), model_b.state_dict()
    aligned = apply_alignment(b, align_to_target(spec, a, b, params).alignment)
    seconds = time.perf_counter() - start
    moved = copy.deepcopy(model_b)
    moved.load_state_dict(aligned)
    with torch.no_grad():
        return {"seconds": seconds, "output_rel_diff": _rel_diff(model_b(x), moved(x))}


def rebasin_pair(model_a: torch.nn.Module, model_b: torch.nn.Module, x: torch.Tensor) -> dict:
    """Align b to a with rebasin's PermutationCoordinateDescent; return time and output change."""
    try:
        from rebasin import PermutationCoordinateDescent
    except ImportError:
        return {"error": "rebasin not installed (pip install rebasin==0.0.47)"}
    moved = copy.deepcopy(model_b)
    with torch.no_grad():
        before = model_b(x)
    try:
        start = time.perf_counter()
        PermutationCoordinateDescent(model_a, moved, x).rebasin()  # graph building is timed too
        seconds = time.perf_counter() - start
    except Exception as exc:  # rebasin fails on some layers (LayerNorm)
        return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"}
    with torch.no_grad():
        return {"seconds": seconds, "output_rel_diff": _rel_diff(before, moved(x))}


def bench_pair() -> dict:
    a, b = _model("resnet18", 0, num_classes=1000), _model("resnet18", 1, num_classes=1000)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ours = wgen_pair(a, b, (3, 224, 224), x)
    theirs = rebasin_pair(a, b, x)
    out = {"model": "resnet18 (untrained, seeds 0 and 1)", "wgen": ours, "rebasin": theirs}
    if "seconds" in theirs:
        out["speedup"] = theirs["seconds"] / ours["seconds"]
    return out


def bench_zoo(zoo_path: str | None) -> dict:
    if zoo_path:
        zoo = open_zoo(zoo_path)
        members = []
        for ref in zoo.members[:16]:
            model = zoo.spec.create().eval()
            model.load_state_dict(zoo.load(ref))
            members.append(model)
        size, _, _ = zoo.preprocessing()
        label = f"{zoo.spec.architecture} zoo {zoo_path}"
    else:
        members = [_model("test_resnet", seed) for seed in range(16)]
        size, label = (3, 32, 32), "test_resnet, 16 untrained members"
    x = torch.randn(4, *size, generator=torch.Generator().manual_seed(0))
    ours = [wgen_pair(members[0], m, size, x) for m in members[1:]]
    theirs = [rebasin_pair(members[0], m, x) for m in members[1:]]
    out = {"zoo": label, "wgen_seconds": sum(r["seconds"] for r in ours),
           "wgen_max_output_rel_diff": max(r["output_rel_diff"] for r in ours)}
    if all("seconds" in r for r in theirs):
        out["rebasin_seconds"] = sum(r["seconds"] for r in theirs)
        out["rebasin_max_output_rel_diff"] = max(r["output_rel_diff"] for r in theirs)
        out["speedup"] = out["rebasin_seconds"] / out["wgen_seconds"]
    else:
        out["rebasin_error"] = next(r["error"] for r in theirs if "error" in r)
    return out


def bench_families() -> list[dict]:
    rows = []
    for arch, args, px in FAMILIES:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "zoo"
            spec = ModelSpec(arch, 10, args)
            for seed in range(3):
                state = _model(arch, seed, args).state_dict()
                write_member(root / f"m{seed}", state, member_config(spec, (3, px, px), (0.5,) * 3, (0.5,) * 3))
            start = time.perf_counter()
            report = canonicalize(open_zoo(root), Path(tmp) / "canon", CanonOptions(), torch.device("cpu"))
            rows.append({"model": arch, "model_args": args, "members": 3, "seconds": time.perf_counter() - start,
                         "groups": report["groups"]["groups"], "attention_modules": report["groups"]["head_groups"],
                         "max_output_rel_diff": max(m["max_rel_diff"] for m in report["members"]),
                         "mean_pairwise_l2_before": report["mean_pairwise_l2_before"],
                         "mean_pairwise_l2_after": report["mean_pairwise_l2_after"]})
            try:
                from rebasin import PermutationCoordinateDescent  # noqa: F401
                a, b = _model(arch, 0, args), _model(arch, 1, args)
                x = torch.randn(1, 3, px, px, generator=torch.Generator().manual_seed(0))
                rows[-1]["rebasin"] = rebasin_pair(a, b, x)
            except ImportError:
                pass
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", help="a 16-member test_resnet zoo (default: 16 untrained members)")
    parser.add_argument("--skip-families", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    result = {"benchmark": "canonicalize", "device": "cpu", "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
              "versions": {"wgen": wgen.__version__, "torch": torch.__version__, "timm": timm.__version__},
              "pair": bench_pair(), "zoo": bench_zoo(args.zoo)}
    try:
        import rebasin

        result["versions"]["rebasin"] = getattr(rebasin, "__version__", "0.0.47")
    except ImportError:
        pass
    if not args.skip_families:
        result["families"] = bench_families()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

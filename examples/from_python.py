"""The whole chain through the Python API: the same functions the CLI calls (re-running resumes).

    python examples/from_python.py [OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import wgen


def main(out: Path) -> None:
    device = wgen.resolve_device("auto")
    plan = wgen.plan_zoo(wgen.Recipe("test_resnet", "digits-hard", epochs=4))
    wgen.train_zoo(plan, out / "zoo", 16, device)
    report = wgen.canonicalize(wgen.open_zoo(out / "zoo"), out / "canon", wgen.CanonOptions(), device)
    print(f"canonicalized: mean pairwise L2 {report['mean_pairwise_l2_before']:.2f} -> "
          f"{report['mean_pairwise_l2_after']:.2f}")
    wgen.train_generator(wgen.open_zoo(out / "canon"), out / "gen", wgen.TrainConfig(holdout=0.25), device)
    manifest = wgen.sample(wgen.load_generator(out / "gen", device), out / "samples",
                           wgen.SampleOptions(count=100), device)
    print(f"sampled {manifest['count'] - manifest['rejected']} models")
    report = wgen.evaluate_models(out / "samples", out / "canon", wgen.EvalOptions(), device)
    wgen.write_report(report, out / "report.json", out / "report.png")
    for name, s in report["sets"].items():
        print(f"{name:>14}: accuracy {s['accuracy']['mean']:.3f}, ensemble {s['ensemble'][-1]['accuracy']:.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "from-python"))

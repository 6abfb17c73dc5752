"""wgen: generate ensembles of ready-to-use timm networks from a zoo of checkpoints.

The functions the CLI calls, one per stage::

    plan = wgen.plan_zoo(wgen.Recipe("test_resnet", "digits"))
    wgen.train_zoo(plan, Path("zoo"), 16, device)
    wgen.canonicalize(wgen.open_zoo("zoo"), Path("canon"), wgen.CanonOptions(), device)
    wgen.train_generator(wgen.open_zoo("canon"), Path("gen"), wgen.TrainConfig(), device)
    wgen.sample(wgen.load_generator("gen"), Path("samples"), wgen.SampleOptions(count=100), device)
    report = wgen.evaluate(Path("samples"), Path("canon"), wgen.EvalOptions(), device)
"""

__version__ = "0.1.0"

from .checkpoints import ModelSpec, Zoo, open_zoo  # noqa: E402
from .errors import WgenError  # noqa: E402
from .flow.sample import SampleOptions, load_generator, sample  # noqa: E402
from .flow.train import TrainConfig, train_generator  # noqa: E402
from .permute.canonicalize import CanonOptions, canonicalize  # noqa: E402
from .report import EvalOptions, evaluate, write_report  # noqa: E402
from .runtime import resolve_device  # noqa: E402
from .zoo import Recipe, plan_zoo, train_zoo  # noqa: E402

__all__ = [
    "__version__", "WgenError", "ModelSpec", "Zoo", "open_zoo", "Recipe", "plan_zoo", "train_zoo",
    "CanonOptions", "canonicalize", "TrainConfig", "train_generator", "SampleOptions", "load_generator",
    "sample", "EvalOptions", "evaluate", "write_report", "resolve_device",
]

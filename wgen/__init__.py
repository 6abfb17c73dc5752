"""wgen: generate ensembles of ready-to-use timm networks from a zoo of checkpoints."""

__version__ = "0.1.0"

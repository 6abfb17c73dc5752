"""The version of wgen, in one place: a leaf module that imports nothing."""

__version__ = "0.2.0"

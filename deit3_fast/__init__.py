"""deit3-fast: the DeiT III recipe, bound by GPU compute rather than by data loading."""

__version__ = "0.1.0"

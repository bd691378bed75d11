"""Loader engines over one .beton and the on-device DeiT III augmentation they all share.

`build_loader(data, aug, split, num_classes=..., device=..., dtype=...)` (build.py) is the entry point. Importing
`pipelines` or `pipelines.config` does not import torch: the names below load their modules on first use, so the
trainer's config schema can import the data path's config sections cheaply.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "build_loader": "build",
    "DataError": "errors",
    "check_same_classes": "build",
    "Loader": "loader",
    "BatchAugment": "augment",
    "EpochOrder": "sampler",
    "DataConfig": "config",
    "AugConfig": "config",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")


__all__ = list(_LAZY)

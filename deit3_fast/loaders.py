"""A config's data loaders: its `data` and `aug` sections and the plain values the data path takes (class count,
AMP dtype, device). builder.build (the run's loaders), evalsets (the eval command's sets) and preview use it."""

from __future__ import annotations

from dataclasses import replace

import torch

from pipelines import build_loader

from .config import Config, resolve_num_classes
from .device import AMP_DTYPES, resolve_amp


def make_loader(
    cfg: Config,
    split: str,
    device: torch.device,
    *,
    amp: str | None = None,
    batch_size: int | None = None,
    auto_compile: bool = True,
):
    """The data path's loader for this config: its `data` and `aug` sections and the plain values pipelines take.
    `auto_compile=False` for a loader that yields a batch or two (preview): no compilation it cannot repay."""
    amp = amp or resolve_amp(cfg.train.amp, device)
    cfg = resolve_num_classes(cfg)
    data = cfg.data if batch_size is None else replace(cfg.data, batch_size=batch_size)
    return build_loader(
        data,
        cfg.aug,
        split,
        num_classes=cfg.model.num_classes,
        device=device,
        dtype=AMP_DTYPES[amp],
        compile=cfg.train.compile,
        auto_compile=auto_compile,
    )

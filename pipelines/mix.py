"""Mixup / CutMix (timm's `Mixup`, batch mode: one lambda per batch, partner = the batch reversed), making timm's soft
targets (label smoothing inside). What a loss does with them (BCE binarises them) is the loss's business.
timm draws from numpy's global RNG: each batch gets its own seed from the loader's generator, so mixing is
reproducible and the caller's numpy state is left as it was.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.data import Mixup


class Mixing:
    def __init__(self, aug, num_classes: int):
        self.mixup = None
        if aug.mix_prob > 0 and (aug.mixup > 0 or aug.cutmix > 0):
            self.mixup = Mixup(
                mixup_alpha=aug.mixup,
                cutmix_alpha=aug.cutmix,
                prob=aug.mix_prob,
                switch_prob=aug.mix_switch_prob,
                mode="batch",
                label_smoothing=aug.label_smoothing,
                num_classes=num_classes,
            )

    @property
    def active(self) -> bool:
        """Whether images are blended (else the labels pass through as class indices)."""
        return self.mixup is not None

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
        if self.mixup is None:
            return x, labels
        if len(x) % 2:
            raise ValueError(f"mixup/cutmix need an even batch size, got {len(x)}")
        saved = np.random.get_state()
        np.random.seed(int(rng.integers(2**32)))
        try:
            return self.mixup(x, labels)
        finally:
            np.random.set_state(saved)

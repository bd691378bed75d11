"""Mixup / CutMix (timm's `Mixup`, batch mode: one lambda per batch, partner = the batch reversed) and the targets the
loss wants: BCE gets the mixed targets binarised (`> 0`: a mixed sample has two positive classes, as the official
engine does), cross-entropy gets them soft. timm draws from numpy's global RNG; each batch gets its own seed from
the loader's generator, so mixing is reproducible and the caller's numpy state is left as it was.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup


class Mixing:
    def __init__(self, aug, num_classes: int, loss: str):
        self.num_classes, self.binarize = num_classes, loss == "bce"
        self.mixup = None
        if aug.mix_prob > 0 and (aug.mixup > 0 or aug.cutmix > 0):
            self.mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mix_prob,
                               switch_prob=aug.mix_switch_prob, mode="batch", label_smoothing=aug.label_smoothing,
                               num_classes=num_classes)
        self.label_smoothing = aug.label_smoothing

    @property
    def active(self) -> bool:
        """Whether images are blended (else only targets are made)."""
        return self.mixup is not None

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
        if self.mixup is not None:
            if len(x) % 2:
                raise ValueError(f"mixup/cutmix need an even batch size, got {len(x)}")
            saved = np.random.get_state()
            np.random.seed(int(rng.integers(2**32)))
            try:
                x, targets = self.mixup(x, labels)
            finally:
                np.random.set_state(saved)
        elif self.binarize:
            targets = F.one_hot(labels, self.num_classes).float()
        else:
            return x, labels  # class indices; the loss applies label smoothing
        if self.binarize:
            targets = targets.gt(0.0).to(targets.dtype)
        return x, targets

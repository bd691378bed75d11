"""Mixup / CutMix (timm's `Mixup`, batch mode: one lambda per batch, partner = the batch reversed), making timm's soft
targets (label smoothing inside). What a loss does with them (BCE binarises them) is the loss's business.
timm draws from numpy's global RNG: each batch gets its own seed from the loader's generator, so mixing is
reproducible and the caller's numpy state is left as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from timm.data import Mixup


@dataclass(frozen=True)
class MixDraw:
    """What mixing did to one batch, as timm drew it: `kind` is "mixup", "cutmix" or "none" (the batch was left as
    it was: mix_prob said no, or a cutmix box too small to hold a pixel); `lam` is each image's own share (cutmix: the
    area outside the pasted box); `partner[i]` is the sample blended into sample i; `labels` are the classes before
    mixing (the soft targets are lam x labels + (1 - lam) x labels[partner], smoothed)."""

    kind: str
    lam: float
    labels: torch.Tensor

    @property
    def partner(self) -> torch.Tensor:
        """Batch mode blends each image with the batch reversed (timm's x.flip(0)). Made when read (the preview),
        not for every training batch."""
        return torch.arange(len(self.labels) - 1, -1, -1, device=self.labels.device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.labels]


class _RecordingMixup(Mixup):
    """timm's Mixup, keeping what its last batch drew: timm returns only the mixed batch and the targets, and the
    preview captions each tile with the mix it shows. Both hooks are batch mode's own steps, the maths stays timm's."""

    drawn: tuple[float, bool] = (1.0, False)

    def _params_per_batch(self):
        lam, cutmix = super()._params_per_batch()
        self._cutmix = bool(cutmix)
        return lam, cutmix

    def _mix_batch(self, x):
        lam = super()._mix_batch(x)  # cutmix: corrected to the box actually pasted
        self.drawn = (float(lam), self._cutmix)
        return lam


class Mixing:
    def __init__(self, aug, num_classes: int):
        self.mixup = None
        if aug.mix_prob > 0 and (aug.mixup > 0 or aug.cutmix > 0):
            self.mixup = _RecordingMixup(
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

    def mix(self, x: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
        """(mixed batch, targets, MixDraw); the draw is None when mixing is off."""
        if self.mixup is None:
            return x, labels, None
        if len(x) % 2:
            raise ValueError(f"mixup/cutmix need an even batch size, got {len(x)}")
        saved = np.random.get_state()
        np.random.seed(int(rng.integers(2**32)))
        try:
            x, y = self.mixup(x, labels)
        finally:
            np.random.set_state(saved)
        lam, cutmix = self.mixup.drawn
        kind = "none" if lam == 1.0 else "cutmix" if cutmix else "mixup"
        return x, y, MixDraw(kind, lam, labels)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator):
        x, y, _ = self.mix(x, labels, rng)
        return x, y

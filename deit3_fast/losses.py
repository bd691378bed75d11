"""The recipe's losses, chosen as the official main.py chooses them.

The loader gives timm's soft mixed targets (label smoothing inside) or, where nothing is mixed, class indices.
Pre-training: BCEWithLogits (mean over batch x classes) on binarised targets: `targets > 0`, so a mixed sample has
two positive classes, as the official engine does (`bce_targets`). Fine-tuning: cross-entropy with the soft targets,
else label-smoothing cross-entropy on class indices (plain cross-entropy when smoothing is 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from .config import LOSSES


def bce_targets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The official BCE targets: soft mixed targets binarised (`> 0`), class indices one-hot, as float."""
    if targets.ndim == 1:
        return F.one_hot(targets, num_classes).float()
    return targets.gt(0.0).float()


class RecipeLoss:
    def __init__(self, kind: str, label_smoothing: float = 0.0):
        if kind not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")
        self.kind = kind
        self.soft = SoftTargetCrossEntropy()
        self.hard = LabelSmoothingCrossEntropy(label_smoothing) if label_smoothing > 0 else torch.nn.CrossEntropyLoss()

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # the loss in fp32 whatever the autocast dtype
        if self.kind == "bce":
            return F.binary_cross_entropy_with_logits(logits, bce_targets(targets, logits.shape[-1]))
        return self.soft(logits, targets.float()) if targets.ndim == 2 else self.hard(logits, targets)

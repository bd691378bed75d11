"""The recipe's losses, chosen as the official main.py chooses them.

Pre-training: BCEWithLogits (mean over batch x classes) on the loader's binarised targets (`mixed > 0`).
Fine-tuning: cross-entropy with soft targets when mixing produced them (label smoothing already inside), else
label-smoothing cross-entropy on class indices (plain cross-entropy when smoothing is 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy


class RecipeLoss:
    def __init__(self, kind: str, label_smoothing: float = 0.0, num_classes: int | None = None):
        if kind not in ("bce", "ce"):
            raise ValueError(f"loss must be 'bce' or 'ce', got {kind!r}")
        self.kind, self.num_classes = kind, num_classes
        self.soft = SoftTargetCrossEntropy()
        self.hard = LabelSmoothingCrossEntropy(label_smoothing) if label_smoothing > 0 else torch.nn.CrossEntropyLoss()

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # the loss in fp32 whatever the autocast dtype
        if self.kind == "bce":
            if targets.ndim == 1:
                targets = F.one_hot(targets, logits.shape[-1])
            return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
        return self.soft(logits, targets.float()) if targets.ndim == 2 else self.hard(logits, targets)

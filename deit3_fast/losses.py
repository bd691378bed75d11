"""The recipe's losses, chosen as the official main.py chooses them: the config's `loss` key (`LOSSES`) and
`RecipeLoss`, which it builds (with aug.label_smoothing).

The loader gives timm's soft mixed targets (label smoothing inside) or, where nothing is mixed, class indices.
Pre-training: BCEWithLogits (mean over batch x classes) on binarised targets: `targets > 0`, so a mixed sample has
two positive classes, as the official engine does (`bce_targets`). Fine-tuning: cross-entropy with the soft targets,
else label-smoothing cross-entropy on class indices (plain cross-entropy when smoothing is 0).

No torch at import: the config schema checks `loss` against `LOSSES`, and every command loads its config before torch
starts. torch and timm are imported when a loss is built (and `one_hot` when targets are class indices).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LOSSES = ("bce", "ce")  # bce: BCE on binarised mixed targets | ce: soft-target cross-entropy


def bce_targets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The official BCE targets: soft mixed targets binarised (`> 0`), class indices one-hot, as float."""
    if targets.ndim == 1:
        from torch.nn.functional import one_hot  # here: no torch at import (see above); a dict lookup once loaded

        return one_hot(targets, num_classes).float()
    return targets.gt(0.0).float()


class RecipeLoss:
    def __init__(self, kind: str, label_smoothing: float = 0.0):
        if kind not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")
        # Here, not at the top: no torch at import (see above).
        import torch
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        self.kind = kind
        self.bce = torch.nn.functional.binary_cross_entropy_with_logits
        self.soft = SoftTargetCrossEntropy()
        self.hard = LabelSmoothingCrossEntropy(label_smoothing) if label_smoothing > 0 else torch.nn.CrossEntropyLoss()

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # the loss in fp32 whatever the autocast dtype
        if self.kind == "bce":
            return self.bce(logits, bce_targets(targets, logits.shape[-1]))
        return self.soft(logits, targets.float()) if targets.ndim == 2 else self.hard(logits, targets)

"""Learning rate: linear warm-up from `warmup_lr`, then cosine down to `min_lr`, evaluated every step.

The official run uses timm's CosineLRScheduler (warmup_prefix=False, t_in_epochs=True) stepped once per epoch. We
evaluate the same formula at the fractional epoch `step / steps_per_epoch`, so at every epoch boundary the value
equals timm's and the endpoints are the same (warmup_lr at step 0, lr after warm-up, min_lr at the end); in between
it moves smoothly instead of in epoch-long stairs. As in timm, the cosine is not shifted by the warm-up: after
warm-up it resumes at cos(pi * warmup / epochs), negligible at 800 epochs, a visible step on short budgets. (The
official loop also lags: it calls `step(epoch)` after epoch `epoch`, so epoch e trains with the value for e - 1;
we do not reproduce that.) Short ablation schedules scale both phases with the epoch budget automatically.
"""
from __future__ import annotations

import math


def lr_at(epoch: float, *, lr: float, epochs: int, warmup_epochs: float, warmup_lr: float, min_lr: float) -> float:
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (lr - warmup_lr) / warmup_epochs
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(epoch, epochs) / epochs))


class WarmupCosine:
    """`scheduler(step)` sets and returns the lr of every param group for optimiser step `step` (0-based)."""

    def __init__(self, optimizer, steps_per_epoch: int, *, lr: float, epochs: int, warmup_epochs: float,
                 warmup_lr: float, min_lr: float):
        self.optimizer, self.steps_per_epoch = optimizer, steps_per_epoch
        self.kw = dict(lr=lr, epochs=epochs, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, min_lr=min_lr)

    def value(self, step: int) -> float:
        return lr_at(step / self.steps_per_epoch, **self.kw)

    def __call__(self, step: int) -> float:
        value = self.value(step)
        for group in self.optimizer.param_groups:
            group["lr"] = value * group.get("lr_scale", 1.0)
        return value

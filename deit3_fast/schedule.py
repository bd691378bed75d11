"""Learning rate and training resolution over a run.

Learning rate: linear warm-up from `warmup_lr`, then cosine down to `min_lr`, evaluated every step.

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


def resolution_at(epoch: int, *, start: int, end: int, start_epoch: int, end_epoch: int, step: int) -> int:
    """The training crop size of `epoch` (FFCV's progressive resizing): `start` until start_epoch, then linear to
    `end` at end_epoch, rounded to a multiple of `step`; a function of the epoch alone, so a resume picks it up."""
    t = min(max((epoch - start_epoch) / (end_epoch - start_epoch), 0.0), 1.0)
    return int(round((start + t * (end - start)) / step)) * step


def resolution_schedule(r, img_size: int, epochs: int) -> list[int] | None:
    """Every epoch's training size for the config's `schedule.resolution` `r`, or None when it has no ramp."""
    if r.start is None:
        return None
    end = r.end if r.end is not None else img_size
    return [resolution_at(e, start=r.start, end=end, start_epoch=r.start_epoch, end_epoch=r.end_epoch,
                          step=r.step) for e in range(epochs)]

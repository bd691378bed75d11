"""Learning rate and training resolution over a run: the config's `schedule` section (`ScheduleConfig`, with its
`resolution` ramp), its checks, and what it builds. No torch here (the config schema composes these sections).

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
from dataclasses import dataclass, field

from .schema import ConfigError, at_least_one


@dataclass
class ResolutionConfig:
    """Progressive resolution (FFCV's low-res-first schedules): the training crop size moves linearly from `start`
    at `start_epoch` to `end` at `end_epoch`, in multiples of `step`; evaluation stays at aug.img_size."""

    start: int | None = None  # null: no ramp, aug.img_size throughout
    end: int | None = None  # null: aug.img_size
    start_epoch: int = 0
    end_epoch: int = 0
    step: int = 32  # sizes are multiples of it: a small fixed set (torch.compile compiles each once)
    # Per-process batch at a training size, e.g. {128: 256, 160: 128}; sizes not named use data.batch_size. The
    # global batch stays train.global_batch: accumulation steps make up the difference, so the optimiser steps and
    # the learning-rate schedule are those of a fixed-batch run (larger batches where small crops leave memory).
    batch_sizes: dict[int, int] = field(default_factory=dict)

    def check(self, img_size: int, patch: int, model: str, epochs: int) -> None:
        """The ramp against the rest of the config: aug.img_size (the default end), the model's patch size (the
        smallest start), schedule.epochs (the ramp must end before the run does)."""
        r = self
        if r.start is None:
            if r.batch_sizes:
                raise ConfigError(
                    "schedule.resolution.batch_sizes: a batch per training size needs a ramp "
                    "(schedule.resolution.start); without one, set data.batch_size"
                )
            return
        end = r.end if r.end is not None else img_size
        where = "schedule.resolution"
        if r.step < 1:
            raise ConfigError(f"{where}.step: must be at least 1, got {r.step} (the sizes are multiples of it)")
        if r.start % r.step or end % r.step:
            raise ConfigError(
                f"{where}: start {r.start} and end {end} (null: aug.img_size) must be multiples of "
                f"step {r.step}, so that the sizes are a small fixed set"
            )
        if r.start < patch or r.start > end:
            raise ConfigError(
                f"{where}: start {r.start} must be at least {model}'s patch size {patch} and at most end {end}"
            )
        if not 0 <= r.start_epoch < r.end_epoch:
            raise ConfigError(
                f"{where}: the ramp needs 0 <= start_epoch < end_epoch, got {r.start_epoch} and {r.end_epoch}"
            )
        if r.end_epoch >= epochs:
            raise ConfigError(
                f"{where}: end_epoch {r.end_epoch} must be below schedule.epochs {epochs}, or the run "
                f"never trains at the final size {end}"
            )
        sizes = range(r.start, end + 1, r.step)  # a short budget may skip some of them (ablate scales the ramp)
        for size, batch in r.batch_sizes.items():
            if size not in sizes:
                raise ConfigError(
                    f"{where}.batch_sizes: the ramp never trains at {size} px; its sizes are "
                    f"{', '.join(map(str, sizes))}"
                )
            if batch < 1:
                raise ConfigError(f"{where}.batch_sizes[{size}]: must be at least 1, got {batch}")

    def build(self, img_size: int, epochs: int) -> list[int] | None:
        """Every epoch's training size (None: no ramp, aug.img_size throughout)."""
        return resolution_schedule(self, img_size, epochs)


@dataclass
class ScheduleConfig:
    epochs: int = at_least_one(800)
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)

    def build(self, optimizer, steps_per_epoch: int, *, lr: float) -> WarmupCosine:
        """The learning rate of `optimizer`'s groups at every step: warm-up to `lr` (optim.lr), cosine after."""
        return WarmupCosine(
            optimizer,
            steps_per_epoch,
            lr=lr,
            epochs=self.epochs,
            warmup_epochs=self.warmup_epochs,
            warmup_lr=self.warmup_lr,
            min_lr=self.min_lr,
        )


def lr_at(epoch: float, *, lr: float, epochs: int, warmup_epochs: float, warmup_lr: float, min_lr: float) -> float:
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (lr - warmup_lr) / warmup_epochs
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(epoch, epochs) / epochs))


class WarmupCosine:
    """`scheduler(step)` sets and returns the lr of every param group for optimiser step `step` (0-based)."""

    def __init__(
        self,
        optimizer,
        steps_per_epoch: int,
        *,
        lr: float,
        epochs: int,
        warmup_epochs: float,
        warmup_lr: float,
        min_lr: float,
    ):
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
    return [
        resolution_at(e, start=r.start, end=end, start_epoch=r.start_epoch, end_epoch=r.end_epoch, step=r.step)
        for e in range(epochs)
    ]

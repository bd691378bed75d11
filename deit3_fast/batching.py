"""How a global batch is split over processes and accumulation steps: `train.global_batch` = per-process batch x
world size x accumulation, at `data.batch_size` and at each size schedule.resolution.batch_sizes names. No torch:
the CLI, `submit --dry-run` and `ablate` check the arithmetic before anything is built."""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config, ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is split: per-process batch x world size x accumulation steps."""

    per_process: int
    accum: int
    note: str | None = None  # one line when the per-process batch differs from the one asked for


def batch_plans(cfg: Config, world: int) -> dict[int, BatchPlan]:
    """`batch_plan` at each size of the progressive-resolution ramp whose per-process batch
    schedule.resolution.batch_sizes changes ({} without one): the global batch is the same at every size."""
    return {
        size: _plan(cfg, b, world, f"schedule.resolution.batch_sizes.{size}")
        for size, b in cfg.schedule.resolution.batch_sizes.items()
    }


def batch_plan(cfg: Config, world: int) -> BatchPlan:
    """How `train.global_batch` is split over `world` processes with `data.batch_size` per process."""
    return _plan(cfg, cfg.data.batch_size, world, "data.batch_size")


def _plan(cfg: Config, batch: int, world: int, key: str) -> BatchPlan:
    """The split with per-process batch `batch` (the setting `key`). Mixup and cutmix blend each image with the
    batch's reverse (timm's batch mode): an odd batch has no pair for its middle image, which timm refuses at the
    first step."""
    plan = split_batch(cfg.train.global_batch, batch, world, key)
    a = cfg.aug
    if plan.per_process % 2 and a.mix_prob > 0 and (a.mixup > 0 or a.cutmix > 0):
        raise ConfigError(
            f"{key}: {plan.per_process} images per process is odd, and mixup/cutmix pair each image "
            f"with another of its batch: use an even {key}, or aug.mixup=0 and aug.cutmix=0"
        )
    return plan


def split_batch(g: int, b: int, world: int, key: str) -> BatchPlan:
    """Global batch `g` over `world` processes of batch `b` (the setting `key`, named in messages): `b` per process
    when `g` is a multiple of it times the world size; when the processes together would exceed `g` (the
    quickstart's 32 under torchrun with 2 processes), g / world per process; otherwise a ConfigError naming a
    per-process batch (or world sizes) that work."""
    if g % (b * world) == 0:
        return BatchPlan(b, g // (b * world))
    if b * world > g and g % world == 0:
        return BatchPlan(
            g // world,
            1,
            f"train.global_batch {g} over {world} processes: {key} {b} -> {g // world} per process, no accumulation",
        )
    if g % world:
        below = max(d for d in range(1, world) if g % d == 0)
        above = next(d for d in range(world + 1, g + 1) if g % d == 0) if world < g else None
        sizes = f"{below} or {above}" if above else str(below)
        raise ConfigError(
            f"train.global_batch {g} cannot be split over {world} processes: use a world size that "
            f"divides it (e.g. {sizes}), or another train.global_batch"
        )
    fits = [d for d in range(1, g // world + 1) if (g // world) % d == 0 and d <= b] or [1]
    even = [d for d in fits if d % 2 == 0]  # mixup/cutmix pair the batch with its reverse
    s = (even or fits)[-1]
    raise ConfigError(
        f"train.global_batch {g} is not a multiple of {key} {b} x world size {world}: "
        f"use --set {key}={s} ({g // (s * world)} accumulation steps)"
    )

"""Which samples a rank sees in an epoch, and in what order: the official samplers' semantics, as index arrays.

* training with repeats > 1: DeiT's `RASampler` — each index of a seeded permutation repeated `repeats` times in a
  row, padded, dealt round-robin to the ranks (so the copies of an image land on different ranks), and the epoch
  truncated to `len // 256 * 256 / world` samples per rank: about a third of the images, each seen 3 times.
* training with repeats == 1: torch's `DistributedSampler(shuffle=True)` (padded to a multiple of the world size).
* evaluation: every sample exactly once over all ranks, in order, no padding (rank r takes r, r + world, ...).

Permutations come from `torch.randperm` with generator seed `seed + epoch`, as upstream does, so with seed 0 the
orders equal the reference code's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import keys


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class EpochOrder:
    num_samples: int
    train: bool
    shuffle: bool = True
    repeats: int = 1
    rank: int = 0
    world: int = 1
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside world size {self.world}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.train and self.repeats > 1 and self.num_samples // 256 * 256 < self.world:
            raise ValueError(
                f"repeated augmentation truncates an epoch to len // 256 * 256 samples, and this data "
                f"set has only {self.num_samples}: set data.repeats to 1"
            )

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g).numpy()

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for `epoch`, in visiting order."""
        n, world = self.num_samples, self.world
        if not self.train:
            return np.arange(self.rank, n, world, dtype=np.int64)
        order = self._permutation(epoch)
        if self.repeats > 1:
            order = np.repeat(order, self.repeats)
            total = math.ceil(n * self.repeats / world) * world
            order = np.concatenate([order, order[: total - len(order)]])
            return order[self.rank : total : world][: (n // 256 * 256) // world]
        total = math.ceil(n / world) * world
        order = np.concatenate([order, order[: total - n]])
        return order[self.rank : total : world]

    def __len__(self) -> int:
        return len(self.indices(0))


def batch_count(order: EpochOrder, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch of `order` on this rank: whole batches only with `drop_last` (training)."""
    n = len(order.indices(0))
    return n // batch_size if drop_last else -(-n // batch_size)


def keyed_batches(
    order: EpochOrder, batch_size: int, *, drop_last: bool, seed: int, rank: int, epoch: int, start: int = 0
):
    """(sample indices, per-sample keys) per batch of `epoch` from batch `start` on. A sample's key is (seed, rank,
    epoch, sample, slot in batch): what every engine derives its crop (and the reference engine all its draws) from,
    so all engines take the same samples in the same order with the same randomness, and an epoch can start
    part-way."""
    ek = keys.epoch_key(seed, rank, epoch)
    idx_all = order.indices(epoch)
    stop = len(idx_all) - len(idx_all) % batch_size if drop_last else len(idx_all)
    for first in range(start * batch_size, stop, batch_size):
        idx = idx_all[first : first + batch_size]
        yield idx, [np.uint64(keys.sample_key(ek, int(i), slot)) for slot, i in enumerate(idx)]

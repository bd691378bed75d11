"""`Loader`: an engine's uint8 batches through the device stage and mixing. The training loop sees only this."""
from __future__ import annotations

import numpy as np
import torch

from . import crops


class Loader:
    """Iterable of model-ready `(images, targets)`; `len()` batches per epoch; `set_epoch` like torch samplers.

    Without `set_epoch` each full pass moves on to the next epoch, so a plain `for` loop still reshuffles."""

    def __init__(self, engine, stage, mixing, *, device: torch.device, seed: int, rank: int):
        self.engine, self.stage, self.mixing = engine, stage, mixing
        self.device, self.seed, self.rank = device, seed, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.engine)

    def _generators(self):
        key = int(crops.epoch_key(self.seed, self.rank, self.epoch))
        g = torch.Generator(device=self.device)
        g.manual_seed(key & 0x7FFF_FFFF_FFFF_FFFF)
        return g, np.random.default_rng(key)

    def iter_with_params(self):
        """Like iteration, but also yields the per-sample augmentation parameters (see augment.AugParams)."""
        g, rng = self._generators()
        for images, labels in self.engine.batches(self.epoch):
            x, params = self.stage(images, g)
            y = labels
            if self.mixing is not None:
                x, y = self.mixing(x, labels, rng)
            yield x, y, params
        self.epoch += 1

    def __iter__(self):
        for x, y, _ in self.iter_with_params():
            yield x, y

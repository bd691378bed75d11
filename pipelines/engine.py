"""What a decode engine is to the loader. Every fast engine (FFCV: `ffcv_engine.py`, nvjpeg: `nvjpeg_engine.py`,
DALI: `dali_engine.py`) reads one .beton (nvjpeg and DALI also a shard set, as one global index), decodes, takes the
primary crop and yields uint8 batches; everything after the crop (flip, 3-Augment, jitter, normalisation, mixing) is
the batch augmentation's (augment.py), the same for all of them. An engine registered with `host_augment` (the
reference engine, `reference_engine.py`) runs the official per-sample pipeline itself: it also takes `aug`, yields
augmented, normalised float batches, and gets no batch augmentation.

Each is registered by name with its capabilities in `registry.py`, and `build_loader` constructs every one the same
way: `cls(path, epoch_order, batch_size, crop, device, *, workers, drop_last, seed, rank)`, plus `os_cache` for an
engine registered as taking it (and `aug` for one registered with `host_augment`). Data it cannot read (a file
format it does not support) is a `DataError` from the constructor, which the user sees as one line.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Protocol

import torch

from .crops import CropSpec
from .sampler import EpochOrder


class Engine(Protocol):
    crop: CropSpec
    batch_size: int
    epoch_order: EpochOrder  # which samples, in which order, on this rank

    def __len__(self) -> int:
        """Batches per epoch."""

    def batches(self, epoch: int, start: int = 0) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        """Epoch `epoch` from batch `start` on: (uint8 images (B, H, W, 3), or normalised float (B, 3, H, W) for a
        `host_augment` engine, int64 labels (B,)) on the engine's device. The samples, their order and every crop
        box depend only on (seed, rank, epoch, sample, slot), so
        all engines yield the same batches and an epoch can start part-way.

        On CUDA a batch is ready on the stream that is current where the generator is advanced (the loader advances
        it on its side stream): the engine queues its work for the batch there, or makes that stream wait for an
        event of its own, and never makes the host wait."""

    def epoch_report(self) -> dict:
        """What the last epoch read counted, e.g. {"cpu_decoded": n, "cpu_decoded_reasons": {...}} for JPEGs a GPU
        decoder refused; {} when there is nothing to say."""

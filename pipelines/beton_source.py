"""What the engines that read .beton bytes themselves (nvjpeg, DALI) share: the file, the epoch's batches of sample
indices with their crop keys (the same as the FFCV engine's), and the reflect padding of Simple Random Crop."""
from __future__ import annotations

import numpy as np
import torch

from dataset_tools.beton import Beton

from . import crops


class BetonBatches:
    def __init__(self, path: str, epoch_order, batch_size: int, crop, device: torch.device, *, drop_last: bool,
                 seed: int = 0, rank: int = 0):
        self.beton = Beton(path)
        self.image_field = self.beton.field("rgb_image")
        self.labels = self.beton.labels(self.beton.field("int"))
        self.meta = self.beton.image_meta(self.image_field)
        self.order, self.batch_size, self.crop, self.device = epoch_order, batch_size, crop, device
        self.drop_last, self.seed, self.rank = drop_last, seed, rank

    def __len__(self) -> int:
        n = len(self.order.indices(0))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def index_batches(self, epoch: int, start: int = 0):
        """(sample indices, crop keys) per batch of `epoch` from batch `start` on; a key is (seed, rank, epoch,
        sample, slot in batch)."""
        ek = crops.epoch_key(self.seed, self.rank, epoch)
        order = self.order.indices(epoch)
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for start in range(start * self.batch_size, stop, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield idx, [np.uint64(crops.sample_key(ek, int(i), slot)) for slot, i in enumerate(idx)]

    def image_bytes(self, i: int) -> np.ndarray:
        return np.array(self.beton.image_bytes(int(i), self.image_field))

    def labels_of(self, idx: np.ndarray) -> torch.Tensor:
        labels = torch.from_numpy(self.labels[idx])
        if self.device.type == "cuda":  # from pinned memory the copy is truly asynchronous
            labels = labels.pin_memory()
        return labels.to(self.device, non_blocking=True)


def reflect_pad(img: torch.Tensor, oi: int, oj: int, oh: int, ow: int) -> None:
    """Fill the reflect padding of an (H, W, 3) uint8 crop around its in-image block, in place, on any device."""
    if img.device.type == "cpu":
        crops.reflect_fill(img.numpy(), oi, oj, oh, ow)
        return
    size_h, size_w = img.shape[0], img.shape[1]
    block = img[oi:oi + oh, oj:oj + ow].permute(2, 0, 1)[None].float()
    padded = torch.nn.functional.pad(block, (oj, size_w - oj - ow, oi, size_h - oi - oh), mode="reflect")
    img.copy_(padded[0].permute(1, 2, 0).to(torch.uint8))

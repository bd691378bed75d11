"""What the engines that read .beton bytes themselves (nvjpeg, DALI) share: the data (one .beton or a shard set,
`dataset_tools.shards.open_samples`, read over the same global index), the epoch's batches of sample indices with
their crop keys (the same as the FFCV engine's), which JPEGs a GPU decoder refuses (counted per epoch), and the
reflect padding of Simple Random Crop."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from dataset_tools.beton import IMAGE_MODE_RAW
from dataset_tools.shards import open_samples

from . import crops
from .jpeg_header import gpu_refusal
from .sampler import batch_count, keyed_batches


class BetonBatches:
    def __init__(
        self,
        path: str,
        epoch_order,
        batch_size: int,
        crop,
        device: torch.device,
        *,
        drop_last: bool,
        seed: int = 0,
        rank: int = 0,
    ):
        self.samples = open_samples(path)  # shards open lazily; labels are read per batch
        self.epoch_order, self.batch_size, self.crop, self.device = epoch_order, batch_size, crop, device
        self.drop_last, self.seed, self.rank = drop_last, seed, rank
        self._refusals: dict[int, str | None] = {}  # sample -> why the GPU decoder refuses it (header, read once)
        self.cpu_decoded: Counter = Counter()  # this epoch's GPU refusals by reason

    def __len__(self) -> int:
        return batch_count(self.epoch_order, self.batch_size, self.drop_last)

    def index_batches(self, epoch: int, start: int = 0):
        """(sample indices, crop keys) per batch of `epoch` from batch `start` on (sampler.keyed_batches)."""
        self.cpu_decoded = Counter()
        yield from keyed_batches(
            self.epoch_order,
            self.batch_size,
            drop_last=self.drop_last,
            seed=self.seed,
            rank=self.rank,
            epoch=epoch,
            start=start,
        )

    def gpu_refusal(self, i: int, data: np.ndarray | None = None) -> str | None:
        """Why the GPU decoder cannot take sample i (None: it can; raw pixels are never decoded), counted for this
        epoch's report."""
        i = int(i)
        if i not in self._refusals:
            raw = self.image_row(i)["mode"] == IMAGE_MODE_RAW
            self._refusals[i] = None if raw else gpu_refusal(self.image_bytes(i) if data is None else data)
        reason = self._refusals[i]
        if reason is not None:
            self.cpu_decoded[reason] += 1
        return reason

    def epoch_report(self) -> dict:
        """Images of the last epoch read that the GPU decoder refused and the CPU decoded, by reason."""
        n = sum(self.cpu_decoded.values())
        return {"cpu_decoded": n, "cpu_decoded_reasons": dict(self.cpu_decoded)} if n else {}

    def image_row(self, i: int):
        """Sample i's stored mode, width, height."""
        return self.samples.image_row(int(i))

    def image_bytes(self, i: int) -> np.ndarray:
        return np.array(self.samples.image_bytes(int(i)))

    def labels_of(self, idx: np.ndarray) -> torch.Tensor:
        return upload(torch.from_numpy(self.samples.labels_at(idx)), self.device)


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor to `device` without making the host wait: to a GPU from pinned memory, whose copy is truly
    asynchronous (from pageable memory torch blocks until the copy is done)."""
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def reflect_pad(img: torch.Tensor, oi: int, oj: int, oh: int, ow: int) -> None:
    """Fill the reflect padding of an (H, W, 3) uint8 crop around its in-image block, in place, on any device."""
    if img.device.type == "cpu":
        crops.reflect_fill(img.numpy(), oi, oj, oh, ow)
        return
    size_h, size_w = img.shape[0], img.shape[1]
    block = img[oi : oi + oh, oj : oj + ow].permute(2, 0, 1)[None].float()
    padded = torch.nn.functional.pad(block, (oj, size_w - oj - ow, oi, size_h - oi - oh), mode="reflect")
    img.copy_(padded[0].permute(1, 2, 0).to(torch.uint8))

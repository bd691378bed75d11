"""The torch engine: .beton bytes -> torchvision.io.decode_jpeg (nvJPEG on a GPU, libjpeg-turbo on CPU) -> keyed crop.

Needs nothing beyond torch/torchvision: the fallback where DALI is absent, and an FFCV-free reader of the same
files (`dataset_tools.beton`). Sample order, shards and repeats come from the same `EpochOrder`, and every crop box
from the same keys (`crops.py`), as the FFCV engine, so both yield the same samples with the same crops.

On a CPU, decoding and the bicubic resampling (`resample.py`, the FFCV engine's) run on `workers` threads: both
release the GIL. On a GPU the batch is decoded by nvJPEG in one call and each crop resized with torch's antialiased
bicubic interpolation; its boxes are rounded to whole pixels (the CPU path resamples fractional boxes exactly).
"""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from dataset_tools.beton import IMAGE_MODE_RAW

from . import crops
from .beton_source import BetonBatches, reflect_pad
from .crops import crop_plan
from .resample import resize_box

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec (warning once per call); they still work and
# need no extra dependency. Moving to torchcodec.decoders is the follow-up once it decodes JPEG on the GPU in batches.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


class NvjpegEngine(BetonBatches):
    def __init__(self, path: str, epoch_order, batch_size: int, crop, device: torch.device, *, workers: int,
                 drop_last: bool, seed: int = 0, rank: int = 0):
        super().__init__(path, epoch_order, batch_size, crop, device, drop_last=drop_last, seed=seed, rank=rank)
        self.pool = ThreadPoolExecutor(max(1, workers)) if device.type == "cpu" else None

    def _bytes(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.image_bytes(i))

    def _pixels(self, i: int, data: torch.Tensor) -> np.ndarray:
        m = self.meta[i]
        if m["mode"] == IMAGE_MODE_RAW:
            return data.numpy().reshape(int(m["height"]), int(m["width"]), 3)
        return decode_jpeg(data, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()

    def _cpu_sample(self, out: np.ndarray, slot: int, i: int, key) -> None:
        img = self._pixels(i, self._bytes(i))
        plan = crop_plan(self.crop, img.shape[0], img.shape[1], key)
        if plan[0] == "box":
            _, y0, x0, y1, x1, whole = plan
            if whole:
                resize_box(img, y0, x0, y1, x1, out[slot])
            else:
                resize_box(img[int(y0):int(y1), int(x0):int(x1)], 0.0, 0.0, y1 - y0, x1 - x0, out[slot])
        else:
            _, y0, x0, y1, x1, oi, oj, oh, ow = plan
            block = np.empty((oh, ow, 3), np.uint8)
            resize_box(img, y0, x0, y1, x1, block)
            out[slot, oi:oi + oh, oj:oj + ow] = block
            crops.reflect_fill(out[slot], oi, oj, oh, ow)

    def _gpu_batch(self, idx: np.ndarray, keys) -> torch.Tensor:
        size = self.crop.size
        data = [self._bytes(i) for i in idx]
        jpeg = [k for k, i in enumerate(idx) if self.meta[i]["mode"] != IMAGE_MODE_RAW]
        decoded = dict(zip(jpeg, decode_jpeg([data[k] for k in jpeg], mode=ImageReadMode.RGB, device=self.device)))
        out = torch.empty((len(idx), size, size, 3), dtype=torch.uint8, device=self.device)
        for slot, i in enumerate(idx):
            img = decoded.get(slot)
            if img is None:
                img = torch.from_numpy(self._pixels(i, data[slot])).permute(2, 0, 1).to(self.device)
            plan = crop_plan(self.crop, img.shape[1], img.shape[2], keys[slot])
            y0, x0, y1, x1 = (int(round(v)) for v in plan[1:5])
            part = img[:, y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)][None].float()
            if plan[0] == "box":
                res = F.interpolate(part, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
                out[slot] = res[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
            else:
                oi, oj, oh, ow = plan[5:]
                res = F.interpolate(part, size=(oh, ow), mode="bicubic", antialias=True, align_corners=False)
                out[slot, oi:oi + oh, oj:oj + ow] = res[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
                reflect_pad(out[slot], oi, oj, oh, ow)
        return out

    def batches(self, epoch: int, start: int = 0):
        size = self.crop.size
        for idx, keys in self.index_batches(epoch, start):
            labels = self.labels_of(idx)
            if self.pool is None:
                yield self._gpu_batch(idx, keys), labels
                continue
            out = np.empty((len(idx), size, size, 3), np.uint8)
            list(self.pool.map(lambda a: self._cpu_sample(out, *a), zip(range(len(idx)), idx, keys)))
            yield torch.from_numpy(out), labels

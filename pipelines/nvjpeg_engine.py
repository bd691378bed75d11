"""The torch engine: .beton bytes -> torchvision.io.decode_jpeg (nvJPEG on a GPU, libjpeg-turbo on CPU) -> keyed crop.

Needs nothing beyond torch/torchvision: the fallback where DALI is absent, and an FFCV-free reader of the same
files (`dataset_tools.beton`). Sample order, shards and repeats come from the same `EpochOrder`, and every crop box
from the same keys (`crops.py`), as the FFCV engine, so both yield the same samples with the same crops.

On a CPU, decoding and the bicubic resampling (`resample.py`, the FFCV engine's) run on `workers` threads: both
release the GIL. On a GPU the batch is decoded by nvJPEG in one call and each crop is resampled on the device with
the same Pillow bicubic weights over the same fractional box (`resample._coeffs`, applied as two matrix products),
so the GPU path differs from the CPU path only by what nvJPEG's decoder differs from libjpeg-turbo's.
JPEGs nvJPEG refuses (progressive, CMYK, odd subsampling: `jpeg_header.py`) and raw pixels are decoded on the CPU
and uploaded; the refusals are counted per epoch (`epoch_report`).

Streams. torchvision allocates decode_jpeg's outputs on the current stream, but nvJPEG writes them from a stream of
its own that does not wait for work already queued on the current one; a block the caching allocator hands out
again while earlier kernels still read it would be overwritten under them. So the engine decodes and crops on a
stream of its own that it synchronises before each decode (then no kernel of its is pending on any block it can be
given), and hands the batch over by making the caller's stream wait for it (`record_stream` keeps the memory
from being reused while the caller reads it).
"""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from dataset_tools.beton import IMAGE_MODE_RAW

from .beton_source import BetonBatches, reflect_pad, upload
from .crops import BoxPlan, SrcPlan, crop_plan
from .resample import _coeffs, resize_box

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec (warning once per call); they still work and
# need no extra dependency. Moving to torchcodec.decoders is the follow-up once it decodes JPEG on the GPU in batches.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


class NvjpegEngine(BetonBatches):
    def __init__(self, path: str, epoch_order, batch_size: int, crop, device: torch.device, *, workers: int,
                 drop_last: bool, seed: int = 0, rank: int = 0):
        super().__init__(path, epoch_order, batch_size, crop, device, drop_last=drop_last, seed=seed, rank=rank)
        self.pool = ThreadPoolExecutor(max(1, workers)) if device.type == "cpu" else None
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _bytes(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.image_bytes(i))

    def _pixels(self, i: int, data: torch.Tensor) -> np.ndarray:
        m = self.image_row(i)
        if m["mode"] == IMAGE_MODE_RAW:
            return data.numpy().reshape(int(m["height"]), int(m["width"]), 3)
        return decode_jpeg(data, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()

    def _cpu_sample(self, out: np.ndarray, slot: int, i: int, key) -> None:
        img = self._pixels(i, self._bytes(i))
        take_crop(img, crop_plan(self.crop, img.shape[0], img.shape[1], key), self.crop.size, _resize_on_cpu,
                  torch.from_numpy(out[slot]))

    def _decode_on_gpu(self, idx: np.ndarray, data: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """{slot: (3, H, W) uint8 on the device} for the batch's JPEGs that nvJPEG takes; the rest are left out."""
        slots = [k for k, i in enumerate(idx)
                 if self.image_row(i)["mode"] != IMAGE_MODE_RAW and self.gpu_refusal(i, data[k].numpy()) is None]
        if not slots:  # decode_jpeg([]) raises: a batch of raw pixels or refused JPEGs has nothing for nvJPEG
            return {}
        try:
            return dict(zip(slots, decode_jpeg([data[k] for k in slots], mode=ImageReadMode.RGB,
                                               device=self.device)))
        except RuntimeError:
            # One file the header check let through and nvJPEG still refused fails the batched call: retry one by
            # one and leave the refusals to the CPU. A failed call skips torchvision's own synchronisation, and
            # nvJPEG may still be writing outputs it already allocated: wait before their memory is reused.
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            out = {}
            for k in slots:
                try:
                    out[k] = decode_jpeg(data[k], mode=ImageReadMode.RGB, device=self.device)
                except RuntimeError:
                    self.cpu_decoded["refused by nvJPEG"] += 1
            return out

    def _gpu_batch(self, idx: np.ndarray, keys) -> torch.Tensor:
        size = self.crop.size
        data = [self._bytes(i) for i in idx]
        decoded = self._decode_on_gpu(idx, data)
        out = torch.empty((len(idx), size, size, 3), dtype=torch.uint8, device=self.device)
        for slot, i in enumerate(idx):
            if slot in decoded:
                img = decoded[slot].permute(1, 2, 0)  # (H, W, 3) view of nvJPEG's planar output
            else:  # raw pixels, or a JPEG for the CPU decoder: from pinned memory, no host wait
                img = upload(torch.from_numpy(np.ascontiguousarray(self._pixels(i, data[slot]))), self.device)
            take_crop(img, crop_plan(self.crop, img.shape[0], img.shape[1], keys[slot]), size,
                      resize_box_on_device, out[slot])
        return out

    def _gpu_batch_on_own_stream(self, idx: np.ndarray, keys) -> torch.Tensor:
        """The batch decoded and cropped on the engine's stream, ready for the caller's stream (module docstring)."""
        caller = torch.cuda.current_stream(self.device)
        assert self.stream is not None  # the GPU path: a CUDA device has a stream
        self.stream.synchronize()  # nothing of ours still pending on memory the allocator may hand nvJPEG
        with torch.cuda.stream(self.stream):
            out = self._gpu_batch(idx, keys)
        caller.wait_stream(self.stream)
        out.record_stream(caller)
        return out

    def batches(self, epoch: int, start: int = 0):
        size = self.crop.size
        for idx, keys in self.index_batches(epoch, start):
            labels = self.labels_of(idx)
            if self.pool is None:
                yield self._gpu_batch_on_own_stream(idx, keys), labels
                continue
            out = np.empty((len(idx), size, size, 3), np.uint8)
            list(self.pool.map(lambda a, out=out: self._cpu_sample(out, *a), zip(range(len(idx)), idx, keys)))
            yield torch.from_numpy(out), labels


def take_crop(img, plan: BoxPlan | SrcPlan, size: int, resize, out: torch.Tensor) -> None:
    """Write the crop `plan` of img (H, W, 3) into out (size, size, 3), resampling with
    `resize(src, y0, x0, y1, x1, out_h, out_w)`: the one dispatch over plan kinds for the CPU and the GPU path."""
    if isinstance(plan, BoxPlan):
        if plan.whole:  # resize-then-crop: the filter may read around the fractional box
            out[:] = resize(img, plan.y0, plan.x0, plan.y1, plan.x1, size, size)
        else:  # crop-then-resize: only the box's own pixels
            box = img[int(plan.y0):int(plan.y1), int(plan.x0):int(plan.x1)]
            out[:] = resize(box, 0.0, 0.0, plan.y1 - plan.y0, plan.x1 - plan.x0, size, size)
        return
    top, left, h, w = plan.out_top, plan.out_left, plan.out_h, plan.out_w
    out[top:top + h, left:left + w] = resize(img, plan.y0, plan.x0, plan.y1, plan.x1, h, w)
    reflect_pad(out, top, left, h, w)


def _resize_on_cpu(src: np.ndarray, y0, x0, y1, x1, oh: int, ow: int) -> torch.Tensor:
    block = np.empty((oh, ow, 3), np.uint8)
    resize_box(src, y0, x0, y1, x1, block)
    return torch.from_numpy(block)


def _weights(n: int, a: float, b: float, out: int, device: torch.device) -> torch.Tensor:
    """(out, n) matrix of Pillow's bicubic weights resampling [a, b) of n source pixels onto `out` pixels: the
    compact (first tap, weights) of `_coeffs` are uploaded and scattered into the matrix on the device."""
    first, _, w = _coeffs(n, float(a), float(b), out)
    first_t, w_t = upload(torch.from_numpy(first), device), upload(torch.from_numpy(w), device)
    taps = (first_t[:, None] + torch.arange(w.shape[1], device=device)).clamp_(max=n - 1)
    # Weights past a pixel's tap count are 0, so adding them where the clamp folds indices changes nothing.
    return torch.zeros(out, n, device=device).scatter_add_(1, taps, w_t)


def resize_box_on_device(img: torch.Tensor, y0, x0, y1, x1, oh: int, ow: int) -> torch.Tensor:
    """`resample.resize_box` on any device: (H, W, 3) uint8 -> (oh, ow, 3) uint8, horizontal then vertical pass,
    each rounded and clipped to 8 bits as Pillow does. In float32 (not TF32) matrix products it equals the CPU
    resampler to the bit on the test images."""
    wx = _weights(img.shape[1], x0, x1, ow, img.device)
    wy = _weights(img.shape[0], y0, y1, oh, img.device)
    t = torch.einsum("xw,hwc->hxc", wx, img.float()).add_(0.5).floor_().clamp_(0, 255)
    return torch.einsum("yh,hxc->yxc", wy, t).add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)

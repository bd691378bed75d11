"""The torch engine: .beton bytes -> torchvision.io.decode_jpeg (nvJPEG on a GPU, libjpeg-turbo on CPU) -> keyed crop.

Needs nothing beyond torch/torchvision: the fallback where DALI is absent, and an FFCV-free reader of the same
files (`dataset_tools.beton`). Sample order, shards and repeats come from the same `EpochOrder`, and every crop box
from the same keys (`crops.py`), as the FFCV engine, so both yield the same samples with the same crops.

On a CPU, decoding and the bicubic resampling (`resample.py`, the FFCV engine's) run on `workers` threads: both
release the GIL. On a GPU the batch is decoded by nvJPEG in one call and cropped in one batched pass
(`batched_crop`): the images go into one flat buffer, each sample's window (the source rows and columns its crop's
filter reads) is gathered into one (B, 3, h, w) tensor, and Pillow's bicubic weights for every sample, as
(B, size, h) and (B, size, w) matrices with zeros outside its box, are built on the device in one vectorised pass
and applied by two batched matrix products, rounded and clipped after each as Pillow does. Simple Random Crop's
reflect padding is folded into the matrices (a padded output row is the weight row of the block row it mirrors), so
the number of kernels per batch does not depend on the batch size. The weights equal `resample._coeffs`', so the
GPU path differs from the CPU path only by what nvJPEG's decoder differs from libjpeg-turbo's (and float summation
order). JPEGs nvJPEG refuses (progressive, CMYK, odd subsampling: `jpeg_header.py`) and raw pixels are decoded on
the CPU; they, the labels and the batch's crop parameters go up in one pinned upload; the refusals are counted per
epoch (`epoch_report`).

Decode ahead. On a GPU, batch b+1 is decoded and cropped on a thread of the engine's own while the caller's step b
runs (`_gpu_batches`): torchvision's batched decode ends with a stream synchronise, and the per-batch host work
(reading bytes, headers, crop planning, launches) would otherwise sit on the thread that launches the training
step. At most `AHEAD` finished batches wait in a queue; each carries an event, which the caller's stream waits on
(the stream current where the generator is advanced: the loader's side stream), never the host.
The thread's exception is re-raised in the caller; closing the generator (epoch end, a `break`, an error in the
caller) stops and joins the thread.

Streams. torchvision allocates decode_jpeg's outputs on the current stream, but nvJPEG writes them from a stream of
its own that does not wait for work already queued on the current one; a block the caching allocator hands out
again while earlier kernels still read it would be overwritten under them. So the engine decodes and crops on a
stream of its own that it synchronises before each decode (then no kernel of its is pending on any block it can be
given), and hands the batch over by making the caller's stream wait for the batch's event (`record_stream` keeps
the memory from being reused while the caller reads it).

Decoder hardware. A100 and H100-class GPUs have a hardware JPEG engine, which torchvision uses for batched
decoding; on other GPUs (V100, consumer cards) torchvision falls back to nvJPEG's hybrid backend and decodes one
image at a time with the Huffman stage on the CPU (`gpu_decoder_kind` says which, for doctor and profile).
"""

from __future__ import annotations

import queue
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from dataset_tools.beton import IMAGE_MODE_RAW

from .beton_source import BetonBatches, reflect_pad, upload
from .crops import BoxPlan, SrcPlan, crop_plan
from .resample import resize_box

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec (warning once per call); they still work and
# need no extra dependency. Moving to torchcodec.decoders is the follow-up once it decodes JPEG on the GPU in batches.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)


AHEAD = 2  # finished batches that may wait for the caller: one being trained on, one ready, one being decoded
_DONE = object()  # the decode thread's end-of-epoch mark in the queue


class NvjpegEngine(BetonBatches):
    def __init__(
        self,
        path: str,
        epoch_order,
        batch_size: int,
        crop,
        device: torch.device,
        *,
        workers: int,
        drop_last: bool,
        seed: int = 0,
        rank: int = 0,
    ):
        super().__init__(path, epoch_order, batch_size, crop, device, drop_last=drop_last, seed=seed, rank=rank)
        self.pool = ThreadPoolExecutor(max(1, workers)) if device.type == "cpu" else None
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # One batch at a time on the stream, whichever epoch's thread makes it (an epoch left unclosed may still be
        # finishing one): the synchronise before a decode must see every kernel queued on the stream.
        self._stream_lock = threading.Lock()

    def _bytes(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.image_bytes(i))

    def _pixels(self, i: int, data: torch.Tensor) -> np.ndarray:
        m = self.image_row(i)
        if m["mode"] == IMAGE_MODE_RAW:
            return data.numpy().reshape(int(m["height"]), int(m["width"]), 3)
        return decode_jpeg(data, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()

    def _cpu_sample(self, out: np.ndarray, slot: int, i: int, key) -> None:
        img = self._pixels(i, self._bytes(i))
        take_crop(
            img,
            crop_plan(self.crop, img.shape[0], img.shape[1], key),
            self.crop.size,
            _resize_on_cpu,
            torch.from_numpy(out[slot]),
        )

    def _decode_on_gpu(self, idx: np.ndarray, data: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """{slot: (3, H, W) uint8 on the device} for the batch's JPEGs that nvJPEG takes; the rest are left out."""
        slots = [
            k
            for k, i in enumerate(idx)
            if self.image_row(i)["mode"] != IMAGE_MODE_RAW and self.gpu_refusal(i, data[k].numpy()) is None
        ]
        if not slots:  # decode_jpeg([]) raises: a batch of raw pixels or refused JPEGs has nothing for nvJPEG
            return {}
        try:
            return dict(zip(slots, decode_jpeg([data[k] for k in slots], mode=ImageReadMode.RGB, device=self.device)))
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
        """The batch's uint8 crops (B, size, size, 3) on the device (the GPU path without its labels)."""
        return self._gpu_batch_and_labels(idx, keys)[0]

    def _gpu_batch_and_labels(self, idx: np.ndarray, keys) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode (nvJPEG, the CPU for what it refuses), plan every crop on the host, and crop the whole batch in
        one pass; the labels, the plan and any CPU-decoded pixels share one upload."""
        data = [self._bytes(i) for i in idx]
        decoded = self._decode_on_gpu(idx, data)
        # One flat buffer: nvJPEG's planar (3, H, W) outputs, then interleaved (H, W, 3) ones (torchvision's CPU
        # decoder returns a (3, H, W) view of those), then the host's images, interleaved as stored. No copy per
        # image: each goes in as the flat view of its own memory.
        planar = [k for k in sorted(decoded) if decoded[k].is_contiguous()]
        interleaved = [k for k in sorted(decoded) if k not in planar]
        pieces = [decoded[k].reshape(-1) for k in planar] + [
            decoded[k].permute(1, 2, 0).reshape(-1) for k in interleaved
        ]
        shapes, offsets, host, end = {}, {}, [], 0
        for k, piece in zip(planar + interleaved, pieces):
            shapes[k], offsets[k], end = tuple(decoded[k].shape[1:]), end, end + piece.numel()
        for k, i in enumerate(idx):
            if k not in decoded:  # raw pixels, or a JPEG for the CPU decoder
                img = self._pixels(i, data[k])
                shapes[k], offsets[k] = img.shape[:2], end
                host.append(np.ascontiguousarray(img).reshape(-1))
                end += img.size
                interleaved.append(k)
        order = planar + interleaved  # the plan's rows: planar samples first
        plan = plan_batch(
            self.crop,
            [shapes[k] for k in order],
            [offsets[k] for k in order],
            [keys[k] for k in order],
            slots=order,
            planar=len(planar),
        )
        labels = self.samples.labels_at(idx)
        head = np.concatenate([labels.view(np.uint8), plan.params.reshape(-1).view(np.uint8)])
        # [labels int64 | params float64 | host pixels | zeros the last window row may read past the end]
        tail = np.zeros(3 * plan.wwin, np.uint8)
        buf = upload(torch.from_numpy(np.concatenate([head, *host, tail])), self.device)
        labels_t = buf[: labels.nbytes].view(torch.int64)
        params = buf[labels.nbytes : head.size].view(torch.float64).view(plan.params.shape)
        flat = torch.cat([*pieces, buf[head.size :]]) if pieces else buf[head.size :]
        return batched_crop(flat, params, plan), labels_t

    def _gpu_batches(self, epoch: int, start: int = 0):
        """The GPU path's batches, decoded and cropped on a thread of the engine's own (module docstring); on the
        CPU (tests) the same thread and queue, without streams."""
        ready: queue.Queue = queue.Queue(maxsize=AHEAD)
        stop = threading.Event()
        cuda = self.device.type == "cuda"

        def put(item) -> None:
            while not stop.is_set():  # a consumer that left never takes it: look at `stop` now and then
                try:
                    ready.put(item, timeout=0.05)
                    return
                except queue.Full:
                    pass

        def work() -> None:
            try:
                if cuda:
                    torch.cuda.set_device(self.device)  # the thread's current device is its own
                for idx, keys in self.index_batches(epoch, start):
                    if stop.is_set():
                        return
                    with self._stream_lock:
                        if cuda:
                            assert self.stream is not None  # the GPU path: a CUDA device has a stream
                            self.stream.synchronize()  # nothing of ours pending on memory the allocator may hand nvJPEG
                            with torch.cuda.stream(self.stream):
                                images, labels = self._gpu_batch_and_labels(idx, keys)
                                done = torch.cuda.Event()
                                done.record(self.stream)
                        else:
                            images, labels = self._gpu_batch_and_labels(idx, keys)
                            done = None
                    put((images, labels, done))
            except BaseException as e:  # noqa: BLE001  handed to the consumer, who re-raises it
                if sys.version_info >= (3, 11):  # where the re-raise in the caller's thread came from
                    e.add_note(f"(raised in the nvjpeg engine's decode thread, epoch {epoch})")
                put(e)
            else:
                put(_DONE)

        thread = threading.Thread(target=work, name="nvjpeg-decode", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                images, labels, done = item
                if done is not None:
                    caller = torch.cuda.current_stream(self.device)
                    caller.wait_event(done)  # this batch only, not whatever the thread queued since
                    images.record_stream(caller)
                    labels.record_stream(caller)
                yield images, labels
        finally:  # epoch end, a consumer's break or error, or the thread's: nothing of it may outlive the epoch
            stop.set()
            thread.join()

    def batches(self, epoch: int, start: int = 0):
        if self.pool is None:
            yield from self._gpu_batches(epoch, start)
            return
        size = self.crop.size
        for idx, keys in self.index_batches(epoch, start):
            labels = self.labels_of(idx)
            out = np.empty((len(idx), size, size, 3), np.uint8)
            list(self.pool.map(lambda a, out=out: self._cpu_sample(out, *a), zip(range(len(idx)), idx, keys)))
            yield torch.from_numpy(out), labels


def gpu_decoder_kind(device: torch.device) -> str:
    """Which JPEG decoder torchvision's batched decode_jpeg uses on `device`. torchvision asks nvJPEG for its
    hardware backend and falls back to the hybrid one, whose Huffman decoding runs on the CPU, one image at a time;
    torch cannot ask which it got, so this goes by compute capability: the hardware JPEG engine is on sm_80 (A100,
    A30), sm_90 (H100, H200, GH200) and sm_100 (B200) parts, not on V100 (sm_70) or consumer/inference cards."""
    if device.type != "cuda":
        return "CPU (libjpeg-turbo)"
    if torch.cuda.get_device_capability(device) in ((8, 0), (9, 0), (10, 0)):
        return "hardware JPEG engine (nvJPEG, batched)"
    return "CUDA (hybrid, CPU Huffman, one image at a time)"


class BatchPlan(NamedTuple):
    """The host's part of a batched crop: `params` (B, N_PARAMS) float64, a row per sample (per axis: `_AXIS`;
    then the sample's offset in the flat buffer, height, width, and its slot in the batch), the window sizes every
    sample fits in, the most filter taps any output pixel has, and how many rows (the first) are planar images;
    the rest are interleaved. `in_order`: the rows are the slots in order."""

    params: np.ndarray
    size: int
    hwin: int
    wwin: int
    taps: int
    planar: int
    in_order: bool


# Per axis (rows, then columns) and sample: the resampled source extent `n_in` with the box [in0, in1) in it,
# `n_out` output pixels written from `top` on (the rest mirror them: Simple Random Crop), `shift` from the extent's
# coordinates to the image's (the box's corner for RandomResizedCrop, which resamples the cropped box only), and
# `lo`, the first image row/column the sample's window starts at.
_AXIS = ("n_in", "in0", "in1", "n_out", "top", "shift", "lo")
N_PARAMS = 2 * len(_AXIS) + 4


def plan_batch(spec, shapes, offsets, keys, slots=None, planar=None) -> BatchPlan:
    """Every sample's crop (`crops.crop_plan` from its key) as the parameters of `batched_crop`, computed on the
    host with the same float64 expressions as `resample._coeffs`, so the windows hold every tap the device uses."""
    size = spec.size
    p = np.zeros((len(shapes), N_PARAMS), np.float64)
    for k, ((h, w), key) in enumerate(zip(shapes, keys)):
        c = crop_plan(spec, h, w, key)
        if isinstance(c, BoxPlan) and not c.whole:  # crop-then-resize: the box's own pixels only
            rows = (c.y1 - c.y0, 0.0, c.y1 - c.y0, size, 0, c.y0)
            cols = (c.x1 - c.x0, 0.0, c.x1 - c.x0, size, 0, c.x0)
        elif isinstance(c, BoxPlan):  # resize-then-crop: the filter may read around the fractional box
            rows, cols = (h, c.y0, c.y1, size, 0, 0), (w, c.x0, c.x1, size, 0, 0)
        else:
            rows = (h, c.y0, c.y1, c.out_h, c.out_top, 0)
            cols = (w, c.x0, c.x1, c.out_w, c.out_left, 0)
        p[k, 0:6], p[k, 7:13], p[k, 14:17] = rows, cols, (offsets[k], h, w)
    slots = list(range(len(shapes))) if slots is None else list(slots)
    p[:, 17] = slots
    ax = p[:, :14].reshape(-1, 2, 7)  # a copy: read only
    n_in, in0, in1, n_out, shift = ax[..., 0], ax[..., 1], ax[..., 2], ax[..., 3], ax[..., 5]
    scale = (in1 - in0) / n_out
    support = 2.0 * np.maximum(scale, 1.0)
    # _coeffs' first tap of the first output pixel and end of the last one's (centres grow with the pixel index)
    first = np.maximum(np.trunc(in0 + 0.5 * scale - support + 0.5), 0)
    last = np.minimum(np.trunc(in0 + (n_out - 0.5) * scale + support + 0.5), n_in)
    p[:, 6], p[:, 13] = (shift + first).T
    span = (last - first).max(axis=0)
    taps = int(np.ceil(support).max()) * 2 + 1
    return BatchPlan(
        p, size, int(span[0]), int(span[1]), taps, len(shapes) if planar is None else planar, slots == sorted(slots)
    )


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """`resample._bicubic` (a = -0.5) elementwise, the same float64 expressions."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, 0.0))


def batch_weights(params: torch.Tensor, plan: BatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's bicubic weights of every sample, on the params' device in one vectorised pass: rows (B, size, hwin)
    and columns (B, size, wwin) over each sample's window, zero outside its box. Per output pixel the taps,
    weights and normalisation of `resample._coeffs` (float64, then float32 as stored there); an output pixel of
    Simple Random Crop's padding takes the weights of the pixel it mirrors (crops.reflect_fill: rows first, then
    columns, both from the in-image block, which is what mirroring each axis's weights gives)."""
    dev, f64 = params.device, torch.float64
    ax = params[:, :14].view(-1, 2, 1, 7)  # (B, axis, 1: output pixel, field)
    n_in, in0, in1, n_out, top, shift, lo = ax.unbind(-1)
    j = torch.arange(plan.size, device=dev, dtype=f64) - top  # (B, 2, size): index in the resampled block
    last = n_out - 1
    j = torch.where(j < 0, torch.minimum(-j, last), j)  # crops.reflect_fill: row top - k mirrors row top + k
    j = torch.where(j > last, torch.clamp(2 * last - j, min=0), j)
    scale = (in1 - in0) / n_out
    filterscale = scale.clamp(min=1.0)
    support = 2.0 * filterscale
    center = in0 + (j + 0.5) * scale
    xmin = (center - support + 0.5).trunc().clamp_(min=0)
    xmax = torch.minimum((center + support + 0.5).trunc(), n_in)
    x = xmin[..., None] + torch.arange(plan.taps, device=dev, dtype=f64)  # (B, 2, size, taps)
    w = _bicubic((x - center[..., None] + 0.5) / filterscale[..., None]) * (x < xmax[..., None])
    total = w.sum(-1, keepdim=True)
    # _coeffs stores each weight as float32, then divides it by the float64 total into float32 again
    w = torch.where(total != 0, w.float().double() / total, w).float()
    width = max(plan.hwin, plan.wwin)
    # taps past a pixel's count weigh 0: clamped into the window they add nothing where they land
    col = (x + (shift - lo)[..., None]).clamp_(0, width - 1).long()
    m = torch.zeros(w.shape[:-1] + (width,), device=dev).scatter_add_(-1, col, w)
    return m[:, 0, :, : plan.hwin], m[:, 1, :, : plan.wwin]


def batched_crop(flat: torch.Tensor, params: torch.Tensor, plan: BatchPlan) -> torch.Tensor:
    """Every sample's crop from `flat` (uint8: each image at its offset, the first `plan.planar` rows' (3, H, W),
    the others' (H, W, 3), then at least 3 * wwin bytes more) -> (B, size, size, 3) uint8 in slot order, with a
    number of kernels that does not depend on B.

    Each sample's window (its crop's source rows and columns) is gathered into one (B, 3, hwin, wwin) tensor: a
    window row is consecutive bytes from its start in the flat buffer (`wwin` of one channel for a planar image,
    3 * wwin interleaved), i.e. a row of flat.unfold(0, length, 1), so one index of row starts gathers a whole
    layout. A window row may run past its image's row, or a window past its image's last row (clamped onto it);
    the weights there are zero. Then `resample.resize_box`'s passes as batched products, horizontal first, each
    rounded and clipped to 8 bits as Pillow does. Float32 products (torch's default; TF32 would cost grey levels):
    equal to the CPU resampler but for summation order."""
    dev, f64, b, size, hwin, wwin = flat.device, torch.float64, params.shape[0], plan.size, plan.hwin, plan.wwin
    wy, wx = batch_weights(params, plan)
    off, h, w = params[:, 14, None], params[:, 15, None], params[:, 16, None]
    rows = torch.minimum(params[:, 6, None] + torch.arange(hwin, device=dev, dtype=f64), h - 1)  # (B, hwin)
    pixel = rows * w + params[:, 13, None]  # the first window pixel of each row, within its image
    windows = []
    if plan.planar:  # channel c's row at off + c * H * W + pixel
        starts = (off + pixel)[: plan.planar, None] + torch.arange(3, device=dev, dtype=f64)[:, None] * (h * w)[
            : plan.planar, None
        ]
        windows.append(flat.unfold(0, wwin, 1)[starts.long()])
    if plan.planar < b:  # all three channels' row at off + 3 * pixel
        starts = (off + 3 * pixel)[plan.planar :]
        rgb = flat.unfold(0, 3 * wwin, 1)[starts.long()].view(b - plan.planar, hwin, wwin, 3)
        windows.append(rgb.permute(0, 3, 1, 2))
    window = (windows[0] if len(windows) == 1 else torch.cat(windows)).float()  # (B, 3, hwin, wwin)
    t = torch.bmm(window.reshape(b, 3 * hwin, wwin), wx.transpose(1, 2))  # (B, 3 * hwin, size)
    t = t.add_(0.5).floor_().clamp_(0, 255)
    t = t.view(b, 3, hwin, size).transpose(1, 2).reshape(b, hwin, 3 * size)
    o = torch.bmm(wy, t).add_(0.5).floor_().clamp_(0, 255)  # (B, size: y, 3 * size: channel, x)
    o = o.view(b, size, 3, size).permute(0, 1, 3, 2)
    out = torch.empty((b, size, size, 3), dtype=torch.uint8, device=dev)
    if plan.in_order:
        return out.copy_(o)
    return out.index_copy_(0, params[:, 17].long(), o.to(torch.uint8))


def take_crop(img, plan: BoxPlan | SrcPlan, size: int, resize, out: torch.Tensor) -> None:
    """Write the crop `plan` of img (H, W, 3) into out (size, size, 3), resampling with
    `resize(src, y0, x0, y1, x1, out_h, out_w)`: the CPU path's dispatch over plan kinds (the GPU path's is
    `plan_batch`)."""
    if isinstance(plan, BoxPlan):
        if plan.whole:  # resize-then-crop: the filter may read around the fractional box
            out[:] = resize(img, plan.y0, plan.x0, plan.y1, plan.x1, size, size)
        else:  # crop-then-resize: only the box's own pixels
            box = img[int(plan.y0) : int(plan.y1), int(plan.x0) : int(plan.x1)]
            out[:] = resize(box, 0.0, 0.0, plan.y1 - plan.y0, plan.x1 - plan.x0, size, size)
        return
    top, left, h, w = plan.out_top, plan.out_left, plan.out_h, plan.out_w
    out[top : top + h, left : left + w] = resize(img, plan.y0, plan.x0, plan.y1, plan.x1, h, w)
    reflect_pad(out, top, left, h, w)


def _resize_on_cpu(src: np.ndarray, y0, x0, y1, x1, oh: int, ow: int) -> torch.Tensor:
    block = np.empty((oh, ow, 3), np.uint8)
    resize_box(src, y0, x0, y1, x1, block)
    return torch.from_numpy(block)

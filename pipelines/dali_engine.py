"""The DALI engine: .beton bytes -> DALI (nvJPEG "mixed" decode on a GPU, CPU decode otherwise) -> keyed crop.

The bytes come from `dataset_tools.beton` through `fn.external_source`, one batch per call, in the sampler's
order, so epochs are exact (the last batch may be short; DALI readers' wrap-around never happens). Each crop is
one `fn.resize` of the sample's box from `crops.crop_plan` (ROI in source pixels, cubic with antialiasing, which
is PIL's bicubic to within a grey level); Simple Random Crop resizes the in-image part to its size, `fn.slice`
places it in the padded output, and the reflect padding is filled after DALI, as the other engines do.
Without a GPU, DALI runs its CPU operators (`device_id=None`), which is what CI exercises. On a GPU, JPEGs nvJPEG
refuses (progressive, CMYK, odd subsampling) are decoded by DALI's own CPU fallback; the engine counts them per
epoch from their headers (`epoch_report`), as the nvjpeg engine does.
"""

from __future__ import annotations

import gc
from collections import deque

import numpy as np
import torch

from . import crops
from .beton_source import BetonBatches, reflect_pad, upload
from .errors import DataError

# Batches DALI schedules ahead of the one collected: with 2, batch b+1 is decoded while the consumer runs step b (with
# 1 the decoder idled through every step). The source is still called once per batch, in the sampler's order.
PREFETCH = 2

# DALI's import parses every operator argument's default (thousands of ast.literal_eval). CPython 3.11 keeps one AST
# depth counter per interpreter: a garbage collection inside one of those parses can run a finalizer that parses too
# (or that hands the GIL to a thread that does), and the import dies with "SystemError: AST constructor recursion
# depth mismatch", leaving `nvidia` half-imported for the rest of the process (it failed a CI run). With the
# collector off no Python code runs inside a parse. Everything of DALI's this module uses is imported here, at once.
_gc_was_enabled = gc.isenabled()
gc.disable()
try:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import backend, pipeline_def
    from nvidia.dali.plugin.pytorch import feed_ndarray
    from nvidia.dali.tensors import TensorListGPU
except ImportError as e:  # pragma: no cover - exercised by the missing-dependency test in a subprocess
    raise ImportError(
        f"the dali engine needs NVIDIA DALI ({e}); install it with: pip install -e '.[dali]' "
        "(nvidia-dali-cuda120; nvidia-dali-cuda130 for CUDA 13 drivers), or use data.engine: "
        "nvjpeg, which needs only torch"
    ) from None
finally:
    if _gc_was_enabled:
        gc.enable()


class DaliEngine(BetonBatches):
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
        if self.samples.has_raw_images():
            raise DataError(
                f"{path} stores raw pixels; the dali engine reads JPEG files (convert with "
                "--write-mode jpg, or use data.engine: ffcv or nvjpeg)"
            )
        gpu = device.type == "cuda" and backend.GetCUDADeviceCount() > 0
        self.gpu = gpu
        self._feed = _Feed()
        self._mid_epoch = False  # a pass began and was not run to its end: DALI may hold its batches decoded ahead
        self.pipe = self._pipeline(
            batch_size=batch_size,
            num_threads=max(1, workers),
            device_id=(device.index or 0) if gpu else None,
            prefetch_queue_depth=PREFETCH,
            exec_dynamic=True,
            gpu=gpu,
        )
        self.pipe.build()

    @pipeline_def
    def _pipeline(self, gpu: bool):
        size, src = self.crop.size, self.crop.kind == "src"
        enc, roi0, roi1, out_hw, *anchor = fn.external_source(
            source=self._feed,
            num_outputs=5 if src else 4,
            batch=True,
            dtype=[types.UINT8] + [types.FLOAT] * (4 if src else 3),
        )
        img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)
        img = fn.resize(
            img,
            size=out_hw,
            roi_start=roi0,
            roi_end=roi1,
            roi_relative=False,
            interp_type=types.INTERP_CUBIC,
            antialias=True,
            dtype=types.UINT8,
        )
        if src:
            img = fn.slice(
                img,
                anchor[0],
                fn.constant(fdata=[float(size), float(size)]),
                axis_names="HW",
                normalized_anchor=False,
                normalized_shape=False,
                out_of_bounds_policy="pad",
                fill_values=0,
            )
        return img

    def _inputs(self, idx: np.ndarray, keys) -> tuple[tuple, list]:
        """DALI's inputs for one batch (bytes, ROI, output size[, slice anchor]) and the SRC paddings to fill after."""
        size = float(self.crop.size)
        enc, r0, r1, hw, anchor, pads = [], [], [], [], [], []
        for slot, i in enumerate(idx):
            m = self.image_row(i)
            plan = crops.crop_plan(self.crop, int(m["height"]), int(m["width"]), keys[slot])
            enc.append(self.image_bytes(i))
            if self.gpu:
                self.gpu_refusal(i, enc[-1])
            r0.append(np.array((plan.y0, plan.x0), np.float32))
            r1.append(np.array((plan.y1, plan.x1), np.float32))
            if isinstance(plan, crops.SrcPlan):
                hw.append(np.array([plan.out_h, plan.out_w], np.float32))
                anchor.append(np.array([-plan.out_top, -plan.out_left], np.float32))
                pads.append((plan.out_top, plan.out_left, plan.out_h, plan.out_w))
            else:
                hw.append(np.array([size, size], np.float32))
        return ((enc, r0, r1, hw, anchor) if pads else (enc, r0, r1, hw)), pads

    def batches(self, epoch: int, start: int = 0):
        # DALI pulls a batch's inputs when it schedules it, PREFETCH - 1 ahead of the one we collect; the queue keeps
        # each batch's labels and paddings in step, and only the batches in flight are held in memory.
        if self._mid_epoch:
            self._discard_pass()
        in_flight: deque = deque()
        plan = self.index_batches(epoch, start)

        def next_input():
            idx, keys = next(plan)
            data, pads = self._inputs(idx, keys)
            in_flight.append((idx, pads))
            return data

        self._feed.next = next_input
        self._mid_epoch = True
        try:
            while True:
                try:
                    # On a GPU the outputs are handed over on the consumer's stream, which keeps DALI's buffer
                    # alive until the copy out of it (feed_ndarray, queued on that stream) has run.
                    (out,) = self.pipe.run(torch.cuda.current_stream(self.device)) if self.gpu else self.pipe.run()
                except StopIteration:
                    break
                idx, pads = in_flight.popleft()
                images = _to_torch(out, self.device)
                for slot, pad in enumerate(pads):
                    reflect_pad(images[slot], *pad)
                yield images, self.labels_of(idx)
            self.pipe.reset()
            self._mid_epoch = False
        finally:  # also when the epoch is abandoned (next_input refers to the engine), unless a newer one is on
            if self._feed.next is next_input:
                self._feed.next = _exhausted

    def _discard_pass(self):
        """End the pass left part-way: the batches DALI decoded ahead for it are collected and dropped (else the next
        pass's first outputs would be the old pass's), and the pipeline is reset (after a pass whose source had
        already ended, DALI would otherwise end the next one at once). Done here, when the next pass starts, not when
        the old generator is closed: that can come from the collector, in a process forked meanwhile, where running
        the parent's pipeline hangs."""
        self._feed.next = _exhausted
        try:
            while True:
                self.pipe.run()
        except StopIteration:
            pass
        self.pipe.reset()
        self._mid_epoch = False


def _to_torch(out, device: torch.device) -> torch.Tensor:
    """DALI's output batch as a torch tensor on `device`. What DALI returned decides the copy, not the device asked
    for: a GPU pipeline gives a TensorListGPU, a CPU one (no visible GPU for DALI) a TensorListCPU."""
    if isinstance(out, TensorListGPU):
        t = out.as_tensor()
        images = torch.empty(t.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(t, images, cuda_stream=torch.cuda.current_stream(device))
        return images
    return upload(torch.from_numpy(out.as_array()), device)


def _exhausted():
    raise StopIteration  # ends DALI's epoch


class _Feed:
    """What the pipeline's external_source calls for a batch's inputs: the current epoch's, set by `batches`.
    The pipeline holds this, not a bound method of the engine: with that cycle an engine dropped was freed, with
    its pipeline and DALI's threads, only by a later garbage collection, which can come in a process forked
    meanwhile (a convert worker, which then hung destroying the parent's DALI executor)."""

    def __init__(self):
        self.next = _exhausted

    def __call__(self):
        return self.next()

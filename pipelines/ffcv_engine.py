"""The FFCV engine: JPEG decode + primary crop on CPU threads (numba), uint8 batches moved to the device early.

FFCV runs a pipeline of `Operation`s per field. Ours is `[DeiTCropDecoder, ToTensor, ToDevice]` for images and
`[IntDecoder, ToTensor, Squeeze, ToDevice]` for labels. The decoder is FFCV's `ResizedCropRGBImageDecoder` with three
changes: the crop is chosen by `crops.py` from a per-sample key instead of numba's thread-local np.random; the
resize is PIL's bicubic (`resample.py`), as the official transforms use, instead of OpenCV's area interpolation,
which turns upscaled small crops blocky; and a third crop kind, Simple Random Crop with reflect padding. The
epoch's part of the key is read at run time from `KeyCell`: FFCV compiles the decoder once, so a Python value
captured at compile time could not change per epoch.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import carray, types
from numba.extending import intrinsic

from . import crops, keys
from .errors import DataError
from .crops import CropSpec
from .resample import resize_box

_torch_threads = torch.get_num_threads()  # importing FFCV sets 1 (below, it is given back)

try:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
    from ffcv.libffcv import imdecode
    from ffcv.loader import Loader as FFCVLoader
    from ffcv.loader import epoch_iterator as ffcv_epoch_iterator
    from ffcv.loader import loader as ffcv_loader
    from ffcv.memory_managers.os_cache import OSCacheManager
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.transforms import Squeeze, ToDevice, ToTensor
    from ffcv.traversal_order.base import TraversalOrder
except ImportError as e:  # pragma: no cover - exercised by the missing-dependency test in a subprocess
    raise ImportError(
        f"the ffcv engine needs FFCV ({e}); install it with: pip install -e '.[ffcv]' "
        "(needs pkg-config, g++, libturbojpeg0-dev, libopencv-dev; `make install` does all)"
    ) from None


torch.set_num_threads(_torch_threads)


def _set_decode_threads(cls, n: int) -> None:
    """FFCV's `Compiler.set_num_threads`, less its `torch.set_num_threads(n)`. FFCV calls it with num_workers when
    a loader is made, at each epoch and in its epoch thread, so torch's threads followed data.workers: the training
    step's reductions then summed in an order that changed with the worker count (issue 28), and 2 workers on 2
    cores left the step 2 threads beside the decode's. torch's share is set by build_loader (cores.py)."""
    cls.num_threads = n
    numba.set_num_threads(n)  # numba's count is per calling thread: FFCV sets it where the decode runs


Compiler.set_num_threads = classmethod(_set_decode_threads)


def _compile_os_cache_reader(self):
    """FFCV's `OSCacheManager.compile_reader` (data.os_cache: true), typed without changing numba's own types.

    FFCV builds the reader's signature by setting `.mutable = False` on `numba.uint8[::1]`, which is numba's one
    shared instance of that type: its hash changes under every compiled function's table of overloads that holds
    it. numba then raises KeyError on those tables: "Exception ignored" at each loader freed (ablate's variants, a
    resolution ramp), and a decode thread that died compiling against a table it had spoilt. Same reader, same
    (read-only data) signature, from types made read-only as numba means them to be."""
    data = types.Array(types.uint8, 1, "C", readonly=True)
    index = types.Array(types.uint64, 1, "C")

    def read(address, mem_state):
        size = mem_state[2][np.searchsorted(mem_state[1], address)]
        return mem_state[0][address : address + size]

    return Compiler.compile(read, data(types.uint64, types.Tuple([data, index, index])))


OSCacheManager.compile_reader = _compile_os_cache_reader


class _SlotSafeEpochIterator(ffcv_epoch_iterator.EpochIterator):
    """FFCV's epoch thread, made to wait on the host for a slot's copy to the device before it writes the slot again.

    FFCV 1.0.2 keeps batches_ahead + 2 slots, each a pinned host buffer, a device buffer and a CUDA stream of its
    own. Batch k is decoded (on this thread, by the CPU) into host slot k % slots, and `ToDevice(non_blocking=True)`
    queues its copy on the slot's stream, after a GPU-side wait for the consumer to be done with the slot's device
    buffer (batch k - slots). Nothing makes the host wait for that copy: when the GPU runs a few batches behind the
    host (a long training step; the copy of batch k then waits behind it), this thread decodes batch k + slots into
    the same pinned memory before the copy of batch k has read it, and batch k silently arrives with the pixels and
    labels of batch k + slots. So an event is recorded on the slot's stream after its copies, and the host waits for
    it before decoding into the slot again. It waits only when the GPU is that far behind, where the next
    decode has nowhere to go anyway (a blocking copy instead would stall the decode on every batch's copy)."""

    def __init__(self, *args, **kwargs) -> None:
        self._slot_copied: dict[int, torch.cuda.Event] = {}  # before FFCV's __init__, which starts the thread
        super().__init__(*args, **kwargs)

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        stream = self.cuda_streams[batch_slot]  # None where FFCV saw no CUDA device: nothing is asynchronous
        copied = self._slot_copied.pop(batch_slot, None)
        if copied is not None:
            copied.synchronize()
        result = super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
            self._slot_copied[batch_slot] = event
        return result


# FFCV's Loader.__iter__ builds its epoch thread from this module-level name.
ffcv_loader.EpochIterator = _SlotSafeEpochIterator


class KeyCell:
    """One uint64 shared between Python (writes the epoch key) and the compiled decoder (reads it)."""

    def __init__(self):
        self.array = np.zeros(1, dtype=np.uint64)
        self.address = self.array.ctypes.data

    def set(self, key: int | np.uint64) -> None:
        self.array[0] = np.uint64(key)


@intrinsic
def _u64_pointer(typingctx, address):
    sig = types.CPointer(types.uint64)(types.uintp)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


_KINDS = {"rrc": 0, "src": 1, "center": 2}


class DeiTCropDecoder(ResizedCropRGBImageDecoder):
    get_crop_generator = None  # FFCV's hook for (h, w, scale, ratio) crops; ours need the sample's key instead

    def __init__(self, spec: CropSpec, key_cell: KeyCell):
        super().__init__((spec.size, spec.size))
        self.spec, self.key_cell = spec, key_cell

    def declare_state_and_memory(self, previous_state):
        state, (out, decoded) = super().declare_state_and_memory(previous_state)
        # SRC resizes the in-image part of its window here before placing it inside the padded output.
        staging = AllocationQuery((self.spec.size, self.spec.size, 3), np.dtype("<u1"))
        return state, (out, decoded, staging)

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        s = self.spec
        kind, size, pad, center_ratio = _KINDS[s.kind], s.size, s.pad, s.center_ratio
        scale_lo, scale_hi = s.scale
        log_lo, log_hi = np.log(s.ratio[0]), np.log(s.ratio[1])
        address = self.key_cell.address
        rrc_box, src_box, center_box = crops.rrc_box, crops.src_box, crops.center_box
        sample_key, reflect_fill = keys.sample_key, crops.reflect_fill

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, staging = my_storage
            epoch_key = carray(_u64_pointer(address), (1,))[0]
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    image = temp_storage[dst_ix]
                    imdecode_c(image_data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = image.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                h_, w_ = int(height), int(width)
                out = destination[dst_ix]
                if kind == 0:  # crop, then resize the crop (taps stay inside it, as PIL's crop + resize)
                    i, j, h, w = rrc_box(
                        h_, w_, scale_lo, scale_hi, log_lo, log_hi, sample_key(epoch_key, source_ix, dst_ix)
                    )
                    resize_box(image[i : i + h, j : j + w], 0.0, 0.0, float(h), float(w), out)
                elif kind == 2:  # resize the whole image, then crop: a fractional box of the whole image
                    y0, x0, y1, x1 = center_box(h_, w_, size, center_ratio)
                    resize_box(image, y0, x0, y1, x1, out)
                else:
                    key = sample_key(epoch_key, source_ix, dst_ix)
                    y0, x0, y1, x1, oi, oj, oh, ow = src_box(h_, w_, size, pad, key)
                    block = staging[dst_ix].reshape(-1)[: oh * ow * 3].reshape(oh, ow, 3)
                    resize_box(image, y0, x0, y1, x1, block)
                    out[oi : oi + oh, oj : oj + ow] = block
                    reflect_fill(out, oi, oj, oh, ow)
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class _Order(TraversalOrder):
    """FFCV asks its traversal order for each epoch's indices; ours are the sampler's (repeats, shards)."""

    def __init__(self, epoch_order):
        self.epoch_order = epoch_order
        self.window = slice(None)  # which part of the epoch the next pass visits (FFCVEngine.batches sets it)

    def __call__(self, loader):  # FFCV builds an order by calling what it was given with the loader
        TraversalOrder.__init__(self, loader)
        return self

    def sample_order(self, epoch: int):
        return self.epoch_order.indices(epoch)[self.window].astype(np.uint64)


class FFCVEngine:
    """The `Engine` (engine.py) of FFCV's loader: CPU decode threads, batches moved to `device` early."""

    def __init__(
        self,
        path: str,
        epoch_order,
        batch_size: int,
        crop: CropSpec,
        device: torch.device,
        *,
        workers: int,
        os_cache: bool,
        drop_last: bool,
        seed: int = 0,
        rank: int = 0,
    ):
        self.key_cell, self.seed, self.rank, self.crop = KeyCell(), seed, rank, crop
        self.epoch_order = epoch_order
        # numba's thread pool is sized to the cores it can see; asking for more is an error, not a slowdown.
        workers = max(1, min(workers, numba.config.NUMBA_NUM_THREADS))
        to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
        self.order, self.batch_size = _Order(epoch_order), batch_size
        self.loader = FFCVLoader(
            path,
            batch_size=batch_size,
            num_workers=workers,
            os_cache=os_cache,
            drop_last=drop_last,
            order=self.order,
            batches_ahead=2,
            pipelines={
                "image": [DeiTCropDecoder(crop, self.key_cell), ToTensor(), *to_device],
                "label": [IntDecoder(), ToTensor(), Squeeze(1), *to_device],
            },
        )

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int, start: int = 0):
        self.key_cell.set(keys.epoch_key(self.seed, self.rank, epoch))
        # Starting part-way keeps batch boundaries (a crop key includes the slot in the batch); the end is cut
        # here because FFCV would otherwise emit a partial last batch under drop_last.
        self.order.window = slice(start * self.batch_size, len(self) * self.batch_size)
        self.loader.next_epoch = epoch
        thread = iter(self.loader)
        try:
            while True:
                _wait_for_a_batch(thread)
                try:
                    images, labels = next(thread)
                except StopIteration:
                    break
                # FFCV reuses its buffers: the labels are copied here, the images by the batch augmentation's first op.
                yield images, labels.to(torch.int64, copy=True)
        finally:
            _stop(thread)

    def epoch_report(self) -> dict:
        return {}  # FFCV decodes every JPEG on the CPU: nothing is refused


def _wait_for_a_batch(thread) -> None:
    """Wait, as FFCV's `__next__` does, for the thread's next batch or its end of epoch, but not for good: a thread
    that died (an error in its compiled pipeline, out of memory) would leave the run waiting forever, on every rank
    of a job. One consumer, so a batch seen here is still there for `__next__`."""
    queue = thread.output_queue
    with queue.not_empty:  # the queue's own lock: qsize() would take it again
        while not queue._qsize():
            if not thread.is_alive():
                raise DataError(
                    "FFCV's decode thread stopped with an error (its traceback is printed above); the "
                    "epoch cannot go on"
                )
            queue.not_empty.wait(1.0)


def _stop(thread) -> None:
    """End an FFCV epoch thread before its buffers go. FFCV's own `close` only sets a flag, which the thread reads
    when its queue is full, and frees the buffers at once: a consumer that leaves an epoch early (a stop request, an
    error, `sys.exit` in a Slurm requeue) would leave it decoding into freed memory, and at interpreter exit a daemon
    thread inside native code aborts the process ('terminate called without an active exception'). So: the flag,
    no batches left to decode (the thread then hands over the epoch's end), the queue emptied until it has, then
    free."""
    thread.terminate_event.set()
    thread.iter_ixes = iter(())  # FFCV 1.0's thread takes its next batch's indices from here
    while thread.is_alive():
        thread.join(0.2)
        while not thread.output_queue.empty():
            thread.output_queue.get_nowait()
    thread.close()

"""`Loader`: an engine's uint8 batches through the batch augmentation and mixing (an engine that augments on the host,
`host_augment` in registry.py, skips it). The training loop sees only this."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
import torch

from . import keys
from .cores import CpuShare
from .engine import Engine


class Prepared(NamedTuple):
    """One model-ready batch and what was drawn for it (the preview captions it, the distribution tests check it)."""

    images: torch.Tensor
    targets: torch.Tensor
    params: Any  # the augmentation ops' per-sample AugParams (ops.py), None where the engine augments on the host
    mix: Any  # the mixing's MixDraw (mix.py), None without mixing


class Loader:
    """Iterable of model-ready `(images, targets)`; `len()` batches per epoch; `set_epoch` like torch samplers.

    Without `set_epoch` each full pass moves on to the next epoch, so a plain `for` loop still reshuffles.
    `iter_from(batch)` starts an epoch part-way with exactly the batches an uninterrupted pass would give there:
    crops are keyed per sample, and the augmentation ops and mixing draw from streams keyed per batch.
    On CUDA the engine's next batch and its augmentation are queued on a side stream while the caller computes on the
    current one.

    `dtype` is what the batch is cast to last (`augment` may work in float32 so that mixing blends in float32).
    An engine registered with `host_augment` yields augmented, normalised float batches: `augment` is then None,
    and they are only mixed, cast and put in channels-last memory as the augmentation's output is.
    `set_resolution` changes the primary crop's size (and the batch size) between epochs (progressive resolution),
    given `make_engine` (a (CropSpec, batch size) -> Engine factory).
    """

    def __init__(
        self,
        engine: Engine,
        augment,
        mixing,
        *,
        device: torch.device,
        seed: int,
        rank: int,
        dtype: torch.dtype | None = None,
        make_engine=None,
        cpu_share: CpuShare | None = None,
    ):
        self.engine, self.augment, self.mixing = engine, augment, mixing
        self.cpu_share = cpu_share  # data.workers and torch's threads as build_loader resolved them
        self._make_engine = make_engine
        self._engines: dict = {}
        self.device, self.seed, self.rank = device, seed, rank
        self.dtype = dtype or (augment.dtype if augment is not None else torch.float32)
        self.epoch = 0
        self._side = None  # the CUDA side stream of _prefetched, made once

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.engine)

    @property
    def samples(self) -> int:
        """This rank's samples per epoch (a training epoch's whole batches may hold fewer)."""
        return len(self.engine.epoch_order)

    def sample_indices(self, epoch: int):
        """This rank's sample indices of `epoch` in the order its batches hold them (numpy int64)."""
        return self.engine.epoch_order.indices(epoch)

    def raw_batches(self, epoch: int, start: int = 0):
        """The engine's own batches of `epoch` from batch `start` on: (uint8 images (B, H, W, 3), labels) on the
        device, before the batch augmentation and mixing (what `profile` times as the engine alone). Close the
        generator, or run it out, before the next pass: an engine runs one pass at a time."""
        return self.engine.batches(epoch, start)

    def set_resolution(self, size: int, batch_size: int | None = None) -> None:
        """Crop to `size`, in batches of `batch_size` (None: as now), from the next pass on. An engine is built once
        per (size, batch size) and kept (FFCV and DALI compile their pipelines for one output size); the samples,
        their order and every crop box stay what they were, as they depend on the keys only, so at another size only
        the resampling changes."""
        now = (self.engine.crop.size, self.engine.batch_size)
        want = (size, batch_size or self.engine.batch_size)
        if want == now:
            return
        self._engines.setdefault(now, self.engine)
        if want not in self._engines:
            if self._make_engine is None:
                raise ValueError("this loader was built without an engine factory; it cannot change resolution")
            self._engines[want] = self._make_engine(replace(self.engine.crop, size=size), want[1])
        self.engine = self._engines[want]

    def _keys(self, batch: int):
        """Batch `batch`'s key (each augmentation op derives its own stream from it, ops.py) and mixing's generator."""
        key = int(keys.combine(keys.epoch_key(self.seed, self.rank, self.epoch), np.uint64(batch)))
        return key, np.random.default_rng(key)

    def prepare(self, b: int, images, labels):
        """Batch `b` of the current epoch from the engine's uint8 images: augmented, mixed, model-ready.
        Returns a `Prepared`: images, targets, the ops' AugParams or None, the mixing's MixDraw or None."""
        key, rng = self._keys(b)
        if self.augment is None:
            x, params = images.float().contiguous(memory_format=torch.channels_last), None
        else:
            x, params = self.augment(images, key)
        y, mix = labels, None
        if self.mixing is not None:
            x, y, mix = self.mixing.mix(x, labels, rng)
        return Prepared(x.to(self.dtype), y, params, mix)

    def iter_with_params(self, start: int = 0):
        """Like iteration, but each batch also with what was drawn for it: the ops' per-sample parameters (see
        ops.AugParams) and the mixing's draw (mix.MixDraw): the `Prepared` that `prepare` returns."""
        engine_batches = self.engine.batches(self.epoch, start)
        batches = enumerate(engine_batches, start)
        try:
            if self.device.type == "cuda":
                yield from self._prefetched(batches)
            else:
                for b, (images, labels) in batches:
                    yield self.prepare(b, images, labels)
        finally:  # an error here (out of memory in the augmentation) must not leave the engine's decode threads running
            engine_batches.close()
        self.epoch += 1

    def _prefetched(self, batches):
        """The engine is advanced, and batch b+1 augmented, on a side stream while the consumer's kernels for batch
        b run on the current (main) one; the main stream waits for the side stream only after step b is queued,
        right before batch b+1 is handed over, and `record_stream` keeps the allocator from reusing the batch's
        memory while the main stream still reads it."""
        if self._side is None:
            # One stream for the loader's life, from the high-priority pool: streams made anew come round-robin from
            # the pool that the nvJPEG decoder's and FFCV's also come from, and sharing one serialises decode with
            # the training step
            self._side = torch.cuda.Stream(self.device, priority=-1)
        main, side = torch.cuda.current_stream(self.device), self._side
        pending = None
        while True:
            # An engine may rewrite memory of its own that main's kernels of earlier batches read (FFCV's device
            # slots, a batch handed through unchanged). Main has step b-2 queued here (b-1 is handed over below):
            # batch b waits for step b-2 and is made while step b-1 runs.
            side.wait_stream(main)
            # Advanced inside the side stream's context, not outside it: what the engine queues for batch b (FFCV's
            # copy wait, DALI's output copy, the nvjpeg engine's event wait, a label upload) lands on `side`. On
            # main it would sit ahead of step b-1, queued below, and the step would wait for the decode.
            with torch.cuda.stream(side):
                item = next(batches, None)
                if item is None:
                    break
                b, (images, labels) = item
                ready = self.prepare(b, images, labels)
            if pending is not None:
                yield pending
            main.wait_stream(side)
            # the batch, its augmentation's and mixing's draws: all made on `side`
            drawn = [t for p in (ready.params, ready.mix) if p is not None for t in p.tensors()]
            _hand_over([ready.images, ready.targets, *drawn], main)
            pending = ready
        if pending is not None:
            yield pending

    def epoch_report(self) -> dict:
        """What the engine counted in the epoch just finished (e.g. images its GPU decoder refused)."""
        return self.engine.epoch_report()

    def iter_from(self, start: int):
        for batch in self.iter_with_params(start):
            yield batch.images, batch.targets

    def __iter__(self):
        return self.iter_from(0)


def _hand_over(tensors, stream) -> None:
    """Keep the caching allocator from giving these tensors' memory out again while `stream`, which did not make
    them, may still read it (host tensors need nothing)."""
    for t in tensors:
        if t.is_cuda:
            t.record_stream(stream)

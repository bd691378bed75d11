"""Parallel conversion into one or more .beton files: worker processes decode, resize and encode source images; the
parent appends them, in order, to each output's `beton.BetonWriter`. No FFCV is needed.

Why this shape (FFCV's `DatasetWriter` has workers write pages themselves):
* a bad source file is simply not appended: no pre-pass to count good files, one decode per image;
* samples are stored in order, so the allocation table is sorted by sample and by pointer (readers need no sort);
* several outputs (shards, a held-out split) are written at once from one pool of workers;
* a failing or killed worker stops the whole write with its message (disk full, --strict, a vanished file) instead
  of hanging; progress goes to a callback (a rich bar).
Memory stays bounded: at most `4 x workers` chunks are in flight, and finished chunks wait only for their
predecessors in the same output.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import queue
import signal
import traceback
from typing import Any
from dataclasses import dataclass
from itertools import zip_longest
from multiprocessing import Queue
from collections.abc import Callable

import numpy as np

from .beton import IMAGE_MODE_JPG, IMAGE_MODE_RAW, BetonWriter
from .errors import ConversionError
from .images import BadImage, load_rgb

MODES = ("RGB", "L", "CMYK", "P", "RGBA", "LA", "PA", "I;16", "I", "F", "1", "YCbCr", "other")


@dataclass(frozen=True)
class Encoding:
    """How images are stored: the size caps of `images.stored_size`, JPEG or raw pixels, the JPEG quality."""

    max_resolution: int | None = 256
    short_side: int | None = None
    write_mode: str = "jpg"  # jpg | raw | proportion (JPEG with compress_probability)
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    seed: int = 0

    def as_jpeg(self, source_ix: int) -> bool:
        if self.write_mode != "proportion":
            return self.write_mode == "jpg"
        # Decided by (seed, source file index) alone: a re-run, or another shard layout, stores the same way.
        return np.random.RandomState((self.seed * 1_000_003 + source_ix) % 2**32).rand() < self.compress_probability

    def encode(self, rgb: np.ndarray, source_ix: int) -> tuple[np.ndarray, int]:
        """(stored bytes, mode) of an RGB image already at its stored size."""
        if not self.as_jpeg(source_ix):
            return np.ascontiguousarray(rgb).reshape(-1), IMAGE_MODE_RAW
        import cv2

        ok, jpg = cv2.imencode(
            ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [int(cv2.IMWRITE_JPEG_QUALITY), self.jpeg_quality]
        )
        if not ok:
            raise ConversionError("OpenCV could not encode a JPEG")
        return jpg.reshape(-1), IMAGE_MODE_JPG


@dataclass
class Part:
    """One output file: `samples` are indices into the source list, in the order they are stored."""

    path: str
    samples: list[int]


@dataclass
class WriteResult:
    num_written: int
    skipped: list[tuple[int, str]]  # (index into the source list, reason)
    source_info: np.ndarray  # (num_written, 4): source index, width, height, mode code
    stored_hw: np.ndarray  # (num_written, 2): stored height, width
    stored_bytes: np.ndarray  # (num_written,): bytes of each stored image
    file_bytes: int
    sha256: str = ""  # of the finished file (set by the caller, which knows its final path)


def _die_with_parent(parent: int) -> None:
    """If the converting process is SIGKILLed, its workers must not live on as orphans (waiting for work forever,
    holding its stdout and stderr open)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: workers are daemonic and exit with a normally ending parent
    if os.getppid() != parent:  # killed between the fork and the prctl: no signal will come
        os._exit(1)


def _worker(
    work: Queue, results: Queue, samples: list[tuple[str, int]], enc: Encoding, strict: bool, parent: int
) -> None:
    """Chunks of (part, chunk number, source indices) in, one ('chunk', ...) message per chunk out; a problem is one
    ('error', text) message and the end of this worker."""
    _die_with_parent(parent)
    # The parent alone handles Ctrl-C (the terminal signals the whole group) and stops workers with SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        while (item := work.get()) is not None:
            part, chunk_no, indices = item
            rows: list[tuple[int, Any]] = []  # (sample, error message or encoded row)
            for i in indices:
                path, label = samples[i]
                try:
                    rgb, info = load_rgb(path, enc.max_resolution, enc.short_side)
                except BadImage as e:
                    if strict:
                        raise ConversionError(f"{path}: {e} (--strict)") from None
                    rows.append((i, str(e)))
                    continue
                data, mode = enc.encode(rgb, i)
                code = MODES.index(info.mode) if info.mode in MODES else len(MODES) - 1
                rows.append((i, (data, mode, rgb.shape[0], rgb.shape[1], label, info.width, info.height, code)))
            results.put(("chunk", part, chunk_no, rows))
    except ConversionError as e:
        results.put(("error", str(e)))
    except BaseException:
        results.put(("error", "writer process failed:\n" + traceback.format_exc()))


class _Output:
    """One part being written: chunks arrive in any order and are appended in order."""

    def __init__(self, part: Part, page_size: int, chunksize: int):
        self.writer = BetonWriter(part.path, max(1, len(part.samples)), page_size)
        self.num_chunks = -(-len(part.samples) // chunksize)
        self.next_chunk, self.waiting = 0, {}  # type: tuple[int, dict]
        self.skipped, self.info, self.hw, self.nbytes = [], [], [], []  # type: tuple[list, list, list, list]

    def receive(self, chunk_no: int, rows) -> int:
        """Park `rows` until its predecessors are in; returns how many chunks were appended now."""
        self.waiting[chunk_no] = rows
        before = self.next_chunk
        while self.next_chunk in self.waiting:
            for i, row in self.waiting.pop(self.next_chunk):
                if isinstance(row, str):
                    self.skipped.append((i, row))
                    continue
                data, mode, h, w, label, src_w, src_h, code = row
                self.writer.add(data, mode, h, w, label)
                self.info.append((i, src_w, src_h, code))
                self.hw.append((h, w))
                self.nbytes.append(data.nbytes)
            self.next_chunk += 1
        return self.next_chunk - before

    @property
    def done(self) -> bool:
        return self.next_chunk == self.num_chunks

    def close(self) -> WriteResult:
        size = self.writer.close()
        return WriteResult(
            len(self.info),
            self.skipped,
            np.array(self.info, np.int64).reshape(-1, 4),
            np.array(self.hw, np.int64).reshape(-1, 2),
            np.array(self.nbytes, np.int64),
            size,
        )


def write_parts(
    samples: list[tuple[str, int]],
    parts: list[Part],
    enc: Encoding,
    *,
    workers: int,
    strict: bool,
    progress: Callable[[int], None] | None = None,
    page_size: int = 8 << 20,
    chunksize: int = 32,
) -> list[WriteResult]:
    """Write every part (all at once, from one pool of `workers` processes); returns their results in order.
    Raises ConversionError (with the worker's message) or OSError (from writing an output)."""
    progress = progress or (lambda done: None)
    outputs = [_Output(p, page_size, chunksize) for p in parts]
    # Round-robin over the parts, so shards grow together and finish together.
    per_part = [
        [(k, c, p.samples[c * chunksize : (c + 1) * chunksize]) for c in range(o.num_chunks)]
        for k, (p, o) in enumerate(zip(parts, outputs))
    ]
    feed = iter([item for group in zip_longest(*per_part) for item in group if item is not None])
    # fork, whatever the platform default (forkserver from Python 3.14): workers inherit the sample list, and
    # _die_with_parent's parent check assumes the converter is their parent.
    ctx = multiprocessing.get_context("fork")
    work, results = ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(work, results, samples, enc, strict, os.getpid()), daemon=True)
        for _ in range(workers)
    ]
    # Chunks fed and not yet appended (outstanding or parked behind a slower predecessor): bounded, so a slow or
    # lost chunk cannot make the parent hold the rest of the output in memory.
    in_flight, fed_all, done = 0, False, 0
    try:
        # The workers must never collect what they inherit: a collection would run the caller's finalizers in them
        # (a dropped DALI pipeline's destructor hung a worker this way). Frozen objects are left out of collections
        # in the children for good, and in the caller only until every worker has forked.
        try:
            gc.freeze()
            for p in procs:
                p.start()
        finally:
            gc.unfreeze()
        while not all(o.done for o in outputs):
            while not fed_all and in_flight < 4 * workers:
                item = next(feed, None)
                if item is None:
                    fed_all = True
                    for _ in procs:
                        work.put(None)
                else:
                    work.put(item)
                    in_flight += 1
            # A worker that reports an error exits normally; a non-zero exit is a kill (the OOM killer), checked on
            # every pass: with messages arriving all the time a timeout would never come.
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise ConversionError(
                    f"a writer process died (exit code {dead[0].exitcode}; out of memory? try fewer --workers)"
                )
            try:
                msg = results.get(timeout=0.1)
            except queue.Empty:
                continue
            if msg[0] == "error":
                raise ConversionError(msg[1])
            _, k, chunk_no, rows = msg
            done += len(rows)
            in_flight -= outputs[k].receive(chunk_no, rows)
            progress(done)
        return [o.close() for o in outputs]
    finally:
        for o in outputs:
            if not o.writer.fp.closed:
                o.writer.fp.close()
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            if p.pid is not None:
                p.join(timeout=5)

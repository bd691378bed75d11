"""FFCV's `DatasetWriter`, made safe for real image folders.

FFCV writes a .beton with a fixed sample count and worker processes that encode samples into shared pages.
Three things in it do not suit a 1.28M-file ImageNet conversion, and are changed here (the format, the fields'
encoders and the page allocator are FFCV's own, so the output is an ordinary .beton):

* a bad source file would need a pre-pass to be excluded from the count (a second decode of every image).
  Instead workers skip it, leave its metadata row empty, and `finalize` drops the empty rows and renumbers the
  allocation table: one decode per image, and bad files cost nothing up front.
* an exception in a worker makes FFCV's progress loop wait forever. Here a failing or killed worker stops the
  whole write with its message (disk full, strict mode, a file that changed during the run).
* progress goes to a callback (a rich bar) instead of tqdm.
"""
from __future__ import annotations

import ctypes
import queue
import signal
import traceback
from dataclasses import dataclass
from multiprocessing import Process, Queue, Value
from typing import Callable

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.memory_allocator import MemoryAllocator
from ffcv.types import ALLOC_TABLE_TYPE
from ffcv.utils import chunks
from ffcv.writer import DatasetWriter, handle_sample

from .errors import ConversionError
from .images import BadImage, load_rgb

MODES = ("RGB", "L", "CMYK", "P", "RGBA", "LA", "PA", "I;16", "I", "F", "1", "YCbCr", "other")


@dataclass
class ImageSources:
    """What the workers read: sample i is `samples[i]`, decoded with the checks in `images.load_rgb`."""
    samples: list[tuple[str, int]]
    max_resolution: int
    seed: int

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int):
        path, label = self.samples[i]
        # 'proportion' mode draws np.random inside FFCV's encoder: seed per sample so a re-run writes the same file.
        np.random.seed((self.seed * 1_000_003 + i) % 2**32)
        rgb, info = load_rgb(path, self.max_resolution)
        return (rgb, label), info


def _die_with_parent() -> None:
    """If the converting process is SIGKILLed, its workers must not live on as orphans writing to nowhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: workers are daemonic and exit with a normally ending parent


def _worker(input_queue, metadata_sm, metadata_type, fields, allocator, done_number, result_queue,
            sources: ImageSources, strict: bool):
    """One writer process. Sends exactly one message: ('ok', ...) or ('error', text)."""
    _die_with_parent()
    # The parent alone handles Ctrl-C (the terminal signals the whole group) and stops workers with SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        metadata = np.frombuffer(metadata_sm.buf, dtype=metadata_type)
        names = metadata_type.names
        skipped: list[tuple[int, str]] = []
        # Per written sample: its index, source width/height and mode code (for the report's statistics).
        seen = []
        # Not `with allocator:` — on an error its exit would wait for this worker's turn to flush a page, delaying
        # the stop until every other worker is done. A failed write is discarded, so the page need not be flushed.
        allocator.__enter__()
        while (chunk := input_queue.get()) is not None:
            for dest_ix, source_ix in chunk:
                try:
                    sample, info = sources.load(source_ix)
                except BadImage as e:
                    if strict:
                        raise ConversionError(f"{sources.samples[source_ix][0]}: {e} (--strict)") from None
                    skipped.append((dest_ix, str(e)))
                    continue
                handle_sample(sample, dest_ix, names, metadata, allocator, fields)
                mode = MODES.index(info.mode) if info.mode in MODES else len(MODES) - 1
                seen.append((dest_ix, info.width, info.height, mode))
            with done_number.get_lock():
                done_number.value += len(chunk)
        allocator.__exit__(None, None, None)
        result_queue.put(("ok", allocator.allocations, skipped, np.array(seen, dtype=np.int64).reshape(-1, 4)))
    except ConversionError as e:
        result_queue.put(("error", str(e)))
    except OSError as e:
        result_queue.put(("error", f"writing failed: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")))
    except BaseException:
        result_queue.put(("error", "writer process failed:\n" + traceback.format_exc()))


@dataclass
class WriteResult:
    num_written: int
    skipped: list[tuple[int, str]]     # (index into sources.samples, reason)
    source_info: np.ndarray            # (num_written, 4): source index, width, height, mode code
    stored_hw: np.ndarray              # (num_written, 2): stored height, width (after max_resolution)
    stored_bytes: np.ndarray           # (num_written,): encoded image bytes


class SkippingDatasetWriter(DatasetWriter):
    def __init__(self, fname: str, *, max_resolution: int, write_mode: str, jpeg_quality: int,
                 compress_probability: float, num_workers: int, strict: bool,
                 progress: Callable[[int], None] | None = None, page_size: int = 8 << 20):
        fields = {
            "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                   jpeg_quality=jpeg_quality, compress_probability=compress_probability),
            "label": IntField(),
        }
        super().__init__(fname, fields, num_workers=num_workers, page_size=page_size)
        self.strict = strict
        self.progress = progress or (lambda done: None)

    def write(self, sources: ImageSources, chunksize: int = 64) -> WriteResult:
        n = len(sources)
        self.num_samples = n
        self.prepare()
        work: Queue = Queue()
        for chunk in chunks(list(enumerate(range(n))), chunksize):
            work.put(chunk)
        for _ in range(self.num_workers):
            work.put(None)
        results: Queue = Queue()
        done_number = Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done_number, results,
                sources, self.strict)
        procs = [Process(target=_worker, args=args, daemon=True) for _ in range(self.num_workers)]
        try:
            for p in procs:
                p.start()
            replies = []
            while len(replies) < len(procs):
                self.progress(done_number.value)
                try:
                    reply = results.get(timeout=0.1)
                except queue.Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead and results.empty():
                        raise ConversionError(f"a writer process died (exit code {dead[0].exitcode}; "
                                              "out of memory? try fewer --workers)") from None
                    continue
                if reply[0] == "error":
                    raise ConversionError(reply[1])
                replies.append(reply)
            self.progress(done_number.value)
            for p in procs:
                p.join()
            allocations = [a for r in replies for a in r[1]]
            skipped = sorted(s for r in replies for s in r[2])
            seen = np.concatenate([r[3] for r in replies])
            seen = seen[np.argsort(seen[:, 0], kind="stable")]
            stored = self._finalize_compacted(allocations, [i for i, _ in skipped])
            return WriteResult(len(seen), skipped, seen, *stored)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                if p.pid is not None:
                    p.join(timeout=5)
            self.metadata_sm.close()
            self.metadata_sm.unlink()

    def _finalize_compacted(self, allocations, skipped_ix: list[int]):
        """FFCV's finalize, minus the rows of skipped samples: metadata is compacted, sample ids renumbered.

        Data pointers are absolute file offsets, so the data pages stay where they were written."""
        meta = np.frombuffer(self.metadata_sm.buf, dtype=self.metadata_type)
        keep = np.ones(len(meta), dtype=bool)
        keep[skipped_ix] = False
        new_id = np.cumsum(keep) - 1
        compact = meta[keep]
        table = np.array(allocations, dtype=ALLOC_TABLE_TYPE) if allocations else np.zeros(0, ALLOC_TABLE_TYPE)
        if len(table):
            table["sample_id"] = new_id[table["sample_id"].astype(np.int64)]
        self.header["num_samples"] = int(keep.sum())
        with open(self.fname, "r+b") as fp:
            fp.seek(self.metadata_start)
            fp.write(compact.tobytes())
            table_at = fp.seek(0, 2)
            fp.write(table.tobytes())
            self.header["alloc_table_ptr"] = table_at
            fp.seek(0)
            fp.write(self.header.tobytes())
        image = compact[compact.dtype.names[0]]
        sizes = np.zeros(len(compact), dtype=np.int64)
        if len(table):
            # Each image is one allocation; look its size up by pointer.
            order = np.argsort(table["ptr"])
            pos = np.searchsorted(table["ptr"][order], image["data_ptr"])
            sizes = table["size"][order][np.clip(pos, 0, len(table) - 1)].astype(np.int64)
        return np.stack([image["height"], image["width"]], axis=1).astype(np.int64), sizes

"""The .beton format, read and written without FFCV: this module is its one owner.

Reading (`Beton`): header, field descriptors, metadata and allocation table as numpy arrays, and each sample's
encoded image bytes through a memory map. Every offset is checked against the file size, so a truncated, corrupted
or foreign file is one `BetonError` naming what is wrong, never a numpy traceback.
Writing (`BetonWriter`): samples appended in order by one process; FFCV's `Reader` and `Loader` read the result.

Format (FFCV version 2, little-endian), in file order:
  header        HEADER: version 2, field count, page size (a power of two >= 2 MiB), sample count, and the
                offset of the allocation table
  descriptors   FIELD_DESC per field: FFCV type id, ASCII name (16 bytes), 1024 bytes of arguments (zeros for the
                image and int fields)
  metadata      one aligned row per sample, a column per field: an image is (mode 0 = JPEG | 1 = raw RGB, width,
                height, data_ptr), an int is its value. A writer may reserve more rows than `num_samples` (samples
                it skipped); readers take the first `num_samples`.
  pages         from the first page boundary after the metadata, `page_size` bytes each, zero-padded: a sample's
                data never crosses a page boundary, so FFCV's page cache can read whole pages
  alloc table   ALLOC_ENTRY (sample_id, ptr, size) per allocation, to the end of the file. `data_ptr` and `ptr`
                are absolute file offsets. This writer stores samples in order, so the table is sorted by both
                sample id and pointer; FFCV's writer (parallel pages) leaves it in page-completion order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .errors import UserError

FORMAT_VERSION = 2

HEADER = np.dtype(
    [
        ("version", "<u2"),
        ("num_fields", "<u2"),
        ("page_size", "<u4"),
        ("num_samples", "<u8"),
        ("alloc_table_ptr", "<u8"),
    ],
    align=True,
)
FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
ALLOC_ENTRY = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])

_PTR_SIZE = np.dtype([("ptr", "<u8"), ("size", "<u8")])
# FFCV type ids -> (name, metadata row dtype). Only the image and scalar fields are decoded here, but every
# known field's row size is needed to locate the others.
FIELD_TYPES = {
    0: ("float", np.dtype("<f8")),
    1: ("int", np.dtype("<i8")),
    2: ("rgb_image", np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])),
    3: ("bytes", _PTR_SIZE),
    4: ("ndarray", np.dtype("<u8")),
    5: ("json", _PTR_SIZE),
    6: ("torch_tensor", np.dtype("<u8")),
}
IMAGE_MODE_JPG, IMAGE_MODE_RAW = 0, 1


TYPE_INT, TYPE_RGB_IMAGE = 1, 2


class BetonError(UserError):
    """Not a readable .beton; the message names the file and the problem."""


@dataclass(frozen=True)
class Field:
    name: str
    kind: str


class Beton:
    """`Beton(path)` validates the whole layout up front; then `image_bytes(i)`, `label(i)` are cheap."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self.file_size = os.path.getsize(self.path)
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if self.file_size else np.zeros(0, np.uint8)
        except OSError as e:
            raise BetonError(f"{self.path}: cannot open ({e.strerror or e})") from None
        self._parse()

    def _fail(self, what: str) -> BetonError:
        return BetonError(
            f"{self.path}: {what} — not a valid .beton (truncated or not written by "
            "deit3-convert/FFCV); convert the source folder again"
        )

    def _parse(self) -> None:
        if self.file_size < HEADER.itemsize:
            raise self._fail(f"file is {self.file_size} bytes, shorter than the {HEADER.itemsize}-byte header")
        h = np.frombuffer(self._mm[: HEADER.itemsize].tobytes(), dtype=HEADER)[0]
        if int(h["version"]) != FORMAT_VERSION:
            raise self._fail(f"format version {int(h['version'])}, expected {FORMAT_VERSION}")
        page = int(h["page_size"])
        if page < (1 << 21) or page & (page - 1):
            raise self._fail(f"page size {page} is not a power of two >= 2 MiB")
        nf = int(h["num_fields"])
        if not 1 <= nf <= 64:
            raise self._fail(f"{nf} fields")
        self.num_samples, self.page_size = int(h["num_samples"]), page
        desc_end = HEADER.itemsize + nf * FIELD_DESC.itemsize
        if desc_end > self.file_size:
            raise self._fail("field descriptors run past the end of the file")
        desc = np.frombuffer(self._mm[HEADER.itemsize : desc_end].tobytes(), dtype=FIELD_DESC)
        fields: list[Field] = []
        row: list = []
        for d in desc:
            tid = int(d["type_id"])
            try:
                name = bytes(d["name"]).split(b"\0")[0].decode("ascii")
            except UnicodeDecodeError:
                raise self._fail("a field name is not ASCII") from None
            if tid not in FIELD_TYPES or not name:
                raise self._fail(f"field {name!r} has unknown type id {tid}")
            if name in (f.name for f in fields):
                raise self._fail(f"two fields are named {name!r}")
            kind, dt = FIELD_TYPES[tid]
            fields.append(Field(name, kind))
            row.append((name, dt))
        self.fields = fields
        self.row_dtype = np.dtype(row, align=True)
        meta_end = desc_end + self.num_samples * self.row_dtype.itemsize
        table_at = int(h["alloc_table_ptr"])
        if meta_end > self.file_size:
            raise self._fail(f"metadata for {self.num_samples} samples runs past the end of the file")
        if not meta_end <= table_at <= self.file_size:
            raise self._fail(
                f"allocation table offset {table_at} is outside the file ({self.file_size} bytes); "
                "the file is probably truncated"
            )
        if (self.file_size - table_at) % ALLOC_ENTRY.itemsize:
            raise self._fail("allocation table size is not a whole number of entries; the file is truncated")
        self.metadata = np.frombuffer(self._mm, dtype=self.row_dtype, count=self.num_samples, offset=desc_end)
        table = (
            np.frombuffer(self._mm, dtype=ALLOC_ENTRY, offset=table_at)
            if table_at < self.file_size
            else np.zeros(0, ALLOC_ENTRY)
        )
        if len(table):
            ptr, size = table["ptr"], table["size"]
            # Compared one by one first: ptr + size could wrap around uint64 and pass as a small end.
            if (
                ptr.min() < meta_end
                or ptr.max() > table_at
                or size.max() > table_at
                or (ptr + size).max() > table_at
                or table["sample_id"].max() >= self.num_samples
            ):
                raise self._fail("allocation table points outside the data region")
        self.alloc_table, self.alloc_table_ptr = table, table_at
        for f in self.fields:
            if f.kind == "rgb_image":
                self._check_images(f.name)

    def _check_images(self, name: str) -> None:
        img = self.metadata[name]
        if len(img) and (img["mode"].max() > IMAGE_MODE_RAW or img["width"].min() == 0 or img["height"].min() == 0):
            raise self._fail(f"image field {name!r} has rows with an unknown mode or zero size")
        if len(img) and not np.isin(img["data_ptr"], self.alloc_table["ptr"]).all():
            raise self._fail(f"image field {name!r} has data pointers missing from the allocation table")

    @cached_property
    def _size_by_ptr(self) -> tuple[np.ndarray, np.ndarray]:
        ptr = self.alloc_table["ptr"]
        if len(ptr) < 2 or bool((ptr[1:] > ptr[:-1]).all()):  # our writer's tables are sorted already
            return ptr, self.alloc_table["size"]
        order = np.argsort(ptr, kind="stable")
        return ptr[order], self.alloc_table["size"][order]

    @cached_property
    def image_field(self) -> str:
        return self.field("rgb_image")

    @cached_property
    def label_field(self) -> str:
        return self.field("int")

    def image_row(self, i: int):
        """Sample i's image metadata: mode, width, height, data_ptr."""
        return self.metadata[self.image_field][i]

    def labels_at(self, idx) -> np.ndarray:
        return np.asarray(self.metadata[self.label_field][idx]).astype(np.int64)

    def has_raw_images(self) -> bool:
        return bool((self.metadata[self.image_field]["mode"] == IMAGE_MODE_RAW).any())

    def field(self, kind: str) -> str:
        """Name of the first field of `kind` ("rgb_image", "int", ...)."""
        for f in self.fields:
            if f.kind == kind:
                return f.name
        raise BetonError(f"{self.path}: has no {kind} field (fields: {', '.join(f.name for f in self.fields)})")

    def __len__(self) -> int:
        return self.num_samples

    def image_meta(self, field: str = "image") -> np.ndarray:
        return self.metadata[field]

    def image_bytes(self, i: int, field: str | None = None) -> np.ndarray:
        """The stored bytes of sample i's image: a JPEG stream (mode jpg) or raw RGB pixels (mode raw)."""
        ptr = self.metadata[field or self.image_field][i]["data_ptr"]
        ptrs, sizes = self._size_by_ptr
        size = int(sizes[np.searchsorted(ptrs, ptr)])
        return self._mm[int(ptr) : int(ptr) + size]

    def decode(self, i: int, field: str | None = None) -> np.ndarray:
        """Sample i's image as RGB uint8 (H, W, 3), on the CPU."""
        field = field or self.image_field
        meta = self.metadata[field][i]
        data = self.image_bytes(i, field)
        h, w = int(meta["height"]), int(meta["width"])
        if meta["mode"] == IMAGE_MODE_RAW:
            if data.size != h * w * 3:
                raise BetonError(f"{self.path}: sample {i} has {data.size} raw bytes, expected {h}x{w}x3")
            return np.asarray(data).reshape(h, w, 3).copy()
        import cv2  # only JPEGs need OpenCV (an optional package: the ffcv extra brings it)

        try:
            bgr = cv2.imdecode(np.asarray(data), cv2.IMREAD_COLOR) if data.size else None
        except cv2.error:  # OpenCV asserts on some malformed streams instead of returning None
            bgr = None
        if bgr is None or bgr.shape[:2] != (h, w):
            raise BetonError(f"{self.path}: sample {i} does not decode to its recorded {w}x{h} JPEG")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def labels(self, field: str = "label") -> np.ndarray:
        return np.asarray(self.metadata[field]).astype(np.int64)


class BetonWriter:
    """Appends samples (an encoded image and an int label) to a new .beton at `path`, in order, from one process.

    `capacity` rows of metadata are reserved up front (the metadata comes before the data), so at most `capacity`
    samples can be added; `close()` writes the metadata of the ones added, the allocation table and the header.
    Until then the header says "version 0", so a file left by a crash is never mistaken for a .beton."""

    def __init__(self, path: str, capacity: int, page_size: int = 8 << 20, *, image="image", label="label"):
        if page_size < (1 << 21) or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size} is not a power of two >= 2 MiB")
        self.capacity, self.page_size, self.n = capacity, page_size, 0
        self.row = np.dtype([(image, FIELD_TYPES[TYPE_RGB_IMAGE][1]), (label, FIELD_TYPES[TYPE_INT][1])], align=True)
        self.meta = np.zeros(capacity, self.row)
        self._image, self._label = image, label
        self.desc = np.zeros(2, FIELD_DESC)
        for d, (name, tid) in zip(self.desc, ((image, TYPE_RGB_IMAGE), (label, TYPE_INT))):
            d["type_id"] = tid
            d["name"][: len(name)] = np.frombuffer(name.encode("ascii"), np.uint8)
        self.meta_start = HEADER.itemsize + self.desc.nbytes
        self.data_start = -(-(self.meta_start + self.meta.nbytes) // page_size) * page_size
        self.table = np.zeros(capacity, ALLOC_ENTRY)
        # Buffered: its write() writes everything or raises (a raw write may stop short on a full disk).
        self.fp = open(path, "r+b" if os.path.exists(path) else "w+b")
        self.fp.truncate(0)
        self.fp.write(np.zeros(1, HEADER).tobytes())  # version 0 until close()
        self.page = np.zeros(page_size, np.uint8)
        self.page_no, self.used = 0, 0

    def add(self, data: np.ndarray, mode: int, height: int, width: int, label: int) -> None:
        """One sample: `data` is the JPEG stream (mode 0) or the raw RGB pixels (mode 1)."""
        size = data.nbytes
        if size > self.page_size:
            raise BetonError(
                f"an image of {size} bytes does not fit in a {self.page_size >> 20} MiB page; store "
                "smaller images (--max-resolution / --short-side) or JPEG"
            )
        if self.n >= self.capacity:
            raise BetonError(f"more than the {self.capacity} samples reserved")
        if self.used + size > self.page_size:
            self._flush_page()
        ptr = self.data_start + self.page_no * self.page_size + self.used
        self.page[self.used : self.used + size] = data.reshape(-1).view(np.uint8)
        self.used += size
        self.meta[self.n] = ((mode, width, height, ptr), label)
        self.table[self.n] = (self.n, ptr, size)
        self.n += 1

    def _flush_page(self) -> None:
        if self.used == 0:
            return
        self.fp.seek(self.data_start + self.page_no * self.page_size)
        self.fp.write(self.page.data)  # whole pages, zero-padded, as FFCV writes them
        self.page[: self.used] = 0
        self.page_no, self.used = self.page_no + 1, 0

    def close(self) -> int:
        """Finish the file; returns its size in bytes."""
        self._flush_page()
        table_at = self.data_start + self.page_no * self.page_size
        self.fp.truncate(table_at)  # also extends a file with no page yet: the table always starts at a page
        self.fp.seek(table_at)
        self.fp.write(self.table[: self.n].tobytes())
        self.fp.seek(HEADER.itemsize)
        self.fp.write(self.desc.tobytes())
        self.fp.write(self.meta[: self.n].tobytes())
        header = np.zeros(1, HEADER)
        header[0] = (FORMAT_VERSION, 2, self.page_size, self.n, table_at)
        self.fp.seek(0)
        self.fp.write(header.tobytes())
        self.fp.flush()
        size = self.fp.seek(0, os.SEEK_END)
        self.fp.close()
        return size

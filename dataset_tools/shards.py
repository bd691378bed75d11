"""Shard folders: N .beton files and `manifest.json`, read as one data set. This module owns the manifest format.

    OUT_DIR/shard-00000-of-00004.beton (+ .json, its conversion report)  ...  shard-00003-of-00004.beton
    OUT_DIR/holdout.beton (+ .json)            with --holdout: K images per class, not in any shard
    OUT_DIR/manifest.json                      written last, once every shard is complete and verified

manifest.json: {"format": "deit3-fast shards", "version": 1, "classes": [...label order...], "num_samples",
"shards": [{"file", "num_samples", "bytes", "sha256"}, ...], "holdout": {...} | null, "options": {...},
"report": {the merged conversion report}}.

A shard set's sample i is sample i - offset[s] of shard s, shards in manifest order (offsets are the running sums of
their sample counts): every engine orders, shuffles and deals ranks over this global index. Shards are opened
lazily, on first read, and only their header and tables are mapped; labels are read per batch.

`open_samples(path)` takes a .beton, a shard folder or its manifest.json, and returns an object with the same
reading methods either way (`Beton` or `ShardSet`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .beton import IMAGE_MODE_RAW, Beton, BetonError

MANIFEST = "manifest.json"
FORMAT = "deit3-fast shards"
SOURCES = ".sources.txt"  # beside each written file: each sample's source file, relative to SRC, in sample order
REPORT = ".json"  # beside each written file: its conversion report (OUT.beton -> OUT.beton.json)


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.beton"


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()  # read in chunks: hashlib.file_digest needs Python 3.11
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def is_shard_set(path: str | os.PathLike) -> bool:
    """A path names a shard set when it is a folder or a manifest.json; anything else is read as one .beton."""
    p = Path(path)
    return p.is_dir() or p.name == MANIFEST


def manifest_path(path: str | os.PathLike) -> Path | None:
    """The manifest a shard set's path names, or None for anything else."""
    p = Path(path)
    return (p / MANIFEST if p.is_dir() else p) if is_shard_set(p) else None


def read_manifest(path: str | os.PathLike) -> dict:
    m = manifest_path(path)
    if m is None:
        raise BetonError(f"{path}: not a shard folder or manifest")
    if not m.exists():
        shards = sorted(m.parent.glob("shard-*.beton")) if m.parent.is_dir() else []
        if shards:
            raise BetonError(
                f"{path}: no {MANIFEST} yet: {len(shards)} shard file(s) are there, and the manifest is "
                "written when all are complete; run the missing --shard-index tasks (or the same "
                "command without it)"
            )
        raise BetonError(
            f"{path}: a folder without {MANIFEST}, so not a .beton or a shard set; convert with "
            "deit3-convert SRC OUT.beton (or SRC OUT_DIR --shards N)"
        )
    try:
        manifest = json.loads(m.read_text())
    except (OSError, ValueError) as e:
        raise BetonError(f"{m}: unreadable ({e}); convert again or rerun one --shard-index task to rewrite it") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not manifest.get("shards"):
        raise BetonError(f"{m}: not a deit3-convert shard manifest")
    return manifest


def write_manifest(
    folder: str | os.PathLike, classes: list[str], shards: list[dict], holdout: dict | None, options: dict, report: dict
) -> dict:
    """Write FOLDER/manifest.json (atomically); `shards` and `holdout` are {"file", "num_samples", "bytes",
    "sha256"} entries. Returns the manifest."""
    from .atomic import write_text_atomic

    manifest = {
        "format": FORMAT,
        "version": 1,
        "classes": classes,
        "num_classes": len(classes),
        "num_samples": sum(e["num_samples"] for e in shards),
        "shards": shards,
        "holdout": holdout,
        "options": options,
        "report": report,
    }
    write_text_atomic(Path(folder) / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def classes_of(path: str | os.PathLike) -> list[str] | None:
    """The class list (label order) of a .beton (from its report), a shard set (from its manifest) or an ImageFolder
    tree (its class folders, sorted: the labels deit3-convert and the reference engine give them); None if there is
    no report."""
    from .imagefolder import is_image_folder

    if is_image_folder(path):
        return sorted(e.name for e in os.scandir(os.fspath(path)) if not e.name.startswith(".") and e.is_dir())
    if is_shard_set(path):
        return list(read_manifest(path)["classes"])
    report = Path(str(path) + REPORT)
    try:
        classes = json.loads(report.read_text()).get("classes")
    except (OSError, ValueError, AttributeError):
        return None
    return list(classes) if isinstance(classes, list) else None


def source_names(path: str | os.PathLike) -> list[str] | None:
    """Each sample's source file (relative to the converted folder), in sample order, of a .beton or a shard set
    (global order); None when the files were written without the list."""
    if (m := manifest_path(path)) is not None:  # a shard set
        files = [m.parent / e["file"] for e in read_manifest(path)["shards"]]
    else:
        files = [Path(path)]
    names = []
    for f in files:
        try:
            names += Path(str(f) + SOURCES).read_text().splitlines()
        except OSError:
            return None
    return names


class ShardSet:
    """The shards of a manifest as one data set, with `Beton`'s reading methods over the global index."""

    def __init__(self, path: str | os.PathLike):
        self.manifest = read_manifest(path)
        m = manifest_path(path)
        assert m is not None  # read_manifest refused a path that names no manifest
        self.folder = m.parent
        self.path = str(self.folder)
        entries = self.manifest["shards"]
        self.files = [self.folder / e["file"] for e in entries]
        for f, e in zip(self.files, entries):
            if not f.exists():
                raise BetonError(f"{f}: listed in {self.folder / MANIFEST} but missing; copy or convert it again")
            if f.stat().st_size != e["bytes"]:
                raise BetonError(
                    f"{f}: {f.stat().st_size} bytes, the manifest says {e['bytes']}: an incomplete "
                    "copy? run deit3-fast stage again, or convert this shard again"
                )
        counts = np.array([e["num_samples"] for e in entries], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.num_samples = int(self.offsets[-1])
        self.classes = list(self.manifest["classes"])
        self.stores_raw = self.manifest.get("options", {}).get("write_mode", "jpg") != "jpg"
        self._open: dict[int, Beton] = {}

    def __len__(self) -> int:
        return self.num_samples

    def shard(self, s: int) -> Beton:
        if s not in self._open:
            b = Beton(self.files[s])
            if len(b) != self.offsets[s + 1] - self.offsets[s]:
                raise BetonError(
                    f"{self.files[s]}: {len(b)} samples, the manifest says "
                    f"{self.offsets[s + 1] - self.offsets[s]}; convert this shard again"
                )
            self._open[s] = b
        return self._open[s]

    def locate(self, i) -> tuple[np.ndarray, np.ndarray]:
        """(shard, index in shard) of global sample indices."""
        i = np.asarray(i, np.int64)
        if i.size and (i.min() < 0 or i.max() >= self.num_samples):
            raise IndexError(f"sample index out of range 0..{self.num_samples - 1}")
        s = np.searchsorted(self.offsets, i, side="right") - 1
        return s, i - self.offsets[s]

    def _one(self, i: int) -> tuple[Beton, int]:
        s, j = self.locate(int(i))
        return self.shard(int(s)), int(j)

    def image_row(self, i: int):
        b, j = self._one(i)
        return b.image_row(j)

    def image_bytes(self, i: int) -> np.ndarray:
        b, j = self._one(i)
        return b.image_bytes(j)

    def decode(self, i: int) -> np.ndarray:
        b, j = self._one(i)
        return b.decode(j)

    def labels_at(self, idx) -> np.ndarray:
        s, j = self.locate(idx)
        out = np.empty(len(s), np.int64)
        for shard in np.unique(s):
            here = s == shard
            out[here] = self.shard(int(shard)).labels_at(j[here])
        return out

    def has_raw_images(self) -> bool:
        return self.stores_raw


def open_samples(path: str | os.PathLike) -> Beton | ShardSet:
    """A .beton or a shard set (folder or manifest.json), with the same reading methods."""
    return ShardSet(path) if is_shard_set(path) else Beton(path)


__all__ = [
    "IMAGE_MODE_RAW",
    "MANIFEST",
    "ShardSet",
    "classes_of",
    "is_shard_set",
    "open_samples",
    "read_manifest",
    "shard_name",
    "sha256_of",
    "source_names",
    "write_manifest",
]

"""Copying a data set to node-local disk: `deit3-fast stage SRC DEST` and `data.stage_to`.

SRC is a shard folder (or its manifest.json) or one .beton; its files (shards, the held-out split, reports) are
copied into DEST, each one atomically and checked against the manifest's sha256 while it is copied (one read of
the source). A re-run skips files already staged: DEST/.staged.json records each copied file's size, mtime and
checksum, so a skip costs a stat, not a read. The manifest is copied last, so a DEST with a manifest is complete.
Reading from network file systems during training is the other common slowdown our users report.

With `merge`, a shard set is instead written into one .beton, DEST/merged.beton, in global order (the FFCV engine
reads one file; the others read shard sets as they are).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from collections.abc import Callable

import numpy as np

from .atomic import write_atomic, write_text_atomic
from .beton import BetonError
from .shards import MANIFEST, REPORT, SOURCES, is_shard_set, manifest_path, read_manifest, source_names

_RECORD = ".staged.json"
_CHUNK = 16 << 20


def _files(src: Path) -> tuple[Path, list[tuple[str, str | None]], str | None]:
    """(source folder, [(file name, expected sha256 or None)], manifest name or None) of a shard set or a .beton."""
    m = manifest_path(src)
    if m is not None:  # a shard set
        manifest = read_manifest(src)
        entries = manifest["shards"] + ([manifest["holdout"]] if manifest.get("holdout") else [])
        names: list[tuple[str, str | None]] = [(e["file"], e["sha256"]) for e in entries]
        names += [
            (e["file"] + side, None)
            for e in entries
            for side in (REPORT, SOURCES)
            if (m.parent / (e["file"] + side)).exists()
        ]
        return m.parent, names, m.name
    if not src.is_file():
        raise BetonError(f"{src}: not a .beton, shard folder or manifest")
    names = [(src.name, None)]
    names += [(src.name + side, None) for side in (REPORT, SOURCES) if Path(str(src) + side).exists()]
    return src.parent, names, None


def _copy_verified(src: Path, dst: Path, expected: str | None, progress: Callable[[int], None]) -> str:
    """Copy src to dst atomically, hashing on the way; raises BetonError if the bytes are not the expected ones."""
    digest = hashlib.sha256()

    def write(f):
        with open(src, "rb") as r:
            while chunk := r.read(_CHUNK):
                digest.update(chunk)
                f.write(chunk)
                progress(len(chunk))
        if expected is not None and digest.hexdigest() != expected:
            raise BetonError(
                f"{src}: its sha256 differs from the manifest's (a corrupt or changed shard); "
                "convert this shard again (deit3-convert ... --shard-index I)"
            )

    write_atomic(dst, write)
    return digest.hexdigest()


def merge(src: str | os.PathLike, dest: str | os.PathLike, progress: Callable[[int], None] | None = None) -> Path:
    """A shard set as one .beton, DEST/merged.beton (+ its report, naming the classes), sample i of the set being
    sample i of the file. Skipped when DEST already holds the merge of the same shards (by their checksums)."""
    from .atomic import AtomicOutput
    from .beton import BetonWriter
    from .shards import ShardSet

    progress = progress or (lambda n: None)
    shards, dest = ShardSet(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out, report_path = dest / "merged.beton", dest / f"merged.beton{REPORT}"
    of = [e["sha256"] for e in shards.manifest["shards"]]
    try:
        done = json.loads(report_path.read_text())
        if done.get("merged_from") == of and out.stat().st_size == done.get("output_bytes"):
            return out
    except (OSError, ValueError, AttributeError):
        pass
    page = shards.shard(0).page_size
    with AtomicOutput(str(out)) as target:
        w = BetonWriter(target.path, len(shards), page)
        try:
            for k in range(len(shards.files)):
                b = shards.shard(k)
                labels = b.labels(b.label_field)
                for j in range(len(b)):
                    row = b.image_row(j)
                    data = b.image_bytes(j)
                    w.add(np.asarray(data), int(row["mode"]), int(row["height"]), int(row["width"]), int(labels[j]))
                    progress(data.nbytes)
            size = w.close()
        finally:
            if not w.fp.closed:
                w.fp.close()
        report = {
            **shards.manifest["report"],
            "output": str(out),
            "output_bytes": size,
            "merged_from": of,
            "num_written": len(shards),
            "classes": shards.classes,
        }
        names = source_names(src)
        if names is not None:
            write_text_atomic(str(out) + SOURCES, "".join(n + "\n" for n in names))
        write_text_atomic(report_path, json.dumps(report, indent=1) + "\n")
        target.commit()
    return out


def stage(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    progress: Callable[[int], None] | None = None,
    merge_shards: bool = False,
) -> Path:
    """Stage SRC into the folder DEST; returns the path to read from (DEST for a shard set, DEST/NAME for a .beton,
    DEST/merged.beton with `merge_shards`). Raises BetonError (a bad source, a checksum mismatch) or OSError (a full
    or unwritable disk)."""
    progress = progress or (lambda n: None)
    src, dest = Path(src), Path(dest)
    if merge_shards and is_shard_set(src):
        return merge(src, dest, progress)
    folder, names, manifest = _files(src)
    dest.mkdir(parents=True, exist_ok=True)
    record_path = dest / _RECORD
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    need = sum((folder / n).stat().st_size for n, _ in names)
    free = shutil.disk_usage(dest).free + sum((dest / n).stat().st_size for n, _ in names if (dest / n).exists())
    if need > free:
        raise OSError(28, f"{dest} has {free / 2**30:.1f} GiB free, staging needs {need / 2**30:.1f} GiB")
    for name, expected in names:
        s, d = folder / name, dest / name
        st = s.stat()
        known = record.get(name)
        # Skipped only when neither side changed since the copy: a re-converted source of the same size (page-padded
        # .beton sizes often are) has another mtime, and is copied again.
        if (
            d.exists()
            and known
            and known["size"] == st.st_size == d.stat().st_size
            and known["mtime_ns"] == d.stat().st_mtime_ns
            and known.get("src_mtime_ns") == st.st_mtime_ns
            and (expected is None or known["sha256"] == expected)
        ):
            progress(st.st_size)
            continue
        digest = _copy_verified(s, d, expected, progress)
        record[name] = {
            "size": st.st_size,
            "mtime_ns": d.stat().st_mtime_ns,
            "src_mtime_ns": st.st_mtime_ns,
            "sha256": digest,
        }
        write_text_atomic(record_path, json.dumps(record, indent=1) + "\n")
    if manifest is not None:
        write_text_atomic(dest / MANIFEST, (folder / manifest).read_text())
        return dest
    return dest / src.name


def staged_location(src: str | os.PathLike, dest: str | os.PathLike, merge_shards: bool = False) -> Path:
    """Where `stage(src, dest)` puts the data, without staging it (for the ranks that wait for another to)."""
    src = Path(src)
    if is_shard_set(src):
        return Path(dest) / "merged.beton" if merge_shards else Path(dest)
    return Path(dest) / src.name


def stage_splits(splits: dict[str, str], stage_to: str | os.PathLike, *, merge_shards: bool, copy: bool) -> dict:
    """`data.stage_to` for a run: {split: path to read from}, each split staged into STAGE_TO/<split>. Only the
    node's first process copies (`copy`); the others get the same paths and wait for it at a barrier."""
    out = {}
    for split, src in splits.items():
        dest = Path(stage_to) / split
        try:
            out[split] = str(
                stage(src, dest, merge_shards=merge_shards) if copy else staged_location(src, dest, merge_shards)
            )
        except (BetonError, OSError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise BetonError(f"data.stage_to: staging data.{split} into {dest} failed: {why}") from None
    return out

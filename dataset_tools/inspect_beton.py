"""`deit3-convert --inspect OUT.beton | OUT_DIR`: validate the layout (of every shard, for a shard set), summarise
it, and decode a sample of images."""

from __future__ import annotations

import json
import os

import numpy as np
from rich.console import Console
from rich.table import Table

from .beton import IMAGE_MODE_JPG, BetonError
from .shards import REPORT, ShardSet, open_samples


def _stats(v: np.ndarray) -> dict:
    return {"min": int(v.min()), "median": float(np.median(v)), "max": int(v.max())} if len(v) else {}


def _shard_set_tables(s: ShardSet) -> tuple[np.ndarray, np.ndarray]:
    """Every shard opened and checked against the manifest; their image metadata and labels, concatenated."""
    shards = [s.shard(k) for k in range(len(s.files))]
    return (
        np.concatenate([b.image_meta(b.image_field) for b in shards]),
        np.concatenate([b.labels(b.label_field) for b in shards]),
    )


def inspect_beton(path: str, samples: int = 64, seed: int = 0) -> dict:
    b = open_samples(path)
    if isinstance(b, ShardSet):
        meta, labels = _shard_set_tables(b)
        first = b.shard(0)
        fields, page_size = {f.name: f.kind for f in first.fields}, first.page_size
        file_bytes = sum(e["bytes"] for e in b.manifest["shards"])
        sidecar: dict | None = {"classes": b.classes, "num_written": b.manifest["num_samples"]}
        return _summary(
            path, b, meta, labels, sidecar, fields, page_size, file_bytes, samples, seed, shards=len(b.files)
        )
    image, label = b.field("rgb_image"), b.field("int")
    meta, labels = b.image_meta(image), b.labels(label)
    sidecar = None
    if os.path.exists(path + REPORT):
        try:
            with open(path + REPORT) as f:
                sidecar = json.load(f)
        except (OSError, ValueError):
            sidecar = None
    return _summary(
        path, b, meta, labels, sidecar, {f.name: f.kind for f in b.fields}, b.page_size, b.file_size, samples, seed
    )


def _summary(path, b, meta, labels, sidecar, fields, page_size, file_bytes, samples, seed, shards=None) -> dict:
    classes = sidecar.get("classes") if isinstance(sidecar, dict) else None
    if len(labels) and not classes and (labels.min() < 0 or labels.max() >= 1 << 24):
        # No report to compare with: a label no class list could have (corrupt metadata) must not size bincount.
        raise BetonError(
            f"{path}: labels span {labels.min()}..{labels.max()}, not class indices; the metadata is "
            "corrupt, convert the source folder again"
        )
    num_classes = len(classes) if classes else (int(labels.max()) + 1 if len(labels) else 0)
    if len(labels) and (labels.min() < 0 or labels.max() >= max(num_classes, 1)):
        raise BetonError(
            f"{path}: labels span {labels.min()}..{labels.max()} but the report lists {num_classes} classes"
        )
    counts = np.bincount(labels, minlength=num_classes) if len(labels) else np.zeros(0, np.int64)

    rng = np.random.default_rng(seed)
    picks: np.ndarray | list = np.sort(rng.choice(len(b), size=min(samples, len(b)), replace=False)) if len(b) else []
    failures = []
    for i in picks:
        try:
            img = b.decode(int(i))
            if img.shape != (int(meta[i]["height"]), int(meta[i]["width"]), 3):
                failures.append({"index": int(i), "error": f"decoded shape {img.shape}"})
        except BetonError as e:
            failures.append({"index": int(i), "error": str(e)})
    return {
        "path": os.path.abspath(path),
        "file_bytes": file_bytes,
        "num_samples": len(b),
        "shards": shards,
        "fields": fields,
        "page_size": page_size,
        "num_classes": num_classes,
        "classes_from_report": classes is not None,
        "samples_per_class": _stats(counts),
        "empty_classes": int((counts == 0).sum()),
        "width": _stats(meta["width"]),
        "height": _stats(meta["height"]),
        "jpeg": int((meta["mode"] == IMAGE_MODE_JPG).sum()),
        "raw": int((meta["mode"] != IMAGE_MODE_JPG).sum()),
        "report_matches": (None if sidecar is None else sidecar.get("num_written") == len(b)),
        "decoded": len(picks),
        "decode_failures": len(failures),
        "failures": failures[:20],
    }


def print_inspection(info: dict, console: Console) -> None:
    t = Table(title=f"{info['path']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("samples", f"{info['num_samples']:,}" + (f" in {info['shards']} shards" if info.get("shards") else ""))
    t.add_row("fields", ", ".join(f"{k} ({v})" for k, v in info["fields"].items()))
    spc = info["samples_per_class"]
    t.add_row(
        "classes",
        f"{info['num_classes']:,}"
        + ("" if info["classes_from_report"] else " (from labels)")
        + (f"; per class {spc['min']}..{spc['max']} (median {spc['median']:.0f})" if spc else "")
        + (f"; {info['empty_classes']} empty" if info["empty_classes"] else ""),
    )
    if info["width"]:
        w, h = info["width"], info["height"]
        t.add_row("stored width", f"{w['min']}..{w['max']} (median {w['median']:.0f})")
        t.add_row("stored height", f"{h['min']}..{h['max']} (median {h['median']:.0f})")
    t.add_row("encoding", f"{info['jpeg']:,} JPEG, {info['raw']:,} raw")
    t.add_row(
        "files" if info.get("shards") else "file",
        f"{info['file_bytes'] / 2**20:,.1f} MiB, pages of {info['page_size'] / 2**20:.0f} MiB",
    )
    if info["report_matches"] is not None:
        mismatch = "[red]sample count differs from its report (OUT.beton.json)[/]"
        t.add_row("report", "matches" if info["report_matches"] else mismatch)
    ok = info["decoded"] - info["decode_failures"]
    t.add_row(
        "decode check",
        f"{ok}/{info['decoded']} samples decode to their recorded size"
        if not info["decode_failures"]
        else f"[red]{info['decode_failures']} of {info['decoded']} failed[/]",
    )
    console.print(t)
    for f in info["failures"]:
        console.print(f"[red]sample {f['index']}:[/] {f['error']}")

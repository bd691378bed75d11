"""The conversion report: what `OUT.beton.json` says of one written file, and a shard set's merged report (in its
manifest). Sizes, counts, what was skipped and why, which source modes were converted, the options and timing."""

from __future__ import annotations

import os
from collections import Counter
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from .shards import MANIFEST
from .writer import MODES


def version_of(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"


def _stats(values: np.ndarray) -> dict:
    if not len(values):
        return {}
    return {
        "min": int(values.min()),
        "median": float(np.median(values)),
        "mean": round(float(values.mean()), 1),
        "max": int(values.max()),
    }


def part_report(
    src: str, out: str, scan, part: list[int], result, options: dict, fingerprint: str, elapsed: float, *, main: bool
) -> dict:
    """The report beside one output file. Facts about the whole source tree (files skipped while walking it, files
    outside class folders, files found per class) go to the main output's report only: the single .beton, or the
    manifest of a shard set."""
    labels = np.array([scan.samples[i][1] for i in result.source_info[:, 0]], dtype=np.int64)
    counts = np.bincount(labels, minlength=len(scan.classes))
    rel = lambda p: os.path.relpath(p, src)  # noqa: E731
    modes = np.bincount(result.source_info[:, 3], minlength=len(MODES))
    skipped = [{"path": rel(scan.samples[i][0]), "reason": r} for i, r in result.skipped]
    if main:
        skipped += [{"path": rel(p), "reason": r} for p, r in scan.problems]
    return {
        "tool": "deit3-convert",
        "version": version_of("deit3-fast"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": os.path.abspath(src),
        "output": os.path.abspath(out),
        "output_bytes": result.file_bytes,
        "sha256": result.sha256,
        "plan": fingerprint,
        "options": options,
        "num_written": result.num_written,
        "num_candidates": len(part),
        "num_skipped": len(skipped),
        "classes": scan.classes,
        "class_counts": counts.tolist(),
        "files_found_per_class": scan.candidates_per_class if main else None,
        "empty_classes": [c for c, n in zip(scan.classes, counts) if n == 0],
        "skipped": skipped,
        "ignored_outside_class_folders": [rel(p) for p in scan.outside_classes] if main else [],
        "converted_to_rgb": {m: int(n) for m, n in zip(MODES, modes) if n and m != "RGB"},
        "source_size": {"width": _stats(result.source_info[:, 1]), "height": _stats(result.source_info[:, 2])},
        "stored_size": {"width": _stats(result.stored_hw[:, 1]), "height": _stats(result.stored_hw[:, 0])},
        "mean_stored_image_bytes": round(float(result.stored_bytes.mean()), 1) if len(result.stored_bytes) else 0,
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(result.num_written / elapsed, 1) if elapsed else 0.0,
    }


def _merge_stats(stats: list[tuple[dict, int]]) -> dict:
    """min, count-weighted mean and max of per-shard statistics (medians do not merge: not reported)."""
    stats = [(s, n) for s, n in stats if s]
    if not stats:
        return {}
    total = sum(n for _, n in stats)
    return {
        "min": min(s["min"] for s, _ in stats),
        "mean": round(sum(s["mean"] * n for s, n in stats) / total, 1),
        "max": max(s["max"] for s, _ in stats),
    }


def merged_report(
    src: str, out: str, scan, shard_reports: list[dict], options: dict, elapsed: float, written_now: int
) -> dict:
    """A shard set's report: the shards' sums, and the facts about the source tree. Per-shard medians do not merge,
    so the size statistics are min, count-weighted mean and max."""
    rel = lambda p: os.path.relpath(p, src)  # noqa: E731
    n = [r["num_written"] for r in shard_reports]
    merged = {
        "tool": "deit3-convert",
        "version": version_of("deit3-fast"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": os.path.abspath(src),
        "output": os.path.abspath(out),
        "output_bytes": sum(r["output_bytes"] for r in shard_reports),
        "options": options,
        "num_written": sum(n),
        "num_candidates": sum(r["num_candidates"] for r in shard_reports),
        "classes": scan.classes,
        "class_counts": np.sum([r["class_counts"] for r in shard_reports], axis=0).astype(int).tolist(),
        "files_found_per_class": scan.candidates_per_class,
        "skipped": [s for r in shard_reports for s in r["skipped"]]
        + [{"path": rel(p), "reason": why} for p, why in scan.problems],
        "ignored_outside_class_folders": [rel(p) for p in scan.outside_classes],
        "converted_to_rgb": dict(sum((Counter(r["converted_to_rgb"]) for r in shard_reports), Counter())),
        "source_size": {
            d: _merge_stats([(r["source_size"][d], m) for r, m in zip(shard_reports, n)]) for d in ("width", "height")
        },
        "stored_size": {
            d: _merge_stats([(r["stored_size"][d], m) for r, m in zip(shard_reports, n)]) for d in ("width", "height")
        },
        "mean_stored_image_bytes": round(
            sum(r["mean_stored_image_bytes"] * m for r, m in zip(shard_reports, n)) / max(1, sum(n)), 1
        ),
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(written_now / elapsed, 1) if elapsed else 0.0,
    }
    merged["num_skipped"] = len(merged["skipped"])
    merged["empty_classes"] = [c for c, m in zip(scan.classes, merged["class_counts"]) if m == 0]
    return merged


def print_summary(report: dict, console, shards: int | None = None) -> None:
    """The report as the converter prints it: a table, then the empty classes and the first skipped files."""
    from rich.table import Table

    t = Table(title=f"deit3-convert: {report['output']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    mb = report["output_bytes"] / 2**20
    t.add_row("images written", f"{report['num_written']:,} of {report['num_candidates']:,} files")
    t.add_row("classes", f"{len(report['classes']):,} (empty: {len(report['empty_classes'])})")
    t.add_row("skipped", f"{report['num_skipped']:,}")
    conv = report["converted_to_rgb"]
    t.add_row("converted to RGB", ", ".join(f"{m}: {n}" for m, n in conv.items()) or "none needed")
    ss, st = report["source_size"], report["stored_size"]
    avg = "median" if "median" in ss["width"] else "mean"  # a shard set's merged statistics have no median
    o = report["options"]
    caps = ", ".join(
        f"{what} {o[key]}" for what, key in (("max side", "max_resolution"), ("short side", "short_side")) if o.get(key)
    )
    t.add_row(f"source size ({avg})", f"{ss['width'][avg]:.0f} x {ss['height'][avg]:.0f}")
    t.add_row(f"stored size ({avg})", f"{st['width'][avg]:.0f} x {st['height'][avg]:.0f} ({caps}, {o['write_mode']})")
    t.add_row("output", f"{mb:,.1f} MiB, {report['mean_stored_image_bytes'] / 1024:.1f} KiB/image")
    t.add_row("time", f"{report['elapsed_s']:.1f} s, {report['images_per_s']:,.0f} images/s")
    if shards:
        t.add_row(
            "shards", f"{shards} (+ manifest.json)" + (", held-out split: holdout.beton" if o.get("holdout") else "")
        )
    t.add_row("report", report["output"] + (f"/{MANIFEST}" if shards else ".json"))
    console.print(t)
    for name in report["empty_classes"][:10]:
        console.print(f"[yellow]empty class:[/] {name} (label {report['classes'].index(name)}: no images written)")
    if report["ignored_outside_class_folders"]:
        console.print(
            f"[yellow]ignored[/] {len(report['ignored_outside_class_folders'])} file(s) outside class folders"
        )
    for s in report["skipped"][:10]:
        console.print(f"[yellow]skipped:[/] {s['path']}: {s['reason']}")
    if len(report["skipped"]) > 10:
        console.print(f"... and {len(report['skipped']) - 10} more skipped files, all listed in the report")

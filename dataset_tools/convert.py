"""`deit3-convert SRC_DIR OUT.beton`: an ImageFolder tree to an FFCV .beton (fields `image`, `label`), plus a
JSON report beside it (`OUT.beton.json`). `deit3-convert --inspect OUT.beton` checks a written file.

Exit codes: 0 written; 2 nothing written (bad arguments, no images, unwritable output, --strict hit a bad file,
disk full); 130 interrupted. OUT appears complete or not at all (see atomic.py).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

import numpy as np
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from .atomic import AtomicOutput, check_writable, write_text_atomic
from .errors import ConversionError, SourceError
from .imagefolder import read_class_list, scan_imagefolder

PROG = "deit3-convert"


class UsageError(Exception):
    pass


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} img/s" if task.speed else "– img/s", style="cyan")


def _stats(values: np.ndarray) -> dict:
    if not len(values):
        return {}
    return {"min": int(values.min()), "median": float(np.median(values)), "mean": round(float(values.mean()), 1),
            "max": int(values.max())}


def convert(src: str, out: str, *, max_resolution: int = 256, jpeg_quality: int = 90, write_mode: str = "jpg",
            compress_probability: float = 0.5, workers: int | None = None, max_per_class: int | None = None,
            fraction: float | None = None, seed: int = 0, classes_file: str | None = None, strict: bool = False,
            console: Console | None = None, show_progress: bool = True, page_size: int = 8 << 20) -> dict:
    """Convert and return the report (also written to OUT.json). Raises SourceError/ConversionError.
    `page_size` (a power of two, at least 2 MiB) is FFCV's allocation unit: small files for tests and the GPU
    check are written with 2 MiB pages, which makes them a quarter of the size."""
    console = console or Console(stderr=True)
    started = time.perf_counter()
    problem = check_writable(out)
    if problem:
        raise SourceError(f"cannot write {out}: {problem}")
    classes = read_class_list(classes_file) if classes_file else None
    scan = scan_imagefolder(src, classes, max_per_class=max_per_class, fraction=fraction, seed=seed)
    if not scan.samples:
        raise SourceError(f"no image files in {src} ({len(scan.classes)} class folder(s), all empty)")
    workers = max(1, min(workers or default_workers(), len(scan.samples)))
    from .writer import MODES, ImageSources, SkippingDatasetWriter  # FFCV imports torch: seconds, so only now


    progress = Progress(TextColumn("[bold]writing[/]"), BarColumn(), MofNCompleteColumn(), _Rate(),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                        disable=not show_progress, speed_estimate_period=10, transient=True)
    with AtomicOutput(out) as target, progress:
        task = progress.add_task("write", total=len(scan.samples))
        writer = SkippingDatasetWriter(target.path, max_resolution=max_resolution, write_mode=write_mode,
                                       jpeg_quality=jpeg_quality, compress_probability=compress_probability,
                                       num_workers=workers, strict=strict,
                                       progress=lambda done: progress.update(task, completed=done),
                                       page_size=page_size)
        result = writer.write(ImageSources(scan.samples, max_resolution, seed))
        if result.num_written == 0:
            first, why = result.skipped[0]
            raise SourceError(f"no readable images in {src}: all {len(scan.samples)} files were skipped "
                              f"(first: {os.path.relpath(scan.samples[first][0], src)}: {why})")
        elapsed = time.perf_counter() - started

        labels = np.array([scan.samples[i][1] for i in result.source_info[:, 0]], dtype=np.int64)
        counts = np.bincount(labels, minlength=len(scan.classes))
        rel = lambda p: os.path.relpath(p, src)  # noqa: E731
        modes = np.bincount(result.source_info[:, 3], minlength=len(MODES))
        report = {
            "tool": PROG, "version": _version("deit3-fast"), "ffcv_version": _version("ffcv"),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": os.path.abspath(src), "output": os.path.abspath(out),
            "output_bytes": os.path.getsize(target.path),
            "options": {"max_resolution": max_resolution, "jpeg_quality": jpeg_quality, "write_mode": write_mode,
                        "compress_probability": compress_probability, "workers": workers,
                        "max_per_class": max_per_class, "fraction": fraction, "seed": seed,
                        "classes_file": classes_file, "strict": strict},
            "num_written": result.num_written,
            "num_candidates": len(scan.samples),
            "num_skipped": len(result.skipped) + len(scan.problems),
            "classes": scan.classes,
            "class_counts": counts.tolist(),
            "files_found_per_class": scan.candidates_per_class,
            "empty_classes": [c for c, n in zip(scan.classes, counts) if n == 0],
            "skipped": [{"path": rel(scan.samples[i][0]), "reason": r} for i, r in result.skipped]
                       + [{"path": rel(p), "reason": r} for p, r in scan.problems],
            "ignored_outside_class_folders": [rel(p) for p in scan.outside_classes],
            "converted_to_rgb": {m: int(n) for m, n in zip(MODES, modes) if n and m != "RGB"},
            "source_size": {"width": _stats(result.source_info[:, 1]), "height": _stats(result.source_info[:, 2])},
            "stored_size": {"width": _stats(result.stored_hw[:, 1]), "height": _stats(result.stored_hw[:, 0])},
            "mean_stored_image_bytes": round(float(result.stored_bytes.mean()), 1),
            "elapsed_s": round(elapsed, 3),
            "images_per_s": round(result.num_written / elapsed, 1),
        }
        # The report first, then the file: a full disk at the report must not leave a .beton without one.
        try:
            write_text_atomic(out + ".json", json.dumps(report, indent=1) + "\n")
        except OSError as e:
            raise ConversionError(f"writing the report {out}.json failed: {e.strerror or e}; nothing was "
                                  "written") from None
        try:
            target.commit()
        except BaseException:
            os.remove(out + ".json")
            raise
    return report


def print_summary(report: dict, console: Console) -> None:
    t = Table(title=f"{PROG}: {report['output']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    mb = report["output_bytes"] / 2**20
    t.add_row("images written", f"{report['num_written']:,} of {report['num_candidates']:,} files")
    t.add_row("classes", f"{len(report['classes']):,} (empty: {len(report['empty_classes'])})")
    t.add_row("skipped", f"{report['num_skipped']:,}")
    conv = report["converted_to_rgb"]
    t.add_row("converted to RGB", ", ".join(f"{m}: {n}" for m, n in conv.items()) or "none needed")
    ss, st = report["source_size"], report["stored_size"]
    t.add_row("source size (median)", f"{ss['width']['median']:.0f} x {ss['height']['median']:.0f}")
    t.add_row("stored size (median)", f"{st['width']['median']:.0f} x {st['height']['median']:.0f} "
              f"(max side {report['options']['max_resolution']}, {report['options']['write_mode']})")
    t.add_row("output", f"{mb:,.1f} MiB, {report['mean_stored_image_bytes'] / 1024:.1f} KiB/image")
    t.add_row("time", f"{report['elapsed_s']:.1f} s, {report['images_per_s']:,.0f} images/s")
    t.add_row("report", report["output"] + ".json")
    console.print(t)
    for name in report["empty_classes"][:10]:
        console.print(f"[yellow]empty class:[/] {name} (label {report['classes'].index(name)}: no images written)")
    if report["ignored_outside_class_folders"]:
        console.print(f"[yellow]ignored[/] {len(report['ignored_outside_class_folders'])} file(s) outside class "
                      "folders")
    for s in report["skipped"][:10]:
        console.print(f"[yellow]skipped:[/] {s['path']}: {s['reason']}")
    if len(report["skipped"]) > 10:
        console.print(f"... and {len(report['skipped']) - 10} more skipped files, all listed in the report")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Convert an ImageFolder tree (SRC/<class>/<image>) into an FFCV .beton with fields "
        "'image' and 'label' (label = index of the class folder in sorted order), plus OUT.json, a report.",
        epilog="Examples:\n  deit3-convert /data/imagenet/train train_256.beton\n"
               "  deit3-convert /data/imagenet/val val_256.beton --classes train_256.beton.json\n"
               "  deit3-convert /data/imagenet/train train_10pc.beton --fraction 0.1 --seed 0\n"
               "  deit3-convert --inspect train_256.beton",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="?", metavar="SRC_DIR", help="ImageFolder root (one folder per class)")
    p.add_argument("out", nargs="?", metavar="OUT.beton", help="output file (written atomically)")
    p.add_argument("--max-resolution", type=int, default=256, help="longer side is resized down to this (256)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 (90)")
    p.add_argument("--write-mode", choices=["jpg", "proportion", "raw"], default="jpg",
                   help="jpg: all JPEG; raw: all raw pixels; proportion: JPEG with --compress-probability")
    p.add_argument("--compress-probability", type=float, default=0.5,
                   help="fraction stored as JPEG in proportion mode (0.5)")
    p.add_argument("--workers", type=int, default=None, help="writer processes (all cores)")
    p.add_argument("--max-per-class", type=int, default=None, metavar="K", help="at most K images per class")
    p.add_argument("--fraction", type=float, default=None, metavar="F",
                   help="keep fraction F of each class (deterministic with --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed for subsets and proportion mode (0)")
    p.add_argument("--classes", default=None, metavar="FILE",
                   help="class list to use for labels: another split's OUT.beton.json, or one name per line")
    p.add_argument("--strict", action="store_true", help="stop at the first bad file instead of skipping it")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--inspect", metavar="BETON", default=None, help="check a .beton and print its statistics")
    p.add_argument("--samples", type=int, default=64, help="with --inspect: how many samples to decode (64)")
    p.add_argument("--json", action="store_true", help="with --inspect: print the statistics as JSON")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version('deit3-fast')}")
    return p


def _check_args(a: argparse.Namespace) -> None:
    if a.inspect is None and (a.src is None or a.out is None):
        raise UsageError("give SRC_DIR and OUT.beton (or --inspect BETON)")
    if a.inspect is not None:
        if a.samples < 0:
            raise UsageError("--samples must be >= 0")
        return
    if a.max_resolution < 8:
        raise UsageError(f"--max-resolution {a.max_resolution}: must be >= 8")
    if not 1 <= a.jpeg_quality <= 100:
        raise UsageError(f"--jpeg-quality {a.jpeg_quality}: must be 1..100")
    if not 0.0 <= a.compress_probability <= 1.0:
        raise UsageError(f"--compress-probability {a.compress_probability}: must be in [0, 1]")
    if a.workers is not None and a.workers < 1:
        raise UsageError(f"--workers {a.workers}: must be >= 1")
    if a.max_per_class is not None and a.max_per_class < 1:
        raise UsageError(f"--max-per-class {a.max_per_class}: must be >= 1")
    if a.fraction is not None and not 0.0 < a.fraction <= 1.0:
        raise UsageError(f"--fraction {a.fraction}: must be in (0, 1]")


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from .beton import BetonError

    args = build_parser().parse_args(argv)
    out_console, err_console = Console(), Console(stderr=True)
    try:
        _check_args(args)
        if args.inspect is not None:
            from .inspect_beton import inspect_beton, print_inspection

            info = inspect_beton(args.inspect, samples=args.samples)
            if args.json:
                print(json.dumps(info, indent=1))
            else:
                print_inspection(info, out_console)
            return 0 if info["decode_failures"] == 0 else 2
        # SIGTERM (kill, Slurm, timeout) unwinds like Ctrl-C, so the partial output is removed.
        signal.signal(signal.SIGTERM, _terminate)
        report = convert(args.src, args.out, max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                         write_mode=args.write_mode, compress_probability=args.compress_probability,
                         workers=args.workers, max_per_class=args.max_per_class, fraction=args.fraction,
                         seed=args.seed, classes_file=args.classes, strict=args.strict, console=err_console,
                         show_progress=not args.quiet)
        if not args.quiet:
            print_summary(report, out_console)
        return 0
    except (UsageError, SourceError, ConversionError, BetonError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

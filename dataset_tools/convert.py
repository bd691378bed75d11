"""`deit3-convert SRC_DIR OUT.beton`: an ImageFolder tree to an FFCV .beton (fields `image`, `label`), plus a
JSON report beside it (`OUT.beton.json`). `deit3-convert --inspect OUT.beton` checks a written file.

Exit codes: 0 written; 2 nothing written (bad arguments, no images, unwritable output, --strict hit a bad file,
disk full); 130 interrupted. OUT appears complete or not at all (see atomic.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from typing import Any
from contextlib import ExitStack

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .atomic import AtomicOutput, check_folder_output, check_writable
from .console import make_console
from .convert_jobs import submit_shards
from .errors import ConversionError, SourceError, UsageError, UserError
from .imagefolder import read_class_list, scan_imagefolder, split_holdout
from .report import merged_report, part_report, print_summary, version_of
from .shards import FORMAT, REPORT, SOURCES, sha256_of, shard_name, write_manifest

PROG = "deit3-convert"


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} img/s" if task.speed else "– img/s", style="cyan")


# What convert writes unless told otherwise; one place, as is_current must apply the same defaults.
DEFAULT_MAX_SIDE = 256  # FFCV's ImageNet example's longer side
# Not a default: the short side --help recommends for validation sets, the one the recipes' data.val (val_s448.beton)
# and parity's --val-storage assume; eval inputs within 40 dB of the official ones (docs/data.md#which-size-to-store).
EVAL_SHORT_SIDE = 448
JPEG_QUALITY = 90
COMPRESS_PROBABILITY = 0.5
PAGE_SIZE = 8 << 20
PIXEL_OPTIONS = (
    "max_resolution",
    "short_side",
    "jpeg_quality",
    "write_mode",
    "compress_probability",
    "seed",
    "page_size",
)  # the options that change a .beton's bytes: what a fingerprint covers


def _fingerprint(options: dict, samples: list[tuple[str, int]], part: list[int], src: str) -> str:
    """What a part's bytes depend on: the options that change stored pixels and its (file, label) list."""
    content = {k: options[k] for k in PIXEL_OPTIONS}
    listing = [(os.path.relpath(samples[i][0], src), samples[i][1]) for i in part]
    return hashlib.sha256(json.dumps([content, listing]).encode()).hexdigest()


def _same_plan(path: str, fingerprint: str) -> dict | None:
    """The report of `path` if it was written by this same plan and the file beside it has the size it records."""
    try:
        report = json.loads(open(path + REPORT).read())
        if report.get("plan") != fingerprint or os.path.getsize(path) != report.get("output_bytes"):
            return None
    except (OSError, ValueError, AttributeError):
        return None
    return report


def _complete(path: str, fingerprint: str) -> dict | None:
    """`_same_plan`'s report if the file's bytes also verify (a re-run skips such a part)."""
    report = _same_plan(path, fingerprint)
    return report if report is not None and sha256_of(path) == report.get("sha256") else None


def is_current(
    src: str,
    out: str,
    *,
    max_resolution: int | None = None,
    short_side: int | None = None,
    jpeg_quality: int = JPEG_QUALITY,
    write_mode: str = "jpg",
    classes_file: str | None = None,
) -> bool:
    """Whether the .beton OUT holds what `convert(src, out, ...)` with these options would write now: the same
    files and labels of SRC, the same pixel options, and the size its report records. What a cache of conversions
    (the parity command's) asks before it reuses a file instead of writing it again."""
    if not os.path.isfile(out):
        return False
    if max_resolution is None and short_side is None:
        max_resolution = DEFAULT_MAX_SIDE
    options = {
        "max_resolution": max_resolution,
        "short_side": short_side,
        "jpeg_quality": jpeg_quality,
        "write_mode": write_mode,
        "compress_probability": COMPRESS_PROBABILITY,
        "seed": 0,
        "page_size": PAGE_SIZE,
    }
    classes = read_class_list(classes_file) if classes_file else None
    scan = scan_imagefolder(src, classes)
    fingerprint = _fingerprint(options, scan.samples, list(range(len(scan.samples))), src)
    return _same_plan(out, fingerprint) is not None


def _plan(scan, out: str, shards: int | None, holdout: int, seed: int) -> tuple[list[str], list[list[int]], bool]:
    """(output paths, their samples, whether the last one is the held-out split). Shard s takes every N-th sample
    of the class-sorted list from s on, so each shard holds every class in proportion."""
    kept, held = split_holdout(scan.samples, holdout, seed) if holdout else (list(range(len(scan.samples))), [])
    if shards is None:
        paths, parts = [out], [kept]
        if holdout:
            stem = out[: -len(".beton")] if out.endswith(".beton") else out
            paths.append(stem + "-holdout.beton")
    else:
        paths = [os.path.join(out, shard_name(s, shards)) for s in range(shards)]
        parts = [kept[s::shards] for s in range(shards)]
        if holdout:
            paths.append(os.path.join(out, "holdout.beton"))
    if holdout:
        parts.append(held)
    return paths, parts, bool(holdout)


def convert(
    src: str,
    out: str,
    *,
    max_resolution: int | None = None,
    short_side: int | None = None,
    jpeg_quality: int = JPEG_QUALITY,
    write_mode: str = "jpg",
    compress_probability: float = COMPRESS_PROBABILITY,
    workers: int | None = None,
    max_per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    classes_file: str | None = None,
    strict: bool = False,
    shards: int | None = None,
    shard_index: int | None = None,
    holdout: int = 0,
    folder_labels: str = "names",
    console: Console | None = None,
    show_progress: bool = True,
    page_size: int = PAGE_SIZE,
) -> dict:
    """Convert and return the report (also written to OUT.beton.json), or with `shards` the manifest (OUT/manifest.json,
    written once every shard is complete). Raises SourceError/ConversionError.

    `shard_index` writes only that shard (index `shards` is the held-out split); complete shards of the same plan
    are verified and skipped. `page_size` (a power of two, at least 2 MiB) is the .beton allocation unit: small
    files for tests and the GPU check are written with 2 MiB pages, which makes them a quarter of the size."""
    from .writer import Encoding, Part, write_parts

    if max_resolution is None and short_side is None:
        max_resolution = DEFAULT_MAX_SIDE
    console = console or make_console(stderr=True)
    started = time.perf_counter()
    if shards is not None:
        problem = check_folder_output(out)
    else:
        problem = check_writable(out)
    if problem:
        raise SourceError(f"cannot write {out}: {problem}")
    classes = read_class_list(classes_file) if classes_file else None
    scan = scan_imagefolder(
        src, classes, max_per_class=max_per_class, fraction=fraction, seed=seed, folder_labels=folder_labels
    )
    if not scan.samples:
        raise SourceError(f"no image files in {src} ({len(scan.classes)} class folder(s), all empty)")
    options = {
        "max_resolution": max_resolution,
        "short_side": short_side,
        "jpeg_quality": jpeg_quality,
        "write_mode": write_mode,
        "compress_probability": compress_probability,
        "workers": workers,
        "max_per_class": max_per_class,
        "fraction": fraction,
        "seed": seed,
        "classes_file": classes_file,
        "folder_labels": folder_labels,
        "strict": strict,
        "shards": shards,
        "holdout": holdout,
        "page_size": page_size,
    }
    paths, parts, has_holdout = _plan(scan, out, shards, holdout, seed)
    prints = [_fingerprint(options, scan.samples, p, src) for p in parts]
    todo = list(range(len(parts)))
    if shard_index is not None:
        if not 0 <= shard_index < len(parts):
            raise SourceError(
                f"--shard-index {shard_index}: there are {len(parts)} tasks (0..{len(parts) - 1}"
                + (f"; {len(parts) - 1} writes the held-out split)" if has_holdout else ")")
            )
        todo = [shard_index]
    if shards is not None:  # a re-run (a requeued array task, a second node) skips what is done and verifies
        todo = [k for k in todo if _complete(paths[k], prints[k]) is None]
    reports = {}
    if todo:
        workers = max(1, min(workers or default_workers(), sum(len(parts[k]) for k in todo)))
        progress = Progress(
            TextColumn("[bold]writing[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            _Rate(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not show_progress,
            speed_estimate_period=10,
            transient=True,
        )
        with ExitStack() as stack:
            targets = [stack.enter_context(AtomicOutput(paths[k])) for k in todo]
            stack.enter_context(progress)
            task = progress.add_task("write", total=sum(len(parts[k]) for k in todo))
            try:
                results = write_parts(
                    scan.samples,
                    [Part(t.path, parts[k]) for t, k in zip(targets, todo)],
                    Encoding(max_resolution, short_side, write_mode, jpeg_quality, compress_probability, seed),
                    workers=workers,
                    strict=strict,
                    page_size=page_size,
                    progress=lambda done: progress.update(task, completed=done),
                )
            except OSError as e:
                raise ConversionError(f"writing failed: {e.strerror or e}") from None
            main_k = 0 if shards is None else None
            if main_k == 0 and results[0].num_written == 0:
                first, why = results[0].skipped[0]
                raise SourceError(
                    f"no readable images in {src}: all {len(parts[0])} files were skipped "
                    f"(first: {os.path.relpath(scan.samples[first][0], src)}: {why})"
                )
            elapsed = time.perf_counter() - started
            for t, k, r in zip(targets, todo, results):
                r.sha256 = sha256_of(t.path)
                reports[k] = part_report(
                    src, paths[k], scan, parts[k], r, options, prints[k], elapsed, main=k == main_k
                )
            # Every file is flushed and named before any replaces a previous one, and the sidecars (the report, each
            # sample's source file) replace theirs before their .beton: a failed write leaves a previous output
            # whole, and a .beton never appears without its report.
            sidecars: dict = {}  # each target's report and source list
            name = out
            try:
                for t, k, r in zip(targets, todo, results):
                    sidecars[t] = []
                    for name, text in (
                        (paths[k] + REPORT, json.dumps(reports[k], indent=1) + "\n"),
                        (
                            paths[k] + SOURCES,
                            "".join(os.path.relpath(scan.samples[i][0], src) + "\n" for i in r.source_info[:, 0]),
                        ),
                    ):
                        sidecars[t].append(stack.enter_context(AtomicOutput(name)))
                        sidecars[t][-1].write_text(text)
                        sidecars[t][-1].prepare()
                for t, k in zip(targets, todo):
                    name = paths[k]
                    t.prepare()
                for f in [*(f for own in sidecars.values() for f in own), *targets]:
                    name = f.final
                    f.commit()
            except BaseException as e:
                # Only a rename can fail once all is prepared: a report without its .beton would describe another file
                for t, own in sidecars.items():
                    for f in own:
                        if f.committed and not t.committed:
                            os.remove(f.final)
                if isinstance(e, OSError):
                    done = [t.final for t in targets if t.committed]
                    raise ConversionError(
                        f"writing {name} failed: {e.strerror or e}; "
                        + (f"complete: {', '.join(done)}" if done else "nothing was written")
                    ) from None
                raise
    if shards is None:
        return reports[0]
    return _finish_manifest(src, out, scan, paths, prints, has_holdout, options, started, reports)


def _finish_manifest(src, out, scan, paths, prints, has_holdout, options, started, fresh: dict) -> dict:
    """Write OUT/manifest.json if every part is complete (this run's, or an earlier one's of the same plan);
    otherwise return what is done so far."""
    # Another task's parts are taken at their report's word (size and plan): each task verified its own bytes.
    # Any: a part's report, or None while it is missing (returned before any is read).
    reports: dict[int, Any] = {
        k: fresh[k] if k in fresh else _same_plan(path, prints[k]) for k, path in enumerate(paths)
    }
    missing = [k for k, r in reports.items() if r is None]
    elapsed = time.perf_counter() - started
    if missing:
        return {
            "complete": False,
            "missing": missing,
            "written": sorted(fresh),
            "output": os.path.abspath(out),
            "tasks": len(paths),
            "elapsed_s": round(elapsed, 3),
        }
    if not sum(r["num_written"] for r in reports.values()):
        raise SourceError(f"no readable images in {src}: every file was skipped (see the shard reports in {out})")
    shard_reports = [reports[k] for k in range(len(paths) - (1 if has_holdout else 0))]
    merged = merged_report(src, out, scan, shard_reports, options, elapsed, sum(fresh[k]["num_written"] for k in fresh))
    entry = lambda k: {
        "file": os.path.basename(paths[k]),
        "num_samples": reports[k]["num_written"],  # noqa: E731
        "bytes": reports[k]["output_bytes"],
        "sha256": reports[k]["sha256"],
    }
    return write_manifest(
        out,
        scan.classes,
        [entry(k) for k in range(len(shard_reports))],
        entry(len(paths) - 1) if has_holdout else None,
        options,
        merged,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert an ImageFolder tree (SRC/<class>/<image>) into an FFCV .beton with fields "
        f"'image' and 'label' (label = index of the class folder in sorted order), plus OUT.beton{REPORT}, a report.",
        epilog="Examples:\n  deit3-convert /data/imagenet/train train_256.beton\n"
        f"  deit3-convert /data/imagenet/val val_s{EVAL_SHORT_SIDE}.beton --short-side {EVAL_SHORT_SIDE} "
        f"--classes train_256.beton{REPORT}\n"
        "  deit3-convert /data/imagenet/train train_10pc.beton --fraction 0.1 --seed 0\n"
        "  deit3-convert --inspect train_256.beton",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )  # --submit's tasks rebuild the command line from the full option names
    p.add_argument("src", nargs="?", metavar="SRC_DIR", help="ImageFolder root (one folder per class)")
    p.add_argument("out", nargs="?", metavar="OUT.beton", help="output file (written atomically)")
    p.add_argument(
        "--max-resolution",
        type=int,
        default=None,
        help="longer side is resized down to this (256 unless --short-side is given)",
    )
    p.add_argument(
        "--short-side",
        type=int,
        default=None,
        metavar="N",
        help=f"shorter side is resized down to N, aspect kept ({EVAL_SHORT_SIDE} for validation sets: eval "
        "inputs within 40 dB of the official ones; docs/data.md, which size to store)",
    )
    p.add_argument("--jpeg-quality", type=int, default=JPEG_QUALITY, help="JPEG quality 1-100 (90)")
    p.add_argument(
        "--write-mode",
        choices=["jpg", "proportion", "raw"],
        default="jpg",
        help="jpg: all JPEG; raw: all raw pixels; proportion: JPEG with --compress-probability",
    )
    p.add_argument(
        "--compress-probability",
        type=float,
        default=COMPRESS_PROBABILITY,
        help="fraction stored as JPEG in proportion mode (0.5)",
    )
    p.add_argument("--workers", type=int, default=None, help="writer processes (all cores)")
    p.add_argument("--max-per-class", type=int, default=None, metavar="K", help="at most K images per class")
    p.add_argument(
        "--fraction",
        type=float,
        default=None,
        metavar="F",
        help="keep fraction F of each class (deterministic with --seed)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for subsets and proportion mode (0)")
    p.add_argument(
        "--classes",
        default=None,
        metavar="FILE",
        help=f"class list to use for labels: another split's OUT.beton{REPORT}, or one name per line",
    )
    p.add_argument(
        "--folder-labels",
        choices=["names", "index"],
        default="names",
        help="names: a folder's label is its place among the sorted names (or in --classes); index: the "
        "folder name is the label (ImageNet-V2's 0 ... 999)",
    )
    p.add_argument("--strict", action="store_true", help="stop at the first bad file instead of skipping it")
    p.add_argument(
        "--shards",
        type=int,
        default=None,
        metavar="N",
        help="write N shard files and manifest.json into the folder OUT (each holds every class in proportion)",
    )
    p.add_argument(
        "--shard-index",
        type=int,
        default=None,
        metavar="I",
        help="with --shards: write only shard I (index N: the --holdout split); complete shards are "
        "verified and skipped, the manifest is written when all are there",
    )
    p.add_argument(
        "--holdout",
        type=int,
        default=0,
        metavar="K",
        help="hold out K images per class (by --seed) into OUT-holdout.beton (OUT/holdout.beton with "
        "--shards), excluded from the training output",
    )
    p.add_argument(
        "--submit",
        action="store_true",
        help="with --shards: send the shards to Slurm as a submitit job array (one task each)",
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="with --shards: run the shard tasks through submitit's local executor, one after another",
    )
    p.add_argument("--partition", help="--submit: Slurm partition")
    p.add_argument("--account", help="--submit: Slurm account")
    p.add_argument("--timeout-min", type=int, default=720, help="--submit: time limit per shard task (720)")
    p.add_argument("--cpus-per-task", type=int, default=32, help="--submit: cores per shard task (32)")
    p.add_argument("--array-parallelism", type=int, default=64, help="--submit: shard tasks at once (64)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--inspect", metavar="BETON", default=None, help="check a .beton and print its statistics")
    p.add_argument("--samples", type=int, default=64, help="with --inspect: how many samples to decode (64)")
    p.add_argument("--json", action="store_true", help="with --inspect: print the statistics as JSON")
    p.add_argument("--version", action="version", version=f"%(prog)s {version_of('deit3-fast')}")
    return p


def _check_args(a: argparse.Namespace) -> None:
    if a.inspect is None and (a.src is None or a.out is None):
        raise UsageError("give SRC_DIR and OUT.beton (or --inspect BETON)")
    if a.inspect is not None:
        if a.samples < 0:
            raise UsageError("--samples must be >= 0")
        return
    if a.max_resolution is not None and a.max_resolution < 8:
        raise UsageError(f"--max-resolution {a.max_resolution}: must be >= 8")
    if a.short_side is not None and a.short_side < 8:
        raise UsageError(f"--short-side {a.short_side}: must be >= 8")
    if a.max_resolution is None and a.short_side is None:
        a.max_resolution = DEFAULT_MAX_SIDE
    if a.shards is not None and a.shards < 1:
        raise UsageError(f"--shards {a.shards}: must be >= 1")
    if a.shards is None and (a.shard_index is not None or a.submit or a.local):
        raise UsageError("--shard-index, --submit and --local need --shards N")
    if a.shard_index is not None and (a.submit or a.local):
        raise UsageError("--submit/--local run every --shard-index themselves: leave --shard-index out")
    if a.submit and a.local:
        raise UsageError("--submit (Slurm) or --local, not both")
    if a.holdout < 0:
        raise UsageError(f"--holdout {a.holdout}: must be >= 0")
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
    args = build_parser().parse_args(argv)
    out_console, err_console = make_console(), make_console(stderr=True)
    previous = None
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
        # SIGTERM (kill, Slurm, timeout) unwinds like Ctrl-C, so the partial output is removed. Restored on return:
        # main() is also called in-process (a submitit shard task, tests).
        previous = signal.signal(signal.SIGTERM, _terminate)
        if args.submit or args.local:
            return submit_shards(main, args, argv if argv is not None else sys.argv[1:], out_console)
        report = convert(
            args.src,
            args.out,
            max_resolution=args.max_resolution,
            short_side=args.short_side,
            jpeg_quality=args.jpeg_quality,
            write_mode=args.write_mode,
            compress_probability=args.compress_probability,
            workers=args.workers,
            max_per_class=args.max_per_class,
            fraction=args.fraction,
            seed=args.seed,
            classes_file=args.classes,
            strict=args.strict,
            shards=args.shards,
            shard_index=args.shard_index,
            holdout=args.holdout,
            folder_labels=args.folder_labels,
            console=err_console,
            show_progress=not args.quiet,
        )
        if not args.quiet:
            if report.get("format") == FORMAT:
                print_summary(report["report"], out_console, shards=len(report["shards"]))
            elif report.get("complete") is False:
                out_console.print(
                    f"wrote {len(report['written'])} of {report['tasks']} shard task(s) into "
                    f"{report['output']}; still missing: {report['missing']} (the manifest is "
                    "written when all are there)"
                )
            else:
                print_summary(report, out_console)
        return 0
    except UserError as e:
        print(f"{PROG}: {e.prefix}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

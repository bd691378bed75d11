"""Conversion speed: deit3-convert vs FFCV's DatasetWriter called directly, same images, same settings.

The baseline is what FFCV's own ImageNet example does: torchvision ImageFolder (PIL decode, convert('RGB'))
into DatasetWriter with RGBImageField(jpg, max_resolution, jpeg_quality). Both runs include finding the files.
Runs alternate (ours, FFCV, ours, ...) so background load hits both alike; the median of --repeats is reported.

    python benchmarks/convert.py                        # ../shared/data/imagenet-sample-1000.tar, x3 copies
    python benchmarks/convert.py --src /data/imagenet/val --copies 1 --workers 16
    python benchmarks/convert.py --scaling      # ours alone: workers 1..cores x shards 1, 4 (img/s, per core)

Both writers are FFCV-format; ours needs no FFCV (dataset_tools/writer.py), FFCV's baseline needs it installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import replicate, unpack_imagenet_sample  # noqa: E402


def run_ours(src: Path, out: Path, args, workers: int | None = None, shards: int | None = None) -> float:
    import shutil

    from dataset_tools.convert import convert

    if out.is_dir():
        shutil.rmtree(out)  # a shard folder from the last repeat would be verified and skipped, not rewritten
    t = time.perf_counter()
    convert(
        str(src),
        str(out),
        max_resolution=args.max_resolution,
        jpeg_quality=args.jpeg_quality,
        workers=workers or args.workers,
        shards=shards,
        show_progress=False,
    )
    return time.perf_counter() - t


def scaling(src: Path, tmp: Path, n: int, args) -> dict:
    """Ours alone: img/s for each worker count (1, 2, 4, ... up to the cores) with 1 file and with 4 shards."""
    cores = len(os.sched_getaffinity(0))
    counts = sorted({1, cores, *[2**k for k in range(1, 8) if 2**k < cores]})
    run_ours(src, tmp / "warm.beton", args, workers=cores)
    rows = []
    for workers in counts:
        for shards in (None, 4):
            secs = statistics.median(
                run_ours(src, tmp / ("s" if shards else "s.beton"), args, workers, shards) for _ in range(args.repeats)
            )
            rows.append(
                {
                    "workers": workers,
                    "shards": shards or 1,
                    "images_per_s": round(n / secs, 1),
                    "per_worker": round(n / secs / workers, 1),
                }
            )
            print(rows[-1], flush=True)
    return {"images": n, "cores": cores, "rows": rows}


def run_ffcv(src: Path, out: Path, args) -> float:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    t = time.perf_counter()
    ds = ImageFolder(str(src))
    writer = DatasetWriter(
        str(out),
        {
            "image": RGBImageField(
                write_mode="jpg", max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality
            ),
            "label": IntField(),
        },
        num_workers=args.workers,
    )
    writer.from_indexed_dataset(ds, chunksize=100)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, default=None, help="ImageFolder root (default: the shared ImageNet sample)")
    p.add_argument("--copies", type=int, default=3, help="hard-linked copies of each image (3)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--max-resolution", type=int, default=256)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--scaling", action="store_true", help="ours alone over worker counts and shard counts")
    args = p.parse_args()
    if args.scaling:
        with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
            tmp = Path(tmp)
            src = args.src or unpack_imagenet_sample(tmp / "x")
            n = replicate(src, tmp / "src", args.copies)
            print(json.dumps(scaling(tmp / "src", tmp, n, args), indent=1))
        return

    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        tmp = Path(tmp)
        src = args.src or unpack_imagenet_sample(tmp / "x")
        n = replicate(src, tmp / "src", args.copies)
        # Warm the page cache and import everything once, so neither side pays first-use costs.
        run_ours(tmp / "src", tmp / "warm.beton", args)
        run_ffcv(tmp / "src", tmp / "warm2.beton", args)
        times = {"deit3-convert": [], "ffcv DatasetWriter": []}
        for r in range(args.repeats):
            times["deit3-convert"].append(run_ours(tmp / "src", tmp / "ours.beton", args))
            times["ffcv DatasetWriter"].append(run_ffcv(tmp / "src", tmp / "ffcv.beton", args))
            print(
                f"repeat {r}: ours {times['deit3-convert'][-1]:.2f} s, ffcv {times['ffcv DatasetWriter'][-1]:.2f} s",
                flush=True,
            )
        rate = {k: n / statistics.median(v) for k, v in times.items()}
        size = {
            k: os.path.getsize(tmp / f)
            for k, f in (("deit3-convert", "ours.beton"), ("ffcv DatasetWriter", "ffcv.beton"))
        }
    result = {
        "images": n,
        "workers": args.workers,
        "max_resolution": args.max_resolution,
        "jpeg_quality": args.jpeg_quality,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "images_per_s": {k: round(v, 1) for k, v in rate.items()},
        "ratio_ours_over_ffcv": round(rate["deit3-convert"] / rate["ffcv DatasetWriter"], 3),
        "beton_bytes": size,
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Where the CPU stage spends its time, per image, at each storage setting (issue 20's measure-first).

The CPU stage is what the FFCV engine's decode threads do per sample: read the JPEG from the .beton, decode it
(libjpeg-turbo through FFCV's `imdecode`), pick the RandomResizedCrop box (`crops.rrc_box`) and resample it to 224
px (`resample.resize_box`, Pillow's antialiased bicubic). Each part is timed on one thread, in a numba loop over the
ImageNet sample's 1,000 images converted at each storage setting; the decode is split into entropy decoding
(approximated by libjpeg-turbo's 1/8-scale decode, which entropy-decodes every block but inverts only its DC
coefficient) and the rest (IDCT, upsampling, colour conversion). The engine itself is then run with 1 and N
threads: what it costs beyond those parts is batch assembly, FFCV's pipeline and thread scheduling.

Then the cores-per-GPU table: the engine's img/s per core at each model's resolution (224, 192, 160) and the
official pipeline's (benchmarks/official_pipeline.py: the original JPEGs through PIL RandomResizedCrop, 3-Augment,
jitter and normalisation in DataLoader workers), against the img/s a V100 (fp16), A100 and H100 (bf16) train each
model at 40% of their datasheet rate (FLOPs: 3 x the forward's, counted by `deit3-fast zoo`).

    python benchmarks/cpu_stage.py [--settings max256,max512,short448] [--repeats 3] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import replicate, unpack_imagenet_sample  # noqa: E402

SETTINGS = {
    "max256": {"max_resolution": 256},
    "max320": {"max_resolution": 320},
    "short256": {"short_side": 256, "max_resolution": None},
    "max512": {"max_resolution": 512},
    "short448": {"short_side": 448, "max_resolution": None},
}


MODELS = (("deit3_small", 224), ("deit3_base", 192), ("deit3_large", 192), ("deit3_huge", 160))


def _kernels():
    from numba import njit

    from ffcv.libffcv import ctypes_imdecode
    from pipelines import crops, keys
    from pipelines.resample import resize_box

    rrc_box, sample_key = crops.rrc_box, keys.sample_key
    log_lo, log_hi = np.log(3 / 4), np.log(4 / 3)

    @njit(nogil=True)
    def decode_all(data, ptrs, sizes, heights, widths, buf, denom):
        for i in range(len(ptrs)):
            src = data[ptrs[i] : ptrs[i] + sizes[i]]
            ctypes_imdecode(
                src.ctypes.data,
                sizes[i],
                heights[i],
                widths[i],
                buf.ctypes.data,
                heights[i],
                widths[i],
                0,
                0,
                1,
                denom,
                False,
                False,
            )

    @njit(nogil=True)
    def boxes_all(heights, widths, out_boxes):
        for i in range(len(heights)):
            b = rrc_box(heights[i], widths[i], 0.08, 1.0, log_lo, log_hi, sample_key(np.uint64(7), i, 0))
            for k in range(4):
                out_boxes[i, k] = b[k]

    @njit(nogil=True)
    def resize_all(images, offsets, heights, widths, boxes, out):
        for i in range(len(offsets)):
            img = images[offsets[i] : offsets[i] + heights[i] * widths[i] * 3].reshape(heights[i], widths[i], 3)
            top, left, h, w = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
            resize_box(img[top : top + h, left : left + w], 0.0, 0.0, float(h), float(w), out)

    return decode_all, boxes_all, resize_all


def _best(fn, repeats: int) -> float:
    fn()  # compile / warm the page cache
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def breakdown(path: str, repeats: int, size: int = 224, limit: int = 1000) -> dict:
    """Per-image microseconds of each part, on one thread, over the first `limit` images."""
    from dataset_tools.beton import Beton

    decode_all, boxes_all, resize_all = _kernels()
    b = Beton(path)
    meta = b.image_meta()[:limit]
    n = min(limit, len(b))
    data = np.fromfile(path, dtype=np.uint8)
    ptrs = meta["data_ptr"].astype(np.int64)
    sizes = np.array([len(b.image_bytes(i)) for i in range(n)], np.int64)
    heights, widths = meta["height"].astype(np.int64), meta["width"].astype(np.int64)
    buf = np.empty(int((heights * widths).max()) * 3 + 64, np.uint8)
    full = _best(lambda: decode_all(data, ptrs, sizes, heights, widths, buf, 1), repeats)
    eighth = _best(lambda: decode_all(data, ptrs, sizes, heights, widths, buf, 8), repeats)
    decoded = [b.decode(i) for i in range(n)]
    offsets = np.cumsum([0] + [d.size for d in decoded[:-1]]).astype(np.int64)
    images = np.concatenate([d.reshape(-1) for d in decoded])
    boxes = np.empty((n, 4), np.int64)
    box_s = _best(lambda: boxes_all(heights, widths, boxes), repeats)
    out = np.empty((size, size, 3), np.uint8)
    resize_s = _best(lambda: resize_all(images, offsets, heights, widths, boxes, out), repeats)
    us = 1e6 / n
    return {
        "images": n,
        "mean_stored_px": float((heights * widths).mean()),
        "mean_box_px": float((boxes[:, 2] * boxes[:, 3]).mean()),
        "decode_us": full * us,
        "entropy_us": eighth * us,
        "idct_colour_us": (full - eighth) * us,
        "box_us": box_s * us,
        "resize_us": resize_s * us,
        "parts_us": (full + box_s + resize_s) * us,
    }


def engine_rate(path: str, workers: int, size: int = 224, batch: int = 128, passes: int = 3) -> float:
    """The FFCV engine's img/s (decode + crop into uint8 batches) with `workers` threads, best of `passes`."""
    import torch

    from pipelines.crops import CropSpec
    from pipelines.ffcv_engine import FFCVEngine
    from pipelines.sampler import EpochOrder

    from dataset_tools.beton import Beton

    n = len(Beton(path))
    engine = FFCVEngine(
        path,
        EpochOrder(n, train=True, shuffle=True, repeats=1, rank=0, world=1, seed=0),
        batch,
        CropSpec("rrc", size),
        torch.device("cpu"),
        workers=workers,
        os_cache=True,
        drop_last=True,
    )
    best = 0.0
    for epoch in range(passes + 1):
        t0, count = time.perf_counter(), 0
        for images, _ in engine.batches(epoch):
            count += len(images)
        if epoch:  # the first pass compiles
            best = max(best, count / (time.perf_counter() - t0))
    return best


def official_rate(src: Path, size: int, workers: int, images: int = 1200) -> float:
    """The official pipeline's img/s with `workers` DataLoader workers on the original JPEGs."""
    from official_pipeline import official_train_loader, time_loader

    loader = official_train_loader(str(src), size, 64, workers)
    return time_loader(loader, images)["images_per_s"]


def cores_table(per_core: dict[str, dict[int, float]]) -> list[dict]:
    """Rows (model, resolution, GPU): the GPU's img/s at 40% MFU and the cores each pipeline needs to match it."""
    from deit3_fast.profile import REFERENCE_GPUS, REFERENCE_MFU, cores_per_gpu
    from deit3_fast.zoo import count

    rows = []
    for model, res in MODELS:
        gflop = 6 * count(model, res)[1]  # training: forward + backward = 3 x forward; 2 FLOPs per multiply-add
        for gpu, dtype, tflops in REFERENCE_GPUS:
            row = {"model": f"{model}@{res}", "gpu": f"{gpu} {dtype}", "gflop_per_image": gflop}
            for name, rates in per_core.items():
                row["gpu_img_per_s"], row[f"cores_{name}"] = cores_per_gpu(gflop, rates[res], tflops, REFERENCE_MFU)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="max256,max512,short448")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--no-official", action="store_true")
    ap.add_argument(
        "--copies",
        type=int,
        default=5,
        help="the sample replicated (hard links) for the engine runs, so "
        "an epoch's start-up and drain are spread over more batches (5)",
    )
    ap.add_argument("--json")
    a = ap.parse_args()
    from dataset_tools.convert import convert

    results, per_core = {}, {}
    sizes = sorted({res for _, res in MODELS}, reverse=True)
    with tempfile.TemporaryDirectory(prefix="bench_cpu_stage_") as tmp:
        src = unpack_imagenet_sample(Path(tmp) / "x")
        many = Path(tmp) / "many"
        replicate(src, many, a.copies)
        if not a.no_official:
            per_core["official"] = {s: official_rate(src, s, a.threads) / a.threads for s in sizes}
            print(
                "official  " + "  ".join(f"{s}px {v:,.0f} img/s/core" for s, v in per_core["official"].items()),
                flush=True,
            )
        for name in a.settings.split(","):
            path = str(Path(tmp) / f"{name}.beton")
            convert(str(many), path, jpeg_quality=90, show_progress=False, **SETTINGS[name])
            r = breakdown(path, a.repeats)
            r["engine_1_thread_img_per_s"] = engine_rate(path, 1)
            r["engine_1_thread_us"] = 1e6 / r["engine_1_thread_img_per_s"]
            r["overhead_us"] = r["engine_1_thread_us"] - r["parts_us"]
            per_core[name] = {}
            for size in sizes:
                rate = engine_rate(path, a.threads, size)
                r[f"engine_{a.threads}_threads_{size}px_img_per_s"] = rate
                per_core[name][size] = rate / a.threads
            results[name] = r
            print(f"{name:9s} " + "  ".join(f"{k} {v:,.1f}" for k, v in r.items() if isinstance(v, float)), flush=True)
    table = cores_table(per_core)
    for row in table:
        print(
            f"{row['model']:18s} {row['gpu']:10s} {row['gpu_img_per_s']:8,.0f} img/s  "
            + "  ".join(f"{k.removeprefix('cores_')} {v:5.1f}" for k, v in row.items() if k.startswith("cores_"))
        )
    if a.json:
        Path(a.json).write_text(json.dumps({"breakdown": results, "per_core": per_core, "cores": table}, indent=1))


if __name__ == "__main__":
    main()

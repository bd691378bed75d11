"""Training data pipeline on CPU: deit3-fast (FFCV engine + BatchAugment) vs the official torchvision/PIL pipeline.

Both produce normalised 224 px training batches (RRC + flip + 3-Augment + colour jitter + normalise) from the same
real images (the shared ImageNet sample, replicated by hard links to >= 10k files), with the same number of CPU
workers. Ours reads a .beton converted from those files (max side 256, JPEG q90); the official pipeline decodes the
full-size JPEGs, as it does in practice. Per stage:

  cpu_stage      the FFCV engine alone: decode + RandomResizedCrop into uint8 batches (and the nvjpeg engine's,
                 which on a CPU decodes with torchvision/libjpeg-turbo on threads)
  device_stage   the augmentation stage alone, on the CPU here, on a fixed uint8 batch (eager and torch.compile)
  end_to_end     build_loader: both stages plus mixup/cutmix, on the same cores, as a run gets it by default (on a
                 CPU, an epoch this large compiles the batch augmentation: pipelines.build.compile_augment_on_cpu)

    python benchmarks/loader_cpu.py [--copies 10] [--batch-size 128] [--workers 2] [--images 5120]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import replicate, unpack_imagenet_sample  # noqa: E402


def rate(batches, max_images: int, warmup: int = 2) -> float:
    """Images/s over about max_images, after `warmup` batches (first-epoch compilation, worker start-up)."""
    n, t0 = 0, None
    while True:
        for i, batch in enumerate(batches()):
            x = batch[0]
            if t0 is None:
                if i + 1 >= warmup:
                    t0 = time.perf_counter()
                continue
            n += len(x)
            if n >= max_images:
                return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--images", type=int, default=5120, help="images timed per measurement")
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args()

    from dataset_tools.convert import convert
    from deit3_fast.config import load_config
    from official_pipeline import official_train_loader
    from deit3_fast.loaders import make_loader
    from pipelines.augment import BatchAugment

    torch.set_num_threads(args.workers)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        tmp = Path(tmp)
        n = replicate(unpack_imagenet_sample(tmp / "x"), tmp / "src", args.copies)
        convert(str(tmp / "src"), str(tmp / "train.beton"), max_resolution=256, jpeg_quality=90, show_progress=False)
        result = {"images_in_set": n, "batch_size": args.batch_size, "workers": args.workers, "size": args.size}

        official = official_train_loader(str(tmp / "src"), args.size, args.batch_size, args.workers)
        result["official_img_per_s"] = rate(lambda: official, args.images)
        official = None  # ends its worker processes before ours start

        sets = [
            f"data.train={tmp / 'train.beton'}",
            f"data.batch_size={args.batch_size}",
            f"data.workers={args.workers}",
            "data.repeats=1",
            "train.amp=fp32",
            f"aug.img_size={args.size}",
        ]
        cfg = load_config("vit_s_in1k", sets)
        loader = make_loader(cfg, "train", torch.device("cpu"))
        # Each stage is timed alone on every core: build_loader gave torch only its share of them (cores.py).
        torch.set_num_threads(args.workers)
        result["cpu_stage_img_per_s"] = rate(lambda: loader.raw_batches(0), args.images)
        images = next(iter(loader.raw_batches(0)))[0].clone()
        for compiled in (False, True):
            tag = "compiled" if compiled else "eager"
            augment = BatchAugment(cfg.aug, train=True, compile=compiled)
            augment(images, 0)  # compile / warm up
            t0 = time.perf_counter()
            reps = max(1, args.images // len(images) // 2)
            for rep in range(reps):
                augment(images, rep + 1)
            result[f"device_stage_{tag}_img_per_s"] = reps * len(images) / (time.perf_counter() - t0)
        result["device_stage_compiled_by_default"] = loader.augment.compiled
        result["end_to_end_img_per_s"] = rate(lambda: loader, args.images)
        nv = make_loader(load_config("vit_s_in1k", sets + ["data.engine=nvjpeg"]), "train", torch.device("cpu"))
        torch.set_num_threads(args.workers)
        result["cpu_stage_nvjpeg_engine_img_per_s"] = rate(lambda: nv.raw_batches(0), args.images)
        result["ratio_end_to_end_vs_official"] = result["end_to_end_img_per_s"] / result["official_img_per_s"]
        result["ratio_cpu_stage_vs_official"] = result["cpu_stage_img_per_s"] / result["official_img_per_s"]
        result["torch_threads"] = torch.get_num_threads()
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()

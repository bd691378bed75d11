"""Fine-tuning's RandAugment (rand-m9-mstd0.5-inc1): our batched device op vs timm's per-sample PIL RandAugment.

Both augment the same 224 px crops of the shared ImageNet sample (images resized to 224, replicated to a batch),
after which timm's output would still need ToTensor + an upload, and ours is already on the device. timm's op runs
in DataLoader-style worker processes (`--workers`, as the official loader runs it); ours runs eager and compiled
(torch.compile) on the CPU with torch's threads set to the same count, and on the GPU when there is one.

    python benchmarks/randaugment.py [--workers 2] [--batch 64] [--batches 8] [--size 224] [--beton B] [--json OUT]

--beton takes the images from a .beton instead (the GPU machine, where shared/data is not, has the GPU check's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import unpack_imagenet_sample  # noqa: E402

POLICY = "rand-m9-mstd0.5-inc1"
FILL = (124, 116, 104)


def load_crops(size: int, count: int, beton: str | None = None) -> np.ndarray:
    import tempfile

    if beton:
        from dataset_tools.beton import Beton

        b = Beton(beton)
        return np.stack(
            [
                np.asarray(Image.fromarray(b.decode(i)).resize((size, size), Image.BICUBIC))
                for i in range(min(count, len(b)))
            ]
        )
    with tempfile.TemporaryDirectory() as tmp:
        root = unpack_imagenet_sample(Path(tmp))
        files = sorted(root.glob("*/*.JPEG"))[:count]
        return np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)) for f in files])


_TIMM = None


def _posterize(img, bits, **_):
    from PIL import ImageOps

    return img if bits >= 8 else Image.new(img.mode, img.size) if bits <= 0 else ImageOps.posterize(img, bits)


def _timm_chunk(args) -> int:
    """One worker's share: timm's RandAugment on each image (what the official loader's workers do per sample)."""
    global _TIMM
    images, size, seed = args
    if _TIMM is None:
        from timm.data.auto_augment import rand_augment_transform

        _TIMM = rand_augment_transform(
            POLICY, {"translate_const": int(size * 0.45), "img_mean": FILL, "interpolation": Image.BICUBIC}
        )
        for op in _TIMM.ops:  # Pillow 13 refuses 0 bits (magnitude 10); older Pillow, and ours, give black
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    import random

    random.seed(seed)
    np.random.seed(seed)
    for im in images:
        np.asarray(_TIMM(Image.fromarray(im)))
    return len(images)


def timm_rate(images: np.ndarray, batches: int, workers: int) -> float:
    chunks = np.array_split(images, workers)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_timm_chunk, [(c, images.shape[1], i) for i, c in enumerate(chunks)]))  # warm-up
        t0 = time.perf_counter()
        n = sum(
            sum(pool.map(_timm_chunk, [(c, images.shape[1], b * workers + i) for i, c in enumerate(chunks)]))
            for b in range(batches)
        )
        return n / (time.perf_counter() - t0)


def ours_rate(images: np.ndarray, batches: int, device: torch.device, compile: bool) -> float:
    from pipelines.randaugment import RandAugment

    ra = RandAugment(POLICY, FILL, translate_const=int(images.shape[1] * 0.45), compile=compile)
    u8 = torch.from_numpy(images).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    step = 16 if device.type == "cpu" else len(u8)  # BatchAugment's CPU slices

    def one_batch():
        for s in range(0, len(u8), step):
            x = u8[s : s + step].float()
            ra(x, ra.draw(len(x), g))

    for _ in range(3):  # warm-up (and compilation)
        one_batch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        one_batch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batches * len(u8) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--beton")
    ap.add_argument("--json")
    a = ap.parse_args()
    crops = load_crops(a.size, 200, a.beton)
    images = np.stack([crops[i % len(crops)] for i in range(a.batch)])
    torch.set_num_threads(a.workers)
    res = {
        "policy": POLICY,
        "size": a.size,
        "batch": a.batch,
        "cores": a.workers,
        "timm_pil_img_per_s": timm_rate(images, a.batches, a.workers),
        "ours_cpu_eager_img_per_s": ours_rate(images, a.batches, torch.device("cpu"), False),
        "ours_cpu_compiled_img_per_s": ours_rate(images, a.batches, torch.device("cpu"), True),
    }
    if torch.cuda.is_available():
        res["gpu"] = torch.cuda.get_device_name()
        res["ours_gpu_eager_img_per_s"] = ours_rate(images, a.batches * 4, torch.device("cuda"), False)
        res["ours_gpu_compiled_img_per_s"] = ours_rate(images, a.batches * 4, torch.device("cuda"), True)
    for k, v in res.items():
        print(f"{k:30s} {v:.0f}" if isinstance(v, float) else f"{k:30s} {v}")
    base = res["timm_pil_img_per_s"]
    for k in [k for k in res if k.startswith("ours_")]:
        print(f"{k.removesuffix('_img_per_s'):30s} {res[k] / base:.2f}x timm's PIL RandAugment on {a.workers} cores")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

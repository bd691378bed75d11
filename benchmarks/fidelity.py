"""Storage fidelity: how close are the model's inputs from a converted .beton to what the official code feeds it from
the original JPEGs? For each storage setting (size cap, JPEG quality), over the real ImageNet sample:

* eval: our center crop (data path's `center_box` + Pillow-bicubic resampling) of the stored image, against the
  official transform on the original file: Resize(224 / eval_crop_ratio, bicubic) + CenterCrop(224), ratio 1.0;
* train: RandomResizedCrop crops with identical boxes (drawn on the original, mapped to stored pixels), against
  torchvision's resized_crop of the original (bicubic, antialiased);
* mean and 5th-percentile PSNR (dB) over the images, the stored bytes per image, and single-thread JPEG decode img/s
  of the stored images (libjpeg-turbo through OpenCV, what the CPU engines use).

The stored image is exactly what deit3-convert writes (`images.load_rgb` with the setting's caps, then
`writer.Encoding.encode`), decoded again.

    python benchmarks/fidelity.py                 # 1000 images, 2 RRC boxes each
    python benchmarks/fidelity.py --n 200 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import unpack_imagenet_sample  # noqa: E402

SIZE = 224
# (name, max side, short side, JPEG quality)
SETTINGS = [
    ("max side 256, q90 (FFCV's example; our old default)", 256, None, 90),
    ("max side 320, q90", 320, None, 90),
    ("short side 256, q90", None, 256, 90),
    ("short side 256, q95", None, 256, 95),
    ("short side 320, q90", None, 320, 90),
    ("max side 512, q90", 512, None, 90),
    ("short side 384, q90", None, 384, 90),
    ("short side 384, q95", None, 384, 95),
    ("short side 448, q90", None, 448, 90),
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def official_eval(img) -> np.ndarray:
    from torchvision.transforms import functional as F
    from torchvision.transforms import InterpolationMode

    img = F.resize(img, int(SIZE / 1.0), interpolation=InterpolationMode.BICUBIC)
    return np.asarray(F.center_crop(img, SIZE))


def official_crop(img, box) -> np.ndarray:
    from torchvision.transforms import functional as F
    from torchvision.transforms import InterpolationMode

    i, j, h, w = box
    return np.asarray(F.resized_crop(img, i, j, h, w, [SIZE, SIZE], interpolation=InterpolationMode.BICUBIC))


def ours(stored: np.ndarray, y0, x0, y1, x1) -> np.ndarray:
    from pipelines.resample import resize_box

    out = np.empty((SIZE, SIZE, 3), np.uint8)
    resize_box(stored, float(y0), float(x0), float(y1), float(x1), out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, default=None, help="ImageFolder root (default: the shared ImageNet sample)")
    p.add_argument("--n", type=int, default=1000, help="images (1000)")
    p.add_argument("--boxes", type=int, default=2, help="RandomResizedCrop boxes per image (2)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import cv2
    import torch
    from PIL import Image
    from torchvision.transforms import RandomResizedCrop

    from dataset_tools.images import load_rgb
    from dataset_tools.writer import Encoding
    from pipelines.crops import center_box

    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = args.src or unpack_imagenet_sample(Path(tmp))
        files = sorted(f for d in src.iterdir() if d.is_dir() for f in d.iterdir() if f.is_file())[: args.n]
        torch.manual_seed(0)
        originals, refs = [], []
        for f in files:
            img = Image.open(f).convert("RGB")
            boxes = [RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(args.boxes)]
            originals.append((f, img.size, boxes))
            refs.append((official_eval(img), [official_crop(img, b) for b in boxes]))
        rows = []
        for name, max_side, short, quality in SETTINGS:
            enc = Encoding(max_side, short, "jpg", quality)
            ev, tr, nbytes, stored = [], [], [], []
            for (f, (w, h), boxes), (ref_eval, ref_crops) in zip(originals, refs):
                rgb, _ = load_rgb(f, max_side, short)
                data, _ = enc.encode(rgb, 0)
                nbytes.append(data.nbytes)
                stored.append(data)
                img = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                sh, sw = img.shape[:2]
                ev.append(psnr(ours(img, *center_box(sh, sw, SIZE, 1.0)), ref_eval))
                fy, fx = sh / h, sw / w
                for (i, j, bh, bw), ref in zip(boxes, ref_crops):
                    tr.append(psnr(ours(img, i * fy, j * fx, (i + bh) * fy, (j + bw) * fx), ref))
            t = time.perf_counter()
            for data in stored:
                cv2.imdecode(data, cv2.IMREAD_COLOR)
            decode = len(stored) / (time.perf_counter() - t)
            rows.append(
                {
                    "setting": name,
                    "max_side": max_side,
                    "short_side": short,
                    "jpeg_quality": quality,
                    "eval_psnr_mean": round(float(np.mean(ev)), 2),
                    "eval_psnr_p5": round(float(np.percentile(ev, 5)), 2),
                    "train_psnr_mean": round(float(np.mean(tr)), 2),
                    "train_psnr_p5": round(float(np.percentile(tr, 5)), 2),
                    "kib_per_image": round(float(np.mean(nbytes)) / 1024, 1),
                    "in1k_train_gib": round(float(np.mean(nbytes)) * 1_281_167 / 2**30, 1),
                    "decode_img_per_s_1_thread": round(decode, 0),
                }
            )
            if not args.json:
                r = rows[-1]
                print(
                    f"{name:<52} eval {r['eval_psnr_mean']:5.1f} dB (p5 {r['eval_psnr_p5']:5.1f})  train "
                    f"{r['train_psnr_mean']:5.1f} dB (p5 {r['train_psnr_p5']:5.1f})  {r['kib_per_image']:6.1f} KiB "
                    f"(IN-1k {r['in1k_train_gib']:6.1f} GiB)  decode {r['decode_img_per_s_1_thread']:6.0f} img/s",
                    flush=True,
                )
    if args.json:
        print(json.dumps({"images": len(files), "boxes_per_image": args.boxes, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

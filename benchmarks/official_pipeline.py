"""The official DeiT III training data pipeline, re-created as the baseline for loader benchmarks.

Mirrors facebookresearch/deit:
  - augment.py: ``GaussianBlur``, ``Solarization``, ``gray_scale`` and ``new_data_aug_generator(args)``
    (3-Augment), with ``--input-size 224 --color-jitter 0.3`` and ``--src`` off by default;
  - main.py: the train ``DataLoader`` (``drop_last=True``), whose ``dataset.transform`` is replaced by
    ``new_data_aug_generator(args)`` when ``--ThreeAugment`` is given.

Deliberate differences from upstream, all about the machine rather than the images:
  - shuffle=True instead of upstream's RASampler (``--repeated-aug``, 3 repeats, distributed), which changes
    which images are read but not the per-image work;
  - pin_memory=False (upstream defaults to True; there is no GPU here) and persistent_workers when workers > 0,
    so re-iterating for a longer run does not re-pay worker start-up.

    python benchmarks/official_pipeline.py /path/to/imagenet/train --batch-size 64 --workers 2 --images 640
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from PIL import ImageFilter, ImageOps
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import datasets, transforms

# Upstream hard-codes these (== timm's IMAGENET_DEFAULT_MEAN / IMAGENET_DEFAULT_STD).
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
COLOR_JITTER = 0.3  # DeiT III recipe: --color-jitter 0.3


# The three classes keep upstream's names, probabilities and use of Python's `random` (which DataLoader seeds per
# worker), so the random streams behave as upstream's do. 3-Augment builds each with p=1.0 and lets RandomChoice pick.
class GaussianBlur:
    def __init__(self, p=0.1, radius_min=0.1, radius_max=2.0):
        self.prob, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if not random.random() <= self.prob:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class Solarization:
    def __init__(self, p=0.2):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img  # PIL default threshold: 128


class gray_scale:  # noqa: N801 - upstream's name
    def __init__(self, p=0.2):
        self.p = p
        self.transf = transforms.Grayscale(3)  # 3 channels, so ColorJitter and Normalize still see RGB

    def __call__(self, img):
        return self.transf(img) if random.random() < self.p else img


def official_train_transform(img_size: int = 224, src: bool = False) -> transforms.Compose:
    """``new_data_aug_generator`` for --input-size img_size, --color-jitter 0.3, --src as given."""
    if src:  # "simple random crop", upstream's choice for ImageNet-21k
        primary = [
            transforms.Resize(img_size, interpolation=3),
            transforms.RandomCrop(img_size, padding=4, padding_mode="reflect"),
            transforms.RandomHorizontalFlip(),
        ]
    else:
        # timm's class, as upstream uses: same sampling as torchvision's RandomResizedCrop (ratio 3/4..4/3,
        # centre-crop fallback after 10 tries), bicubic.
        primary = [
            RandomResizedCropAndInterpolation(img_size, scale=(0.08, 1.0), interpolation="bicubic"),
            transforms.RandomHorizontalFlip(),
        ]
    secondary = [
        transforms.RandomChoice([gray_scale(p=1.0), Solarization(p=1.0), GaussianBlur(p=1.0)]),
        transforms.ColorJitter(COLOR_JITTER, COLOR_JITTER, COLOR_JITTER),  # hue stays 0, as upstream
    ]
    final = [transforms.ToTensor(), transforms.Normalize(mean=torch.tensor(MEAN), std=torch.tensor(STD))]
    return transforms.Compose(primary + secondary + final)


def official_train_loader(
    root: str, img_size: int = 224, batch_size: int = 256, workers: int = 2
) -> torch.utils.data.DataLoader:
    dataset = datasets.ImageFolder(root, transform=official_train_transform(img_size))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=False,
        drop_last=True,
        persistent_workers=workers > 0,
    )


def time_loader(loader, max_images: int, warmup_batches: int = 2) -> dict:
    """Images/s over about max_images images, after warmup_batches (worker start-up, first file reads)."""
    n, seen = 0, 0
    start = time.perf_counter() if warmup_batches == 0 else None
    while n < max_images:  # re-iterate: a small dataset may hold fewer images than asked for
        progressed = False
        for images, _ in loader:
            progressed, seen = True, seen + 1
            if seen <= warmup_batches:
                if seen == warmup_batches:
                    start = time.perf_counter()
                continue
            n += images.shape[0]
            if n >= max_images:
                break
        if not progressed:
            raise ValueError("loader yields no batches (fewer images than one batch with drop_last?)")
    seconds = time.perf_counter() - start
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="ImageFolder root (<root>/<class>/<image>)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=2560, help="images to time, after the warm-up batches")
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args()
    loader = official_train_loader(args.root, args.img_size, args.batch_size, args.workers)
    print(json.dumps(time_loader(loader, args.images)))


if __name__ == "__main__":
    main()

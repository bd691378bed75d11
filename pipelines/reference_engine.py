"""The reference engine (`data.engine: reference`): the DeiT III input pipeline as the official code runs it,
per sample on the host with PIL, torchvision and timm, from the same config sections as the fast path.

It is the yardstick the fast engines are compared against (`deit3-fast parity`), and the way to train on an
ImageFolder tree before converting anything. It reads an ImageFolder directory (labels: the sorted class folders, as
torchvision's ImageFolder; files in the sorted order deit3-convert stores them in) or a .beton / shard set (its
stored JPEG or raw pixels decoded with PIL), and runs, per sample:

* training (`new_data_aug_generator` of the official augment.py): RandomResizedCrop (bicubic) or, with
  `aug.crop: src`, Resize (bicubic) + RandomCrop with reflect padding; horizontal flip; exactly one of grayscale |
  solarize | Gaussian blur chosen uniformly (3-Augment); ColorJitter; ToTensor; Normalize. The official main.py
  replaces the training transform by this one whenever --ThreeAugment is given, so with `aug.three_augment` on an
  `aug.auto_augment` policy is not used here either.
* fine-tuning (`aug.auto_augment` set, 3-Augment off): timm's `create_transform(is_training=True, ...)` as the
  official `build_transform` calls it (random erasing off: the config has no knob for it and the fast path has none).
* evaluation: Resize(int(size / eval_crop_ratio), bicubic) + CenterCrop(size) + ToTensor + Normalize.

Batches are already augmented and normalised (float, NCHW): the engine is registered with `host_augment`, and the
`Loader` skips the batch augmentation for it and only mixes (timm Mixup with its per-batch keyed generator), casts and
moves them. The samples and their order are `EpochOrder`'s, as for every engine; a sample's random draws come from
torch's, Python's and numpy's generators seeded, inside `__getitem__`, from its key (seed, rank, epoch, sample, slot),
so the draws do not depend on which worker made the sample and a resumed epoch gives an uninterrupted one's batches.
"""

from __future__ import annotations

import functools
import io
import random
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from . import keys
from .beton_source import upload
from .crops import CropSpec
from .errors import DataError
from .sampler import batch_count, keyed_batches

if TYPE_CHECKING:
    from dataset_tools.beton import Beton
    from dataset_tools.shards import ShardSet

BICUBIC = InterpolationMode.BICUBIC


# ---- the official 3-Augment choices (augment.py's gray_scale, Solarization, GaussianBlur with p=1) ----------------


class Grayscale3:
    """ITU-R 601-2 luma (PIL's "L"), copied to three channels so that ColorJitter and Normalize still see RGB."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.convert("L").convert("RGB")


class Solarize:
    def __init__(self, threshold: int = 128):
        self.threshold = threshold

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, self.threshold)


class GaussianBlur:
    """PIL's Gaussian blur with sigma ~ U(lo, hi) from Python's `random`, as the official class draws it (PIL's
    `radius` is the standard deviation)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.lo, self.hi = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.lo, self.hi)))


def train_transform(aug, crop: CropSpec):
    """The official training transform for `crop` (its size may differ from aug.img_size: progressive resolution)."""
    size = crop.size
    if aug.auto_augment and not aug.three_augment:
        from timm.data import create_transform

        return create_transform(
            size,
            is_training=True,
            scale=tuple(crop.scale),
            ratio=tuple(crop.ratio),
            hflip=aug.hflip,
            color_jitter=aug.color_jitter or None,
            auto_augment=aug.auto_augment,
            interpolation="bicubic",
            mean=tuple(aug.mean),
            std=tuple(aug.std),
            re_prob=0.0,
        )
    if crop.kind == "src":
        primary = [T.Resize(size, interpolation=BICUBIC), T.RandomCrop(size, padding=crop.pad, padding_mode="reflect")]
    else:
        primary = [T.RandomResizedCrop(size, scale=tuple(crop.scale), ratio=tuple(crop.ratio), interpolation=BICUBIC)]
    ops = [*primary, T.RandomHorizontalFlip(aug.hflip)]
    if aug.three_augment:
        ops.append(T.RandomChoice([Grayscale3(), Solarize(aug.solarize_threshold), GaussianBlur(aug.blur_sigma)]))
    if aug.color_jitter > 0:
        ops.append(T.ColorJitter(aug.color_jitter, aug.color_jitter, aug.color_jitter))
    return T.Compose([*ops, T.ToTensor(), T.Normalize(aug.mean, aug.std)])


def eval_transform(aug, crop: CropSpec):
    return T.Compose(
        [
            T.Resize(int(crop.size / crop.center_ratio), interpolation=BICUBIC),
            T.CenterCrop(crop.size),
            T.ToTensor(),
            T.Normalize(aug.mean, aug.std),
        ]
    )


# ---- sources ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def scan_folder(path: str):
    """`scan_imagefolder` of `path`, once per process: the builder's checks and each engine it makes (one per
    resolution) would otherwise walk an ImageNet-sized tree again."""
    from dataset_tools.errors import UserError
    from dataset_tools.imagefolder import scan_imagefolder

    try:
        return scan_imagefolder(path)
    except UserError as e:
        raise DataError(str(e)) from None


class FolderSource:
    """An ImageFolder tree, listed as deit3-convert lists it (so sample i is the .beton's sample i)."""

    def __init__(self, path: str):
        scan = scan_folder(str(path))
        self.classes = scan.classes
        self.files = [f for f, _ in scan.samples]
        self.labels = np.array([label for _, label in scan.samples], np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> Image.Image:
        # deit3-convert skips (and reports) files that do not decode; here one stops the epoch, saying which.
        try:
            with open(self.files[i], "rb") as f:  # torchvision's pil_loader
                return Image.open(f).convert("RGB")
        except OSError as e:
            raise DataError(
                f"{self.files[i]}: PIL cannot read it as an image ({e}); remove it, or convert the folder "
                "with deit3-convert, which skips and reports such files"
            ) from None


class BetonSource:
    """A .beton or shard set: its stored images decoded by PIL. Opened in each process on first use (a memory map
    is not something to pickle into a worker)."""

    def __init__(self, path: str):
        from dataset_tools.shards import open_samples

        self.path = path
        samples = open_samples(path)
        self.labels = samples.labels_at(np.arange(len(samples)))
        self._samples: Beton | ShardSet | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):
        return {**self.__dict__, "_samples": None}

    def image(self, i: int) -> Image.Image:
        from dataset_tools.beton import IMAGE_MODE_RAW
        from dataset_tools.shards import open_samples

        if self._samples is None:
            self._samples = open_samples(self.path)
        samples = self._samples
        if samples.image_row(i)["mode"] == IMAGE_MODE_RAW:  # the reader's own raw path (it checks the byte count)
            return Image.fromarray(samples.decode(i), "RGB")
        # JPEG through PIL, as the official pipeline decodes (the reader's decode is OpenCV's)
        return Image.open(io.BytesIO(np.asarray(samples.image_bytes(i)).tobytes())).convert("RGB")


@contextmanager
def seeded(key):
    """torch's, Python's and numpy's global generators seeded from `key` inside, as they were outside: torchvision
    draws from torch's, RandomChoice and the blur from Python's, timm's RandAugment from Python's and numpy's. Each
    gets a child key of its own: torch and numpy seed the same MT19937 from the same 32 bits, so one seed for both
    would make torchvision's flip and jitter draws equal timm's RandAugment choices (the official DataLoader seeds
    them apart too)."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(keys.seed_of(keys.named(key, "torch")))
        random.seed(keys.seed_of(keys.named(key, "python")))
        np.random.seed(int(keys.named(key, "numpy")) & 0xFFFF_FFFF)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class _Samples(torch.utils.data.Dataset):
    """Item (sample index, key) -> (augmented float image, label)."""

    def __init__(self, source, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item):
        i, key = item
        img = self.source.image(int(i))
        with seeded(key):
            x = self.transform(img)
        return x, int(self.source.labels[i])


class _Plan(torch.utils.data.Sampler):
    """The DataLoader's batch sampler: the batches of (sample, key) that `ReferenceEngine.batches` set for this
    pass. It runs in the main process, so with persistent workers setting it before each pass is enough."""

    def __init__(self):
        self.batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ReferenceEngine:
    """The `Engine` (engine.py) of the official per-sample pipeline: a torch DataLoader with `workers` processes."""

    def __init__(
        self,
        path: str,
        epoch_order,
        batch_size: int,
        crop: CropSpec,
        device: torch.device,
        *,
        aug,
        workers: int,
        drop_last: bool,
        seed: int = 0,
        rank: int = 0,
    ):
        self.epoch_order, self.batch_size, self.crop, self.device = epoch_order, batch_size, crop, device
        self.drop_last, self.seed, self.rank = drop_last, seed, rank
        from dataset_tools.imagefolder import is_image_folder

        self.source = FolderSource(path) if is_image_folder(path) else BetonSource(path)
        if len(self.source) != epoch_order.num_samples:
            raise DataError(f"{path}: {len(self.source)} samples, the epoch order has {epoch_order.num_samples}")
        transform = eval_transform(aug, crop) if crop.kind == "center" else train_transform(aug, crop)
        self.dataset = _Samples(self.source, transform)
        self._plan = _Plan()
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self._plan,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )

    def __len__(self) -> int:
        return batch_count(self.epoch_order, self.batch_size, self.drop_last)

    def batches(self, epoch: int, start: int = 0):
        """(normalised float images (B, 3, H, W), int64 labels (B,)) on the engine's device."""
        plan = keyed_batches(
            self.epoch_order,
            self.batch_size,
            drop_last=self.drop_last,
            seed=self.seed,
            rank=self.rank,
            epoch=epoch,
            start=start,
        )
        self._plan.batches = [[(int(i), int(k)) for i, k in zip(idx, batch_keys)] for idx, batch_keys in plan]
        for x, y in self.loader:
            yield upload(x, self.device), upload(y.to(torch.int64), self.device)

    def epoch_report(self) -> dict:
        return {}  # every image is decoded by PIL on the host: nothing to report

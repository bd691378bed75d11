"""The knobs of the data path, as plain dataclasses. The trainer's config tree holds them as `data` and `aug`.
No torch here: the trainer's config schema imports this module."""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CROPS = ("rrc", "src")


@dataclass
class DataConfig:
    train: str | None = None  # a .beton or shard folder written by deit3-convert (reference: or an ImageFolder)
    val: str | None = None
    stage_to: str | None = None  # node-local folder: copy train/val there at job start (once per node)
    engine: str = "ffcv"  # an engine's name in registry.py (ENGINES)
    batch_size: int = 256  # per process; global = batch_size x world x accumulation
    eval_batch_size: int | None = None  # default: 1.5 x batch_size, as upstream
    # CPU decode threads per process (reference: DataLoader processes, 0 = in-process); auto: this process's share of
    # the cores (cores.py), which also sets torch's threads
    workers: int | str = "auto"
    os_cache: bool = True  # FFCV: memory-map the file (page cache) rather than a process cache
    repeats: int = 3  # repeated augmentation (RASampler); 1 = off
    shuffle: bool = True
    seed: int = 0


@dataclass
class AugConfig:
    img_size: int = 224
    crop: str = "rrc"  # rrc: RandomResizedCrop (IN-1k) | src: Simple Random Crop (IN-21k)
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    src_pad: int = 4
    eval_crop_ratio: float = 1.0  # eval: resize shorter side to img_size / ratio, centre crop
    hflip: float = 0.5
    three_augment: bool = True
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_threshold: int = 128
    color_jitter: float = 0.3
    auto_augment: str | None = None  # timm RandAugment policy for fine-tuning, e.g. rand-m9-mstd0.5-inc1
    mixup: float = 0.8
    cutmix: float = 1.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    label_smoothing: float = 0.0
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

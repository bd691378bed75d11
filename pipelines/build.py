"""`build_loader`: a `.beton` split -> engine -> batch augmentation -> mixing, as one `Loader`, from plain values (the
reference engine: a `.beton` or an ImageFolder -> the official per-sample pipeline -> mixing).

The caller (the trainer, a benchmark, a test) passes the data path's own config sections (`DataConfig`, `AugConfig`)
and plain values: the class count, the dtype batches are cast to, the device, the rank and world size. Nothing here
knows the trainer's config tree, its loss or its precision policy.
"""

from __future__ import annotations

import os
from typing import cast

import torch

from .augment import BatchAugment
from .config import AugConfig, DataConfig
from .cores import apply as apply_cpu_share
from .cores import cpu_share
from .errors import DataError
from .loader import Loader
from .mix import Mixing
from .registry import engine_info, engine_names, one_of
from .sampler import EpochOrder, dist_rank_world


def check_data(path: str | None, split: str, num_classes: int, engine: str = "ffcv") -> int:
    """Validate before any worker starts; returns the sample count. A shard set is checked from its manifest (every
    shard there, of the recorded size, and its class count); each shard's own layout when it is first read. An
    ImageFolder tree is data for the reference engine only (the others read what deit3-convert wrote). `ablate`
    runs the same check on every variant's data before the first variant starts."""
    from dataset_tools.imagefolder import is_image_folder

    if not path:  # a recipe without data paths: the command's flag is the usual way to give one
        raise DataError(
            f"no {split} data: pass --data-{split} PATH or set data.{split} (a .beton or shard folder written by "
            "deit3-convert)"
        )
    if is_image_folder(path):
        if not engine_info(engine).reads_image_folders:
            readers = one_of(engine_names(reads_image_folders=True))
            raise DataError(
                f"{path}: a folder without manifest.json, so not a .beton or a shard set, which "
                f"data.engine {engine} reads: convert it first with deit3-convert {path} OUT.beton (or "
                f"read the images as they are, more slowly, with data.engine: {readers})"
            )
        from .reference_engine import scan_folder

        scan = scan_folder(str(path))
        b, what, top, low = scan.samples, f"{len(scan.classes)} class folders", len(scan.classes) - 1, 0
    else:
        b, what, top, low = _open_beton(path, split)
    if len(b) == 0:
        raise DataError(f"{path} has no samples")
    if top >= num_classes or low < 0:
        raise DataError(
            f"{path} has {what} but model.num_classes is {num_classes} (model.num_classes: auto takes "
            "the count from the data)"
        )
    return len(b)


def _open_beton(path: str, split: str):
    """(samples, what its labels are, top label, lowest label) of a .beton or shard set."""
    from dataset_tools.beton import BetonError
    from dataset_tools.shards import ShardSet, open_samples

    try:
        b = open_samples(path)
        if isinstance(b, ShardSet):
            top, low = len(b.classes) - 1, 0
            what = f"{len(b.classes)} classes"
        else:
            labels = b.labels(b.label_field)
            b.field("rgb_image")
            top, low = (int(labels.max()), int(labels.min())) if len(labels) else (0, 0)
            what = f"labels up to {top}"
    except BetonError as e:
        # Nothing there: most often a recipe's own path (data/imagenet/train_256.beton) on a machine without it.
        hint = None if os.path.exists(path) else f"write it with deit3-convert, or pass --data-{split} PATH"
        raise DataError(str(e), hint) from None
    return b, what, top, low


def check_same_classes(train: str, val: str) -> None:
    """A val split converted without the training split's class list has other labels for the same classes, and its
    accuracy would mean nothing. The conversion reports (`X.beton.json`, a shard set's manifest) name the classes;
    check when both exist."""
    from dataset_tools.beton import BetonError
    from dataset_tools.shards import classes_of, is_shard_set

    try:
        a, b = classes_of(train), classes_of(val)
    except BetonError:
        return  # reported by the loader's own checks
    # Labels agree when val's class list is train's or its beginning (a val set with fewer classes).
    if a is not None and b is not None and list(a[: len(b)]) != list(b):
        where = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        listing = train if is_shard_set(train) else f"{train}.json"
        raise DataError(
            f"{val} was converted with other classes than {train} ({len(b)} vs {len(a)}, first "
            f"difference at label {where}): convert the val split with --classes {listing}"
        )


# On a CPU the batch augmentation compiled (inductor fuses its ~20 passes) is ~2.4x faster than eager at 224 px, which
# is what makes a CPU run faster than the official per-sample PIL pipeline rather than slower (BENCHMARKS.md, issues
# 3, 20); compiling costs ~15 s once. It pays for itself within an epoch once an epoch holds this many pixels.
CPU_COMPILE_PIXELS = 4e8


def compile_augment_on_cpu(samples: int, img_size: int) -> bool:
    """Whether a CPU run compiles its training batch augmentation without being asked (train.compile off)."""
    return samples * img_size * img_size >= CPU_COMPILE_PIXELS


def build_loader(
    data: DataConfig,
    aug: AugConfig,
    split: str,
    *,
    num_classes: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    rank: int | None = None,
    world: int | None = None,
    compile: bool = False,
    auto_compile: bool = True,
) -> Loader:
    """The `split` ("train" | "val") loader of `data` with `aug`'s augmentation. Batches are `dtype`, channels-last,
    on `device`; targets are timm's soft mixed targets (class indices where nothing is mixed). `rank` and `world`
    default to torch.distributed's when a process group is initialised. `compile` compiles the batch augmentation;
    with `auto_compile`, a CPU training loader compiles it anyway when its epochs repay that
    (compile_augment_on_cpu). data.workers (an int, or auto) is resolved and torch's intra-op threads set for the
    process as cores.py shares them out; `loader.cpu_share` holds what they resolved to."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train = split == "train"
    device = torch.device(device)
    path = data.train if train else data.val
    n = check_data(path, split, num_classes, data.engine)
    info = engine_info(data.engine)
    assert path is not None  # check_data refused a missing path
    from dataset_tools.shards import is_shard_set

    if not info.reads_shard_sets and is_shard_set(path):
        # The fast engines that read shard sets: the reference engine does too, but is the slow yardstick.
        readers = engine_names(reads_shard_sets=True, host_augment=False)
        raise DataError(
            f"{path} is a shard set; {info.what} reads one file: set data.stage_to (a node-local "
            f"folder: the shards are merged there at job start), or use data.engine: {one_of(readers)} "
            "(they read shard sets as they are)"
        )
    if rank is None or world is None:
        rank, world = dist_rank_world()
    try:
        order = EpochOrder(
            n,
            train=train,
            shuffle=data.shuffle,
            repeats=data.repeats if train else 1,
            rank=rank,
            world=world,
            seed=data.seed,
        )
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    batch = data.batch_size if train else (data.eval_batch_size or int(1.5 * data.batch_size))
    from .crops import CropSpec

    scale, ratio = cast("tuple[float, float]", tuple(aug.rrc_scale)), cast("tuple[float, float]", tuple(aug.rrc_ratio))
    crop = (
        CropSpec(aug.crop, aug.img_size, scale, ratio, aug.src_pad)
        if train
        else CropSpec("center", aug.img_size, center_ratio=aug.eval_crop_ratio)
    )

    cls = info.load()  # first: importing an engine's package may set torch's threads (FFCV's sets 1)
    share = cpu_share(data.workers, device.type, loader_uses_workers=info.uses_workers(device.type))
    apply_cpu_share(share)
    options: dict[str, object] = {"workers": share.workers, "drop_last": train, "seed": data.seed, "rank": rank}
    if info.os_cache:
        options["os_cache"] = data.os_cache
    if info.host_augment:
        options["aug"] = aug

    def make_engine(crop: CropSpec, batch_size: int = batch):
        return cls(path, order, batch_size, crop, device, **options)

    engine = make_engine(crop)
    mixing = Mixing(aug, num_classes) if train else None
    # Mixup blends in float32 and the batch is cast to `dtype` once, after it (as the official code, whose images
    # stay fp32 up to autocast): blending bf16 pixels would round each of the two images first.
    compile = compile or (
        auto_compile and train and device.type == "cpu" and compile_augment_on_cpu(len(order), aug.img_size)
    )
    # An engine that augments on the host has no use for batch augmentation (nor its compilation).
    augment = (
        None
        if info.host_augment
        else BatchAugment(
            aug, train=train, dtype=torch.float32 if mixing is not None and mixing.active else dtype, compile=compile
        )
    )
    return Loader(
        engine,
        augment,
        mixing,
        device=device,
        seed=data.seed,
        rank=rank,
        dtype=dtype,
        make_engine=make_engine,
        cpu_share=share,
    )

"""configs/parity/: the two parity settings load (data paths are placeholders the parity command fills), follow the
recipes they say they follow, and the ImageNet-100 class list is the fixed, valid list of 100 wnids."""

import dataclasses
import hashlib
import re
import tarfile

import pytest

from dataset_tools.imagefolder import read_class_list
from deit3_fast.batching import batch_plan
from deit3_fast.config import CONFIG_DIR, load_config, to_dict

from ..conftest import SHARED_DATA

PARITY_DIR = CONFIG_DIR / "parity"
CLASSES = PARITY_DIR / "imagenet100_classes.txt"
# sha256 of the sorted ids joined by newlines: CMC's imagenet100.txt (HobbitLong/CMC@7b227be). The list is what makes
# ImageNet-100 results comparable, so a changed id must fail here, not pass silently.
CLASSES_SHA256 = "d61d354b64beb3ce2c2c9cf04a874298362dc9fcd589e15ee34c5e4592145746"
DATA = ["data.train=/data/in100/train.beton", "data.val=/data/in100/val.beton"]


@pytest.mark.parametrize("name", ["imagenet100_vit_s", "cifar10_vit_tiny"])
def test_parity_configs_load_with_and_without_data_paths(name):
    bare = load_config(name)  # found by name under configs/, like every recipe
    assert (bare.data.train, bare.data.val) == (None, None)  # placeholders: the command fills them per variant
    assert load_config(str(PARITY_DIR / f"{name}.yaml")) == bare
    cfg = load_config(name, DATA)
    assert (cfg.data.train, cfg.data.val) == ("/data/in100/train.beton", "/data/in100/val.beton")
    assert cfg.train.reference == "none"  # no official curve exists for these settings
    assert cfg.data.batch_size % 2 == 0  # mixup pairs a batch with its reverse


def test_imagenet100_follows_the_vit_s_in1k_recipe_on_a_100_epoch_schedule():
    cfg, recipe = load_config("imagenet100_vit_s", DATA), load_config("vit_s_in1k")
    assert to_dict(cfg.aug) == to_dict(recipe.aug)  # 3-Augment, RRC, jitter, mixup/cutmix at 224: unchanged
    assert (cfg.loss, cfg.optim.name, cfg.optim.weight_decay) == (recipe.loss, "lamb", recipe.optim.weight_decay)
    assert dataclasses.replace(cfg.model, num_classes=1000) == recipe.model and cfg.model.num_classes == 100
    assert cfg.data.repeats == recipe.data.repeats == 3
    # The recipe's lr scaled linearly to the global batch, as the official code scales it without --unscale-lr.
    assert cfg.optim.lr == pytest.approx(recipe.optim.lr * cfg.train.global_batch / recipe.train.global_batch)
    s = cfg.schedule
    assert (s.epochs, s.warmup_epochs, s.warmup_lr, s.min_lr) == (
        100,
        5,
        recipe.schedule.warmup_lr,
        recipe.schedule.min_lr,
    )
    # One GPU or a node of 8: the same global batch, by accumulation.
    assert [(p.per_process, p.accum) for p in (batch_plan(cfg, 1), batch_plan(cfg, 8))] == [(128, 8), (128, 1)]


def test_cifar10_parity_is_the_cifar10_recipe_at_cpu_size():
    cfg, recipe = load_config("cifar10_vit_tiny", DATA), load_config("cifar10_deit3")
    assert to_dict(cfg.aug) == to_dict(recipe.aug)
    assert (cfg.loss, cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == (
        recipe.loss,
        recipe.optim.name,
        recipe.optim.lr,
        recipe.optim.weight_decay,
    )
    assert dataclasses.replace(cfg.model, name="deit3_cifar") == recipe.model
    assert (cfg.model.name, cfg.aug.img_size, cfg.data.repeats) == ("deit3_nano", 32, 1)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.train.global_batch) == (20, 1, 32)
    assert batch_plan(cfg, 1).accum == 1


def test_imagenet100_class_list_is_the_fixed_list_of_100_wnids():
    ids = read_class_list(CLASSES)  # the reader deit3-convert --classes uses: the header comments are skipped
    assert len(ids) == 100 and len(set(ids)) == 100
    assert all(re.fullmatch(r"n\d{8}", i) for i in ids)
    assert ids == sorted(ids)  # labels = the order ImageFolder gives a folder of just these classes
    assert hashlib.sha256("\n".join(ids).encode()).hexdigest() == CLASSES_SHA256


def test_imagenet100_classes_are_imagenet_1k_classes():
    tar = SHARED_DATA / "imagenet-sample-1000.tar"
    if not tar.exists():
        pytest.skip(f"real ImageNet sample not available ({tar} is absent; it ships in the project's shared/data)")
    with tarfile.open(tar) as t:  # imagenet-sample-1000/<wnid>/<file>: one folder per ImageNet-1k class
        wnids = {parts[1] for parts in (name.split("/") for name in t.getnames()) if len(parts) >= 3 and parts[2]}
    assert len(wnids) == 1000
    assert set(read_class_list(CLASSES)) <= wnids

"""The engines over one .beton: the same samples in the same order with the same keyed crops, pixel-close."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from dataset_tools.beton import Beton
from dataset_tools.convert import convert
from dataset_tools.synthetic import make_imagefolder
from deit3_fast.config import load_config
from pipelines import DataError, build_loader

from .conftest import REPO


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    d = tmp_path_factory.mktemp("engines")
    make_imagefolder(d / "src", num_classes=6, per_class=10, seed=7, min_side=40, max_side=120)
    convert(str(d / "src"), str(d / "jpg.beton"), workers=2, show_progress=False)
    convert(str(d / "src"), str(d / "raw.beton"), workers=2, write_mode="raw", show_progress=False)
    return d


def cfg_for(path, engine, **sets):
    base = {"data.train": path, "data.val": path, "model.num_classes": 6, "data.batch_size": 12, "data.workers": 2,
            "data.repeats": 1, "aug.img_size": 40, "train.amp": "fp32", "data.engine": engine}
    base.update(sets)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def engine_epoch(cfg, split, epoch=1):
    loader = build_loader(cfg, split, "cpu")
    return [(x.clone(), y.clone()) for x, y in loader.engine.batches(epoch)]


@pytest.mark.parametrize("split, crop", [("train", "rrc"), ("train", "src"), ("val", "rrc")])
def test_nvjpeg_and_ffcv_yield_the_same_samples_and_crops(betons, split, crop):
    """Same labels in the same order, and crops within JPEG-decoder differences: FFCV's decoder uses
    libjpeg-turbo's fast IDCT, torchvision's the accurate one (mean |diff| < 1.5 grey levels, max <= 10)."""
    a = engine_epoch(cfg_for(betons / "jpg.beton", "ffcv", **{"aug.crop": crop}), split)
    b = engine_epoch(cfg_for(betons / "jpg.beton", "nvjpeg", **{"aug.crop": crop}), split)
    assert len(a) == len(b) and len(a) == (5 if split == "train" else 4)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        d = (xa.int() - xb.int()).abs()
        assert d.float().mean() < 1.5 and d.max() <= 10


def test_nvjpeg_reads_raw_pixels_exactly_like_ffcv(betons):
    """Raw-mode files have no decoder in between: the two engines' crops are equal."""
    a = engine_epoch(cfg_for(betons / "raw.beton", "ffcv"), "train")
    b = engine_epoch(cfg_for(betons / "raw.beton", "nvjpeg"), "train")
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_nvjpeg_epoch_is_exact_and_model_ready(betons):
    cfg = cfg_for(betons / "jpg.beton", "nvjpeg")
    loader = build_loader(cfg, "val", "cpu")
    labels = torch.cat([y for _, y in loader])
    np.testing.assert_array_equal(labels.numpy(), Beton(betons / "jpg.beton").labels())
    x, y = next(iter(build_loader(cfg, "train", "cpu")))
    assert x.shape == (12, 3, 40, 40) and x.is_contiguous(memory_format=torch.channels_last) and y.shape == (12, 6)


def test_nvjpeg_works_without_ffcv(betons):
    code = ("import sys; sys.modules['ffcv'] = None\n"
            "from deit3_fast.config import load_config\nfrom pipelines import build_loader\n"
            f"cfg = load_config(None, ['data.val={betons / 'jpg.beton'}', 'model.num_classes=6', 'data.engine=nvjpeg',"
            " 'aug.img_size=32', 'train.amp=fp32'])\n"
            "print(sum(len(y) for _, y in build_loader(cfg, 'val', 'cpu')))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "60"


def test_dali_is_a_clear_message_for_now(betons):
    with pytest.raises(DataError, match="'dali' is not available yet"):
        build_loader(cfg_for(betons / "jpg.beton", "dali"), "train", "cpu")

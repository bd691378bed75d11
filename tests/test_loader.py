"""build_loader end to end on small .beton files: what the model receives, exact epochs, keyed crops, errors."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from dataset_tools.beton import Beton
from dataset_tools.convert import convert
from dataset_tools.synthetic import make_imagefolder
from deit3_fast.config import load_config
from pipelines import DataError, build_loader, crops
from pipelines.sampler import EpochOrder

from .conftest import REPO


@pytest.fixture(scope="module")
def small_beton(tmp_path_factory):
    """120 images, 10 classes, sizes 48..160 px."""
    d = tmp_path_factory.mktemp("loader")
    make_imagefolder(d / "src", num_classes=10, per_class=12, seed=3)
    convert(str(d / "src"), str(d / "s.beton"), workers=2, show_progress=False)
    return str(d / "s.beton")


@pytest.fixture(scope="module")
def big_beton(tmp_path_factory):
    """520 small images: enough for repeated augmentation's len // 256 * 256 truncation."""
    d = tmp_path_factory.mktemp("loader_big")
    make_imagefolder(d / "src", num_classes=4, per_class=130, seed=4, min_side=24, max_side=40)
    convert(str(d / "src"), str(d / "b.beton"), workers=2, show_progress=False)
    return str(d / "b.beton")


def cfg_for(path, **sets):
    base = {"data.train": path, "data.val": path, "model.num_classes": 10, "data.batch_size": 24,
            "data.workers": 2, "data.repeats": 1, "aug.img_size": 48, "train.amp": "fp32"}
    base.update(sets)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def test_train_batches_are_model_ready(small_beton):
    loader = build_loader(cfg_for(small_beton), "train", "cpu")
    assert len(loader) == 5
    batches = list(loader)
    assert len(batches) == 5
    x, y = batches[0]
    assert x.shape == (24, 3, 48, 48) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    lo = (0 - 0.485) / 0.229
    hi = (1 - 0.406) / 0.225
    assert x.min() >= lo - 1e-4 and x.max() <= hi + 1e-4 and abs(x.mean()) < 1.0
    assert y.shape == (24, 10) and set(y.unique().tolist()) <= {0.0, 1.0} and (y.sum(1) >= 1).all()
    bf16 = build_loader(cfg_for(small_beton, **{"train.amp": "bf16"}), "train", "cpu")
    assert next(iter(bf16))[0].dtype == torch.bfloat16


def test_eval_batches_cover_the_set_once(small_beton):
    loader = build_loader(cfg_for(small_beton), "val", "cpu")
    labels = torch.cat([y for _, y in loader])
    np.testing.assert_array_equal(labels.numpy(), Beton(small_beton).labels())  # in order, no drop, no pad
    assert len(loader) == 4  # eval batch = 1.5 x 24 = 36: 36+36+36+12


def test_epoch_order_is_exact_and_deterministic(small_beton, big_beton):
    for path, repeats, n_expected in ((small_beton, 1, 120), (big_beton, 3, 512)):
        cfg = cfg_for(path, **{"data.repeats": repeats, "aug.mixup": 0, "aug.cutmix": 0, "loss": "ce"})
        loader = build_loader(cfg, "train", "cpu")
        all_labels = Beton(path).labels()
        order = EpochOrder(len(all_labels), train=True, repeats=repeats, seed=0)
        for epoch in (0, 2):
            loader.set_epoch(epoch)
            got = torch.cat([y for _, y in loader]).numpy()
            n = len(got)
            assert n == n_expected - n_expected % 24
            np.testing.assert_array_equal(got, all_labels[order.indices(epoch)[:n]])
    loader = build_loader(cfg_for(small_beton), "train", "cpu")
    runs = []
    for _ in range(2):
        loader.set_epoch(1)
        runs.append(torch.cat([x for x, _ in loader]))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)  # independent of thread scheduling
    loader.set_epoch(2)
    assert not torch.equal(runs[0], torch.cat([x for x, _ in loader]))


@pytest.mark.parametrize("engine", ["ffcv", "nvjpeg"])
def test_an_epoch_started_part_way_gives_the_same_batches(small_beton, engine):
    """What a mid-epoch resume relies on: batches 2.. of `iter_from(2)` equal those of a full pass, augmentation and
    mixing included (crop keys are per sample, the device stage and mixing draw per batch)."""
    loader = build_loader(cfg_for(small_beton, **{"data.engine": engine}), "train", "cpu")
    loader.set_epoch(3)
    full = [(x.clone(), y.clone()) for x, y in loader]
    loader.set_epoch(3)
    part = [(x.clone(), y.clone()) for x, y in loader.iter_from(2)]
    assert len(full) == 5 and len(part) == 3
    for (xa, ya), (xb, yb) in zip(full[2:], part):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert loader.epoch == 4  # a finished pass still moves on to the next epoch


def ffcv_decode(b: Beton, i: int) -> np.ndarray:
    """Decode sample i with FFCV's own JPEG decoder, so references differ from the engine only in what we test."""
    from ffcv.libffcv import imdecode

    m = b.image_meta()[i]
    h, w = int(m["height"]), int(m["width"])
    out = np.zeros((h, w, 3), np.uint8)
    imdecode(np.asarray(b.image_bytes(i)), out, h, w, h, w, 0, 0, 1, 1, False, False)
    return out


def _engine_batches(loader, epoch=0):
    return [(imgs.clone(), labels) for imgs, labels in loader.engine.batches(epoch)]


def test_rrc_crop_is_the_keyed_box(small_beton):
    """The engine's uint8 crops equal PIL's crop + bicubic resize of the box crops.rrc_box gives for the key."""
    cfg = cfg_for(small_beton, **{"data.shuffle": False})
    loader = build_loader(cfg, "train", "cpu")
    b = Beton(small_beton)
    ek = crops.epoch_key(0, 0, 0)
    lo, hi = np.log(3 / 4), np.log(4 / 3)
    imgs, _ = _engine_batches(loader)[0]
    diffs = []
    for slot in range(24):
        src = ffcv_decode(b, slot)
        key = np.uint64(crops.sample_key(ek, slot, slot))
        i, j, h, w = crops.rrc_box(src.shape[0], src.shape[1], 0.08, 1.0, lo, hi, key)
        ref = np.asarray(Image.fromarray(src).crop((j, i, j + w, i + h)).resize((48, 48), Image.BICUBIC))
        diffs.append(np.abs(imgs[slot].numpy().astype(int) - ref.astype(int)).mean())
    # Only Pillow's fixed-point weights separate the two.
    assert max(diffs) < 0.3, diffs


def test_src_crop_pads_by_reflection(small_beton):
    cfg = cfg_for(small_beton, **{"data.shuffle": False, "aug.crop": "src"})
    loader = build_loader(cfg, "train", "cpu")
    b = Beton(small_beton)
    ek = crops.epoch_key(0, 0, 0)
    padded = 0
    for bi, (imgs, _) in enumerate(_engine_batches(loader)):
        for slot in range(24):
            idx = bi * 24 + slot
            src_h, src_w = b.image_meta()[idx]["height"], b.image_meta()[idx]["width"]
            key = np.uint64(crops.sample_key(ek, idx, slot))
            _, _, _, _, oi, oj, oh, ow = crops.src_box(int(src_h), int(src_w), 48, 4, key)
            out = imgs[slot].numpy()
            for k in range(1, oi + 1):
                np.testing.assert_array_equal(out[oi - k], out[oi + k])
            for k in range(1, oj + 1):
                np.testing.assert_array_equal(out[:, oj - k], out[:, oj + k])
            padded += (oi > 0) + (oj > 0) + (oi + oh < 48) + (oj + ow < 48)
    assert padded > 20  # the padding branch was exercised


@pytest.mark.parametrize("ratio", [1.0, 0.875])
def test_eval_crop_equals_reference_transform(small_beton, ratio):
    """Reference: torchvision Resize(int(size / ratio), bicubic) + CenterCrop(size) on the stored image.
    Tolerance: mean |diff| < 0.3 grey levels (Pillow's fixed-point weights)."""
    cfg = cfg_for(small_beton, **{"aug.eval_crop_ratio": ratio})
    imgs, _ = _engine_batches(build_loader(cfg, "val", "cpu"))[0]
    b = Beton(small_beton)
    tf = T.Compose([T.Resize(int(48 / ratio), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(48)])
    for k in range(len(imgs)):
        ref = np.asarray(tf(Image.fromarray(ffcv_decode(b, k)))).astype(int)
        assert np.abs(imgs[k].numpy().astype(int) - ref).mean() < 0.3, k


@pytest.fixture(scope="module")
def real_beton(imagenet_sample, tmp_path_factory):
    """48 real photos (the first 48 classes of the ImageNet sample)."""
    d = tmp_path_factory.mktemp("real48")
    classes = sorted(p.name for p in imagenet_sample.iterdir() if p.is_dir())[:48]
    (d / "classes.txt").write_text("\n".join(classes))
    src = d / "src"
    for c in classes:
        (src / c).mkdir(parents=True)
        for f in (imagenet_sample / c).iterdir():
            (src / c / f.name).symlink_to(f)
    convert(str(src), str(d / "r.beton"), workers=2, show_progress=False)
    return str(d / "r.beton")


@pytest.mark.parametrize("ratio, size", [(1.0, 224), (0.875, 224), (1.0, 160)])
def test_eval_crop_equals_reference_on_real_photos(real_beton, ratio, size):
    """The same check on real photos at the recipe's sizes."""
    cfg = cfg_for(real_beton, **{"aug.eval_crop_ratio": ratio, "aug.img_size": size, "model.num_classes": 48,
                                 "data.batch_size": 32})
    imgs, _ = _engine_batches(build_loader(cfg, "val", "cpu"))[0]
    b = Beton(real_beton)
    tf = T.Compose([T.Resize(int(size / ratio), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    diffs = [np.abs(imgs[k].numpy().astype(int) - np.asarray(tf(Image.fromarray(ffcv_decode(b, k)))).astype(int))
             for k in range(len(imgs))]
    assert max(d.mean() for d in diffs) < 0.3 and max(d.max() for d in diffs) <= 2


def test_bad_data_is_one_clear_error(small_beton, tmp_path):
    with pytest.raises(DataError, match="model.num_classes is 5"):
        build_loader(cfg_for(small_beton, **{"model.num_classes": 5}), "train", "cpu")
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"not a beton" * 100)
    with pytest.raises(DataError, match="not a valid .beton"):
        build_loader(cfg_for(str(junk)), "train", "cpu")
    with pytest.raises(DataError, match="cannot open"):
        build_loader(cfg_for(str(tmp_path / "absent.beton")), "train", "cpu")
    with pytest.raises(DataError, match="len // 256"):
        build_loader(cfg_for(small_beton, **{"data.repeats": 3}), "train", "cpu")


def test_missing_ffcv_is_one_message():
    code = ("import sys; sys.modules['ffcv'] = None\n"
            "from pipelines import ffcv_engine\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "pip install -e '.[ffcv]'" in r.stderr

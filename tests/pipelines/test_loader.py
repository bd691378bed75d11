"""build_loader end to end on small .beton files: what the model receives, exact epochs, keyed crops, errors."""

import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from dataset_tools.beton import Beton
from dataset_tools.convert import convert
from dataset_tools.synthetic import make_imagefolder
from pipelines import DataError, crops, keys
from pipelines.sampler import EpochOrder

from ..conftest import REPO, FakeCuda, collector_off, plain_loader


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


def cfg_for(path, **sets) -> dict:
    base = {
        "data.train": path,
        "data.val": path,
        "model.num_classes": 10,
        "data.batch_size": 24,
        "data.workers": 2,
        "data.repeats": 1,
        "aug.img_size": 48,
        "train.amp": "fp32",
    }
    base.update(sets)
    return base


def build_loader(sets: dict, split: str, device="cpu"):
    return plain_loader(split, device, **sets)


@pytest.mark.slow
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
    # timm's soft mixed targets: each row sums to 1 over one or two classes (the loss binarises them for BCE)
    assert y.shape == (24, 10) and torch.allclose(y.sum(1), torch.ones(24)) and ((y > 0).sum(1) <= 2).all()
    bf16 = build_loader(cfg_for(small_beton, **{"train.amp": "bf16"}), "train", "cpu")
    assert next(iter(bf16))[0].dtype == torch.bfloat16


@pytest.mark.slow
def test_eval_batches_cover_the_set_once(small_beton):
    loader = build_loader(cfg_for(small_beton), "val", "cpu")
    labels = torch.cat([y for _, y in loader])
    np.testing.assert_array_equal(labels.numpy(), Beton(small_beton).labels())  # in order, no drop, no pad
    assert len(loader) == 4  # eval batch = 1.5 x 24 = 36: 36+36+36+12


@pytest.mark.slow
def test_epoch_order_is_exact_and_deterministic(small_beton, big_beton):
    for path, repeats, n_expected in ((small_beton, 1, 120), (big_beton, 3, 512)):
        cfg = cfg_for(path, **{"data.repeats": repeats, "aug.mixup": 0, "aug.cutmix": 0})
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


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ffcv", "nvjpeg"])
def test_an_epoch_started_part_way_gives_the_same_batches(small_beton, engine):
    """What a mid-epoch resume relies on: batches 2.. of `iter_from(2)` equal those of a full pass, augmentation and
    mixing included (crop keys are per sample, the augmentation ops and mixing draw per batch)."""
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


@pytest.mark.slow
def test_rrc_crop_is_the_keyed_box(small_beton):
    """The engine's uint8 crops equal PIL's crop + bicubic resize of the box crops.rrc_box gives for the key."""
    cfg = cfg_for(small_beton, **{"data.shuffle": False})
    loader = build_loader(cfg, "train", "cpu")
    b = Beton(small_beton)
    ek = keys.epoch_key(0, 0, 0)
    lo, hi = np.log(3 / 4), np.log(4 / 3)
    imgs, _ = _engine_batches(loader)[0]
    diffs = []
    for slot in range(24):
        src = ffcv_decode(b, slot)
        key = np.uint64(keys.sample_key(ek, slot, slot))
        i, j, h, w = crops.rrc_box(src.shape[0], src.shape[1], 0.08, 1.0, lo, hi, key)
        ref = np.asarray(Image.fromarray(src).crop((j, i, j + w, i + h)).resize((48, 48), Image.BICUBIC))
        diffs.append(np.abs(imgs[slot].numpy().astype(int) - ref.astype(int)).mean())
    # Only Pillow's fixed-point weights separate the two.
    assert max(diffs) < 0.3, diffs


@pytest.mark.slow
def test_src_crop_pads_by_reflection(small_beton):
    cfg = cfg_for(small_beton, **{"data.shuffle": False, "aug.crop": "src"})
    loader = build_loader(cfg, "train", "cpu")
    b = Beton(small_beton)
    ek = keys.epoch_key(0, 0, 0)
    padded = 0
    for bi, (imgs, _) in enumerate(_engine_batches(loader)):
        for slot in range(24):
            idx = bi * 24 + slot
            src_h, src_w = b.image_meta()[idx]["height"], b.image_meta()[idx]["width"]
            key = np.uint64(keys.sample_key(ek, idx, slot))
            _, _, _, _, oi, oj, oh, ow = crops.src_box(int(src_h), int(src_w), 48, 4, key)
            out = imgs[slot].numpy()
            for k in range(1, oi + 1):
                np.testing.assert_array_equal(out[oi - k], out[oi + k])
            for k in range(1, oj + 1):
                np.testing.assert_array_equal(out[:, oj - k], out[:, oj + k])
            padded += (oi > 0) + (oj > 0) + (oi + oh < 48) + (oj + ow < 48)
    assert padded > 20  # the padding branch was exercised


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("ratio, size", [(1.0, 224), (0.875, 224), (1.0, 160)])
def test_eval_crop_equals_reference_on_real_photos(real_beton, ratio, size):
    """The same check on real photos at the recipe's sizes."""
    cfg = cfg_for(
        real_beton,
        **{"aug.eval_crop_ratio": ratio, "aug.img_size": size, "model.num_classes": 48, "data.batch_size": 32},
    )
    imgs, _ = _engine_batches(build_loader(cfg, "val", "cpu"))[0]
    b = Beton(real_beton)
    tf = T.Compose([T.Resize(int(size / ratio), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    diffs = [
        np.abs(imgs[k].numpy().astype(int) - np.asarray(tf(Image.fromarray(ffcv_decode(b, k)))).astype(int))
        for k in range(len(imgs))
    ]
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
    code = "import sys; sys.modules['ffcv'] = None\nfrom pipelines import ffcv_engine\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "pip install -e '.[ffcv]'" in r.stderr


@pytest.mark.slow
def test_mixup_blends_in_float32_and_casts_once(small_beton):
    """The official code blends fp32 images; blending after a cast to bf16 rounds both images first. A bf16 batch is
    the fp32 one cast once, bit for bit."""
    sets = {"aug.mixup": 0.8, "aug.cutmix": 1.0, "aug.mix_switch_prob": 0.0}  # always mixup: a true blend
    fp32 = build_loader(cfg_for(small_beton, **sets), "train", "cpu")
    bf16 = build_loader(cfg_for(small_beton, **sets, **{"train.amp": "bf16"}), "train", "cpu")
    (xa, ya), (xb, yb) = next(iter(fp32)), next(iter(bf16))
    assert xb.dtype == torch.bfloat16 and xb.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(xb, xa.to(torch.bfloat16)) and torch.equal(ya, yb)
    assert bf16.augment.dtype == torch.float32  # the augmentation itself stays float32 when mixing follows


@pytest.mark.slow
def test_finetuning_randaugment_runs_in_the_batch_augmentation(small_beton):
    """Fine-tuning: the engine's uint8 batch goes straight to BatchAugment, which runs RandAugment after the flip
    from the batch's keyed stream, then mixing: exactly that composition, and the same batches when an epoch
    starts part-way (mid-epoch resume)."""
    cfg = cfg_for(
        small_beton,
        **{
            "aug.auto_augment": "rand-m9-mstd0.5-inc1",
            "aug.three_augment": False,
            "aug.color_jitter": 0.0,
            "aug.label_smoothing": 0.1,
        },
    )
    loader = build_loader(cfg, "train", "cpu")
    ra = loader.augment.op("randaugment")
    assert ra is not None and ra.translate_const == int(48 * 0.45)
    loader.set_epoch(1)
    full = [(x.clone(), y.clone()) for x, y in loader]
    raw = [(i.clone(), y.clone()) for i, y in loader.engine.batches(1)]
    loader.epoch = 1
    for b in (0, 3):
        key, rng = loader._keys(b)
        x, p = loader.augment(raw[b][0], key)
        assert p["randaugment"].apply.any()
        x, y = loader.mixing(x, raw[b][1], rng)
        assert torch.equal(x, full[b][0]) and torch.equal(y, full[b][1])
    loader.set_epoch(1)
    part = [(x.clone(), y.clone()) for x, y in loader.iter_from(3)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[3:], part))
    # The ops change the pixels: the same batch without RandAugment differs.
    plain = build_loader(
        cfg_for(small_beton, **{"aug.three_augment": False, "aug.color_jitter": 0.0, "aug.label_smoothing": 0.1}),
        "train",
        "cpu",
    )
    plain.set_epoch(1)
    assert not torch.equal(next(iter(plain))[0], full[0][0])


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("baseline", None),
        ("gray", None),
        ("444", None),
        ("422", None),
        ("progressive", "progressive"),
        ("cmyk", "CMYK"),
        ("411", "subsampling 4x1 1x1 1x1"),
        ("junk", "unreadable header"),
    ],
)
def test_jpegs_a_gpu_decoder_refuses_are_told_by_their_header(kind, reason):
    import io

    from pipelines.jpeg_header import gpu_refusal

    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    if kind == "411":  # Pillow cannot write 4:1:1: patch a 4:4:4 frame header's luma sampling to 4x1
        img.save(buf, "JPEG", subsampling=0)
        data = bytearray(buf.getvalue())
        sof = data.index(b"\xff\xc0")
        data[sof + 11] = 0x41
        data = bytes(data)
    elif kind == "junk":
        data = b"\xff\xd8\xff\xda\x00\x02"
    else:
        {
            "baseline": lambda: img.save(buf, "JPEG"),
            "gray": lambda: img.convert("L").save(buf, "JPEG"),
            "444": lambda: img.save(buf, "JPEG", subsampling=0),
            "422": lambda: img.save(buf, "JPEG", subsampling=1),
            "progressive": lambda: img.save(buf, "JPEG", progressive=True),
            "cmyk": lambda: img.convert("CMYK").save(buf, "JPEG"),
        }[kind]()
        data = buf.getvalue()
    assert gpu_refusal(data) == reason


@pytest.fixture(scope="module")
def raw_beton(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    make_imagefolder(d / "src", num_classes=3, per_class=4, seed=5, min_side=24, max_side=48)
    convert(str(d / "src"), str(d / "raw.beton"), workers=1, write_mode="raw", show_progress=False)
    return str(d / "raw.beton")


def _gpu_path_batches(path, epoch=0, **sets):
    """The nvjpeg engine's GPU code path (batched decode_jpeg, CPU fallback, per-sample crops) run with the CPU as
    its device: torchvision decodes a list of JPEGs on either."""
    loader = build_loader(cfg_for(path, **{"data.engine": "nvjpeg", **sets}), "val", "cpu")
    engine = loader.engine
    return engine, [engine._gpu_batch(idx, keys) for idx, keys in engine.index_batches(epoch)]


def test_nvjpeg_gpu_path_decodes_refused_jpegs_on_the_cpu_and_counts_them(small_beton, monkeypatch):
    import pipelines.beton_source as source

    engine, clean = _gpu_path_batches(small_beton)
    assert engine.epoch_report() == {}
    monkeypatch.setattr(source, "gpu_refusal", lambda data: "progressive" if data[-3] % 3 == 0 else None)
    engine, mixed = _gpu_path_batches(small_beton)
    refused = sum(engine._refusals[i] is not None for i in range(120))
    assert 10 < refused < 110
    assert engine.epoch_report() == {"cpu_decoded": refused, "cpu_decoded_reasons": {"progressive": refused}}
    for a, b in zip(clean, mixed):  # the same pixels whichever decoder took them (both libjpeg-turbo here)
        assert torch.equal(a, b)


def test_nvjpeg_gpu_path_never_decodes_an_empty_list(raw_beton, monkeypatch):
    """decode_jpeg([], device='cuda') raises: a batch of raw pixels has nothing for nvJPEG."""
    import pipelines.nvjpeg_engine as nv

    real = nv.decode_jpeg

    def strict(data, *a, **kw):
        if isinstance(data, list) and not data:
            raise RuntimeError("Expected a non empty list of tensors")
        return real(data, *a, **kw)

    monkeypatch.setattr(nv, "decode_jpeg", strict)
    engine, batches = _gpu_path_batches(raw_beton, **{"model.num_classes": 3})
    cpu = [imgs.clone() for imgs, _ in engine.batches(0)]
    assert [b.shape for b in batches] == [c.shape for c in cpu] and engine.epoch_report() == {}


def test_nvjpeg_gpu_path_retries_one_by_one_when_the_batched_decode_fails(small_beton, monkeypatch):
    """A JPEG nvJPEG refuses although its header looked fine fails the whole batched call: the batch is retried
    image by image and only the refused one goes to the CPU."""
    import pipelines.nvjpeg_engine as nv

    real = nv.decode_jpeg
    engine, clean = _gpu_path_batches(small_beton)
    first = engine.image_bytes(int(engine.epoch_order.indices(0)[0]))

    def picky(data, *a, **kw):
        items = data if isinstance(data, list) else [data]
        if kw.get("device") is not None and any(
            len(t) == len(first) and bytes(t.numpy()) == bytes(first) for t in items
        ):
            raise RuntimeError("nvjpegDecode failed: not supported")
        return real(data, *a, **kw)

    monkeypatch.setattr(nv, "decode_jpeg", picky)
    engine, again = _gpu_path_batches(small_beton)
    assert engine.epoch_report() == {"cpu_decoded": 1, "cpu_decoded_reasons": {"refused by nvJPEG": 1}}
    assert all(torch.equal(a, b) for a, b in zip(clean, again))


def test_dali_output_is_copied_by_what_dali_returned():
    """A CPU DALI pipeline returns a TensorListCPU whatever device the loader runs on: it is copied to that device
    (here 'meta', which no DALI path writes to directly), not fed to a CUDA buffer."""
    pytest.importorskip("pipelines.dali_engine")  # DALI, imported as the engine does
    from nvidia.dali.tensors import TensorListCPU

    from pipelines.dali_engine import _to_torch

    out = TensorListCPU(np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3))
    cpu = _to_torch(out, torch.device("cpu"))
    assert cpu.shape == (2, 4, 4, 3) and cpu[1, 3, 3, 2] == 95
    assert _to_torch(out, torch.device("meta")).device.type == "meta"


def test_dali_counts_the_jpegs_its_gpu_decoder_hands_to_its_cpu_fallback(small_beton, monkeypatch):
    """On a GPU, DALI's decoder takes progressive/CMYK/odd-subsampling JPEGs to its CPU path itself; the engine
    counts them per epoch from their headers, as the nvjpeg engine does."""
    pytest.importorskip("pipelines.dali_engine")  # DALI, imported as the engine does
    import pipelines.beton_source as source

    loader = build_loader(cfg_for(small_beton, **{"data.engine": "dali"}), "val", "cpu")
    engine = loader.engine
    monkeypatch.setattr(source, "gpu_refusal", lambda data: "CMYK" if data[-3] % 4 == 0 else None)
    engine.gpu = True  # what the engine does with each batch's inputs before a GPU pipeline decodes them
    for idx, batch_keys in engine.index_batches(0):
        engine._inputs(idx, batch_keys)
    n = sum(r is not None for r in engine._refusals.values())
    assert 0 < n < 120 and engine.epoch_report() == {"cpu_decoded": n, "cpu_decoded_reasons": {"CMYK": n}}


@pytest.mark.parametrize("split, crop", [("train", "rrc"), ("train", "src"), ("val", "rrc")])
@pytest.mark.parametrize("path", ["small_beton", "raw_beton"])
def test_nvjpeg_gpu_path_resamples_like_the_cpu_path(path, split, crop, request):
    """The GPU path's crop (Pillow's bicubic weights as two matrix products, the fractional box, SRC's reflect
    padding) run with the CPU as its device equals the CPU path but for float summation order (a grey level on
    about 1e-5 of the values): on a GPU only the JPEG decoder differs."""
    beton = request.getfixturevalue(path)
    sets = {
        "data.engine": "nvjpeg",
        "aug.crop": crop,
        "model.num_classes": 10 if path == "small_beton" else 3,
        "data.batch_size": 24 if path == "small_beton" else 4,
    }
    loader = build_loader(cfg_for(beton, **sets), split, "cpu")
    engine = loader.engine
    gpu_path = [engine._gpu_batch(idx, keys) for idx, keys in engine.index_batches(1)]
    cpu_path = [imgs.clone() for imgs, _ in engine.batches(1)]
    assert len(gpu_path) == len(cpu_path) > 0
    for a, b in zip(gpu_path, cpu_path):
        diff = (a.int() - b.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def _assert_resampling_parity(gpu_path, cpu_path):
    """Equal but for float summation order: the batched products sum the taps in another order than the CPU
    resampler, which flips a rounding to 8 bits now and then (a grey level, on well under 0.1% of the values)."""
    assert len(gpu_path) == len(cpu_path) > 0
    for a, b in zip(gpu_path, cpu_path):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
        diff = (a.int() - b.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, (diff.max(), (diff > 0).float().mean())


@pytest.fixture(scope="module")
def real_raw_beton(imagenet_sample, tmp_path_factory):
    """24 real photos stored as raw pixels (max side 160): the GPU path's host-decoded, interleaved images."""
    d = tmp_path_factory.mktemp("real_raw")
    classes = sorted(p.name for p in imagenet_sample.iterdir() if p.is_dir())[:24]
    for c in classes:
        (d / "src" / c).mkdir(parents=True)
        for f in (imagenet_sample / c).iterdir():
            (d / "src" / c / f.name).symlink_to(f)
    convert(str(d / "src"), str(d / "raw.beton"), workers=2, write_mode="raw", max_resolution=160, show_progress=False)
    return str(d / "raw.beton")


@pytest.mark.parametrize("split, crop", [("train", "rrc"), ("train", "src"), ("val", "rrc")])
@pytest.mark.parametrize("path, classes", [("real_beton", 48), ("real_raw_beton", 24)])
def test_nvjpeg_batched_crop_resamples_real_photos_like_the_cpu_path(path, classes, split, crop, request):
    """The batched crop (RandomResizedCrop, Simple Random Crop with its padding, the eval centre crop) on real
    photos, JPEG and raw, at the recipe's size: the CPU resampler's pixels (which are Pillow's) but for float
    summation order."""
    beton = request.getfixturevalue(path)
    sets = {
        "data.engine": "nvjpeg",
        "aug.crop": crop,
        "model.num_classes": classes,
        "data.batch_size": 12,
        "aug.img_size": 224 if path == "real_beton" else 128,
    }
    engine = build_loader(cfg_for(beton, **sets), split, "cpu").engine
    gpu_path = [engine._gpu_batch(idx, keys) for idx, keys in engine.index_batches(0)]
    _assert_resampling_parity(gpu_path, [imgs.clone() for imgs, _ in engine.batches(0)])


def test_nvjpeg_batched_crop_mixes_planar_and_interleaved_images(small_beton, monkeypatch):
    """On a GPU nvJPEG's outputs are planar and the CPU's (refused JPEGs, raw pixels) interleaved: one batch holds
    both, gathered separately and put back in slot order. Here every other decoded image is made planar."""
    import pipelines.nvjpeg_engine as nv

    real = nv.decode_jpeg

    def some_planar(data, *a, **kw):
        out = real(data, *a, **kw)
        return [t.contiguous() if k % 2 else t for k, t in enumerate(out)] if isinstance(data, list) else out

    monkeypatch.setattr(nv, "decode_jpeg", some_planar)
    for split, crop in [("train", "rrc"), ("train", "src"), ("val", "rrc")]:
        engine = build_loader(cfg_for(small_beton, **{"data.engine": "nvjpeg", "aug.crop": crop}), split, "cpu").engine
        gpu_path = [engine._gpu_batch(idx, keys) for idx, keys in engine.index_batches(0)]
        _assert_resampling_parity(gpu_path, [imgs.clone() for imgs, _ in engine.batches(0)])


class _CountOps:
    """torch ops dispatched in the block but views (no kernel behind them) and torchvision's decoder (one batched
    call on a GPU, one per image on the CPU)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not func.is_view and func.namespace != "image":
                    counter.ops.append(str(func.overloadpacket))
                return func(*args, **(kwargs or {}))

        self.ops, self._mode = [], Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


@pytest.mark.parametrize("split, crop", [("train", "rrc"), ("train", "src"), ("val", "rrc")])
def test_nvjpeg_gpu_path_launches_as_many_ops_for_4_images_as_for_32(small_beton, split, crop):
    """The GPU path's crop is batched: the ops it dispatches (each at least one kernel launch on a GPU) do not
    grow with the batch; the per-image path launched ~27 per image."""
    counts = {}
    for batch in (4, 32):
        sets = {"data.engine": "nvjpeg", "aug.crop": crop, "data.batch_size": batch}
        engine = build_loader(cfg_for(small_beton, **sets), split, "cpu").engine
        idx, keys = next(engine.index_batches(0))
        with _CountOps() as c:
            engine._gpu_batch_and_labels(idx, keys)
        counts[batch] = c.ops
    assert len(counts[4]) == len(counts[32]) < 120, counts


def _decode_threads():
    import threading

    return [t for t in threading.enumerate() if t.name == "nvjpeg-decode"]


def _gpu_path_engine(path, batch=4, **sets):
    return build_loader(
        cfg_for(path, **{"data.engine": "nvjpeg", "data.batch_size": batch, **sets}), "train", "cpu"
    ).engine


def test_nvjpeg_decode_thread_gives_the_batches_in_order_and_ends_with_the_epoch(small_beton):
    """The GPU path's decode-ahead thread (run here with the CPU as its device): exactly the batches and labels of
    the same path run inline, in order, and no thread left once the epoch is read."""
    engine = _gpu_path_engine(small_beton)
    inline = [(engine._gpu_batch(idx, keys), engine.labels_of(idx)) for idx, keys in engine.index_batches(2)]
    ahead = list(engine._gpu_batches(2))
    assert len(ahead) == len(inline) == 30
    for (xa, ya), (xb, yb) in zip(ahead, inline):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and ya.dtype == torch.int64
    assert [torch.equal(x, y) for (x, _), (y, _) in zip(list(engine._gpu_batches(2, 7)), inline[7:])] == [True] * 23
    assert not _decode_threads()


def test_nvjpeg_decode_thread_stays_ahead_by_at_most_its_queue_and_stops_when_closed(small_beton, monkeypatch):
    """A consumer that stops mid-epoch (a break, an error in its step) closes the generator: the thread, which
    decodes at most AHEAD batches past the one being consumed (plus the one it holds), is joined at once."""
    import time

    import pipelines.nvjpeg_engine as nv

    engine = _gpu_path_engine(small_beton)
    made = []
    real = engine._gpu_batch_and_labels
    monkeypatch.setattr(engine, "_gpu_batch_and_labels", lambda idx, keys: made.append(1) or real(idx, keys))
    it = engine._gpu_batches(0)
    next(it)
    time.sleep(1.0)  # time to run ahead as far as it may
    assert len(made) <= 1 + nv.AHEAD + 1 < 30
    assert len(_decode_threads()) == 1
    it.close()
    assert not _decode_threads()


def test_nvjpeg_decode_thread_error_is_raised_in_the_consumer(small_beton, monkeypatch):
    """An error in decode (a corrupt file, nvJPEG failing) is the consumer's, after the batches decoded before
    it, with a note saying where it came from; the thread is gone."""
    engine = _gpu_path_engine(small_beton)
    real, calls = engine._decode_on_gpu, []

    def failing(idx, data):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("corrupt JPEG in batch 2")
        return real(idx, data)

    monkeypatch.setattr(engine, "_decode_on_gpu", failing)
    got = []
    with pytest.raises(ValueError, match="corrupt JPEG in batch 2") as e:
        for x, _ in engine._gpu_batches(0):
            got.append(x)
    assert len(got) == 2
    if sys.version_info >= (3, 11):  # exception notes
        assert any("nvjpeg engine's decode thread" in n for n in e.value.__notes__)
    assert not _decode_threads()


@pytest.mark.parametrize(
    "capability, kind",
    [
        ((7, 0), "hybrid"),
        ((7, 5), "hybrid"),
        ((8, 0), "hardware"),
        ((8, 6), "hybrid"),
        ((9, 0), "hardware"),
        ((10, 0), "hardware"),
    ],
)
def test_nvjpeg_gpu_decoder_kind_by_compute_capability(monkeypatch, capability, kind):
    """V100 (sm_70), T4 (sm_75), A10/RTX 30 (sm_86) have no hardware JPEG engine; A100 (sm_80), H100 (sm_90) and
    B200 (sm_100) have."""
    from pipelines.nvjpeg_engine import gpu_decoder_kind

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert kind in gpu_decoder_kind(torch.device("cuda", 0))
    assert gpu_decoder_kind(torch.device("cpu")).startswith("CPU")


@pytest.mark.slow
def test_a_training_batch_is_exactly_engine_then_augment_then_mixing(small_beton):
    """Not only in range: batch b of an epoch is the engine's uint8 batch b through BatchAugment and mixing,
    with the streams keyed by (seed, rank, epoch, b), cast once to the AMP dtype: the pre-training recipe's
    path (3-Augment, jitter, mixup/cutmix into soft targets) in bf16."""
    loader = build_loader(cfg_for(small_beton, **{"train.amp": "bf16"}), "train", "cpu")
    loader.set_epoch(2)
    batches = [(x.clone(), y.clone()) for x, y in loader]
    raw = [(i.clone(), y.clone()) for i, y in loader.engine.batches(2)]
    assert len(batches) == len(raw) == 5
    loader.epoch = 2
    for b in (0, 4):
        key, rng = loader._keys(b)
        x, p = loader.augment(raw[b][0], key)
        assert x.dtype == torch.float32 and set(p["three_augment"].branch.tolist()) <= {0, 1, 2}
        x, y = loader.mixing(x, raw[b][1], rng)
        assert torch.equal(batches[b][0], x.to(torch.bfloat16)) and torch.equal(batches[b][1], y)
        assert torch.allclose(y.sum(1), torch.ones(len(y)))


def test_the_engine_is_advanced_on_the_side_stream_and_main_waits_only_after_the_step(monkeypatch):
    """What an engine queues for batch b (a decode, an output copy) must land on the loader's side stream: on the
    caller's stream it sits ahead of step b-1, which the loop queues only after batch b is made, and the step
    waits for the decode. Main may wait for the side stream only once step b-1 is queued, before it gets batch b."""
    from pipelines.loader import Loader

    cuda = FakeCuda(monkeypatch)

    class Engine:
        def batches(self, epoch, start=0):
            for b in range(start, 4):
                cuda.log.append(("engine", b, cuda.current_stream().name))
                yield torch.full((2, 4, 4, 3), b, dtype=torch.uint8), torch.full((2,), b)

    loader = Loader(Engine(), None, None, device=torch.device("cuda", 0), seed=0, rank=0)
    for b, (x, y, _, _) in enumerate(loader.iter_with_params()):
        assert (x == b).all() and (y == b).all()
        cuda.log.append(("step", b))
    log, side = cuda.log, loader._side.name
    assert [e for e in log if e[0] == "engine"] == [("engine", b, side) for b in range(4)]
    main_waits = [i for i, e in enumerate(log) if e == ("wait_stream", "main", side)]
    for b in range(4):
        made, step = log.index(("engine", b, side)), log.index(("step", b))
        assert any(made < i < step for i in main_waits), f"batch {b} was handed over before main waited for it"
        if b:
            assert log.index(("step", b - 1)) < min(i for i in main_waits if i > made), f"step {b - 1} waited"


def test_a_cpu_training_loader_compiles_its_augmentation_when_epochs_repay_it(small_beton, monkeypatch):
    """On a CPU the compiled BatchAugment is what beats the official per-sample pipeline; compilation costs ~15 s,
    so it is chosen without train.compile once an epoch holds enough pixels (ImageNet-sized CPU runs), and not for
    small sets (quickstart, tests). Evaluation and GPU loaders are not affected."""
    from pipelines import build

    assert build.compile_augment_on_cpu(10_000, 224) and not build.compile_augment_on_cpu(2_000, 32)
    assert build.compile_augment_on_cpu(50_000, 96) and not build.compile_augment_on_cpu(50_000, 32)  # CIFAR: eager
    assert not build_loader(cfg_for(small_beton), "train", "cpu").augment.compiled
    monkeypatch.setattr(build, "CPU_COMPILE_PIXELS", 120 * 48 * 48)
    assert build_loader(cfg_for(small_beton), "train", "cpu").augment.compiled
    assert not build_loader(cfg_for(small_beton), "val", "cpu").augment.compiled


@pytest.mark.parametrize("used", ["unused", "one epoch", "abandoned epoch"])
def test_a_dropped_dali_loader_frees_its_pipeline_at_once(small_beton, used):
    """Not at some later garbage collection, which may come in a process forked meanwhile (a convert worker), where
    the pipeline's destructor hung destroying the parent's DALI executor."""
    pytest.importorskip("pipelines.dali_engine")  # DALI, imported as the engine does
    loader = build_loader(cfg_for(small_beton, **{"data.engine": "dali"}), "val", "cpu")
    if used != "unused":
        batches = iter(loader)
        next(batches)
        if used == "one epoch":
            for _ in batches:
                pass
        del batches
    pipeline = weakref.ref(loader.engine.pipe)
    with collector_off():
        del loader
        assert pipeline() is None


def test_a_dali_epoch_left_behind_and_closed_later_does_not_end_the_next_one(small_beton):
    """An abandoned epoch's generator can be closed (by the collector) after the next epoch has begun: it must not
    switch off the feed the new epoch is drawing from, which would end that epoch early without an error."""
    pytest.importorskip("pipelines.dali_engine")  # DALI, imported as the engine does
    engine = build_loader(cfg_for(small_beton, **{"data.engine": "dali"}), "val", "cpu").engine
    whole = [y.clone() for _, y in engine.batches(1)]
    left_behind = engine.batches(1)
    next(left_behind)
    current = engine.batches(1)
    labels = [next(current)[1].clone()]
    left_behind.close()
    labels += [y.clone() for _, y in current]
    assert len(whole) > 2 and len(labels) == len(whole)
    assert all(torch.equal(a, b) for a, b in zip(labels, whole))


def test_dali_decodes_the_next_batch_while_one_is_in_use(small_beton, monkeypatch):
    """DALI is handed batch b+1 before batch b is collected (its own prefetching), so it decodes while the training
    step runs; the batches still come in the sampler's order, as a pass with nothing ahead gives them."""
    dali_engine = pytest.importorskip("pipelines.dali_engine")  # DALI, imported as the engine does
    engine = build_loader(cfg_for(small_beton, **{"data.engine": "dali"}), "val", "cpu").engine
    fed = []
    real = engine._inputs
    monkeypatch.setattr(engine, "_inputs", lambda idx, keys: (fed.append(idx.copy()), real(idx, keys))[1])
    batches = engine.batches(1)
    first = next(batches)
    assert len(fed) == dali_engine.PREFETCH >= 2
    got = [first] + list(batches)
    plan = [idx for idx, _ in engine.index_batches(1)]
    assert len(got) == len(fed) == len(plan) > 2
    for (_, labels), idx, want in zip(got, fed, plan):
        np.testing.assert_array_equal(idx, want)
        assert torch.equal(labels, engine.labels_of(want))


@pytest.mark.parametrize("taken", ["one", "all"])
def test_a_dali_pass_left_part_way_leaves_the_next_one_whole(small_beton, taken):
    """Batches DALI decoded ahead for a pass that was closed are not handed to the next pass (its images would be
    the old pass's, under the new pass's labels), and a pass closed after its last batch, before asking for more,
    does not end the next one at once. The next pass, from its start or part-way (a resume), is a fresh engine's."""
    pytest.importorskip("pipelines.dali_engine")  # DALI, imported as the engine does
    cfg = cfg_for(small_beton, **{"data.engine": "dali"})
    fresh = build_loader(cfg, "val", "cpu").engine
    want = [(x.clone(), y.clone()) for x, y in fresh.batches(2)]
    engine = build_loader(cfg, "val", "cpu").engine
    for start in (0, 2):
        left = engine.batches(1)
        for _ in range(1 if taken == "one" else len(want)):
            next(left)
        left.close()
        got = [(x.clone(), y.clone()) for x, y in engine.batches(2, start)]
        assert len(got) == len(want) - start
        for (xa, ya), (xb, yb) in zip(got, want[start:]):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_the_ranks_of_a_run_draw_their_own_batch_augmentation(data):
    """Ranks 0 and 1 of a world of 2, built as each rank builds its loader: the same batch index of the same epoch
    gets other flips, 3-Augment branches and blur sigmas, jitter factors and mixing on each rank (one stream
    shared by all ranks would apply the same augmentation to the whole global batch's rank slices); the same rank
    built again draws the same."""
    sets = {"data.train": data / "train.beton", "model.num_classes": 4, "data.batch_size": 16, "data.repeats": 1}
    images = torch.full((16, 8, 8, 3), 128, dtype=torch.uint8)
    labels = torch.arange(16) % 4

    def draws(rank):
        loader = plain_loader("train", rank=rank, world=2, **sets)
        loader.set_epoch(1)
        _, y, p, _ = loader.prepare(0, images, labels)
        return y, p["flip"].flip, p["three_augment"].branch, p["three_augment"].sigma, p["color_jitter"].factors

    rank0, rank1, again = draws(0), draws(1), draws(0)
    for name, a, b, c in zip(("mixing", "flip", "branch", "sigma", "jitter"), rank0, rank1, again):
        assert not torch.equal(a, b), f"ranks 0 and 1 drew the same {name}"
        assert torch.equal(a, c), name

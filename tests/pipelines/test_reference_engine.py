"""The reference engine (`data.engine: reference`): the official per-sample PIL pipeline, on an ImageFolder or a .beton.

What it must be to serve as the yardstick: its evaluation batches are torchvision's official eval transform of the
original files, bit for bit; its training draws have the recipe's distributions (tolerances as in
test_distributions.py: rates with 5 standard deviations of slack, KS distances against the 99.9% critical value
1.95 / sqrt(n)); it visits the samples of every other engine in the same order; an epoch started part-way gives the
tail of an uninterrupted one; a raw .beton reads as its source folder; and a run trains on it.
"""

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import ImageFilter
from torchvision import datasets
from torchvision import transforms as T

from dataset_tools.synthetic import make_imagefolder
from pipelines import reference_engine as ref
from pipelines.errors import DataError
from tests.conftest import plain_loader
from tests.pipelines.test_distributions import ks_two_sample, ks_uniform, rate_ok

NO_MIX = {"aug.mixup": 0.0, "aug.cutmix": 0.0}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """4 classes x 8 JPEGs of 40..64 px: big enough for RandomResizedCrop's area fractions to round finely."""
    root = tmp_path_factory.mktemp("reference") / "src"
    make_imagefolder(root, num_classes=4, per_class=8, seed=3, min_side=40, max_side=64)
    return root


def _convert(src, out, write_mode):
    from dataset_tools.convert import convert

    convert(str(src), str(out), workers=1, write_mode=write_mode, show_progress=False)
    return out


def _loader(split, path, **sets):
    data = {
        f"data.{split}": path,
        "data.engine": "reference",
        "data.workers": 0,
        "data.repeats": 1,
        "model.num_classes": 4,
        "aug.img_size": 16,
        "data.batch_size": 8,
    }
    return plain_loader(split, **{**data, **sets})


def test_eval_batches_are_torchvisions_official_eval_transform_of_the_files(tree):
    loader = _loader("val", tree, **{"aug.eval_crop_ratio": 0.875, "data.eval_batch_size": 12})
    official = datasets.ImageFolder(
        str(tree),
        transform=T.Compose(
            [
                T.Resize(int(16 / 0.875), interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(16),
                T.ToTensor(),
                T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        ),
    )
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    assert len(x) == len(official) == 32
    want = torch.stack([official[i][0] for i in range(len(official))])
    assert torch.equal(y, torch.tensor(official.targets))
    assert torch.equal(x, want)  # the same PIL ops on the same files: exactly
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_preview_draws_the_reference_engines_batch(tree, tmp_path):
    from pipelines.preview import make_preview

    loader = _loader("train", tree)
    info = make_preview(loader, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), str(tmp_path / "p.png"))
    assert info["samples"] == 8 and (tmp_path / "p.png").stat().st_size > 0


def test_a_folder_is_refused_by_the_other_engines_with_the_conversion_to_run(tree):
    with pytest.raises(DataError, match="convert it first with deit3-convert"):
        plain_loader("train", **{"data.train": tree, "data.engine": "ffcv", "model.num_classes": 4})


def test_a_folder_names_its_classes_for_num_classes_auto(tree):
    from dataset_tools.shards import classes_of

    assert classes_of(tree) == datasets.ImageFolder(str(tree)).classes == [f"class_{k:02d}" for k in range(4)]


def test_a_folder_with_more_classes_than_the_model_is_refused(tree):
    with pytest.raises(DataError, match="4 class folders but model.num_classes is 3"):
        _loader("train", tree, **{"model.num_classes": 3})


def test_a_file_pil_cannot_read_stops_the_epoch_naming_it(bad_tree):
    root, _ = bad_tree
    loader = plain_loader(
        "val",
        **{"data.val": root, "data.engine": "reference", "data.workers": 0, "model.num_classes": 4, "aug.img_size": 16},
    )  # 3 classes and an empty one
    with pytest.raises(DataError, match=r"class_00/\S+: PIL cannot read it as an image"):
        for _ in loader:
            pass


# ---- training draws ---------------------------------------------------------------------------------------------

EPOCHS = 80  # x 32 samples = 2560 draws


@pytest.fixture(scope="module")
def draws(tree):
    """What the training pipeline drew for 2560 samples (the default AugConfig but a larger RRC minimum scale),
    recorded by spies on the operations it calls, in-process; and each batch's mixing kind."""
    mp = pytest.MonkeyPatch()
    seen = {"flip": 0, "branch": [], "sigma": [], "area": [], "cutmix": []}

    def spy(name, cls):
        call = cls.__call__

        def wrapped(self, img):
            seen["branch"].append(name)
            return call(self, img)

        mp.setattr(cls, "__call__", wrapped)

    for name, cls in (("grayscale", ref.Grayscale3), ("solarize", ref.Solarize), ("blur", ref.GaussianBlur)):
        spy(name, cls)

    class Blur(ImageFilter.GaussianBlur):
        def __init__(self, radius):
            seen["sigma"].append(radius)
            super().__init__(radius)

    mp.setattr(ImageFilter, "GaussianBlur", Blur)
    hflip = TF.hflip

    def flip(img):
        seen["flip"] += 1
        return hflip(img)

    mp.setattr(TF, "hflip", flip)
    get_params = T.RandomResizedCrop.get_params

    def params(img, scale, ratio):
        i, j, h, w = get_params(img, scale, ratio)
        seen["area"].append((h * w / (img.size[0] * img.size[1]), img.size))
        return i, j, h, w

    mp.setattr(T.RandomResizedCrop, "get_params", staticmethod(params))
    from timm.data import Mixup

    choose = Mixup._params_per_batch

    def mix_params(self):
        lam, use_cutmix = choose(self)
        seen["cutmix"].append(use_cutmix)
        return lam, use_cutmix

    mp.setattr(Mixup, "_params_per_batch", mix_params)
    try:
        loader = _loader("train", tree, **{"aug.rrc_scale": [0.35, 1.0], "data.batch_size": 4})
        for epoch in range(EPOCHS):
            loader.set_epoch(epoch)
            for _ in loader:
                pass
    finally:
        mp.undo()
    return seen


@pytest.mark.slow
def test_flip_rate_is_one_half(draws):
    assert rate_ok(draws["flip"] / (32 * EPOCHS), 0.5, 32 * EPOCHS)


def test_exactly_one_three_augment_choice_a_third_each(draws):
    n = 32 * EPOCHS
    assert len(draws["branch"]) == n
    for name in ("grayscale", "solarize", "blur"):
        assert rate_ok(draws["branch"].count(name) / n, 1 / 3, n), name


def test_blur_sigma_is_uniform_on_0_1_2_0(draws):
    sigma = np.array(draws["sigma"])
    assert len(sigma) == draws["branch"].count("blur")
    assert ks_uniform(sigma, 0.1, 2.0) < 1.95 / math.sqrt(len(sigma))


def test_rrc_area_fractions_are_torchvisions_for_the_configured_scale(draws):
    area = np.array([a for a, _ in draws["area"]])
    assert len(area) == 32 * EPOCHS
    # Box sides are rounded to whole pixels (>= 24 px here): an area fraction is off by at most ~2 * 0.5 / 24.
    assert area.min() > 0.35 * (1 - 1 / 24) - 1e-9 and area.max() <= 1.0
    torch.manual_seed(0)
    want = np.array([get_area(size) for _, size in draws["area"]])
    assert ks_two_sample(area, want) < 1.95 * math.sqrt(2 / len(area))


def get_area(size):
    from PIL import Image

    _, _, h, w = T.RandomResizedCrop.get_params(Image.new("RGB", size), (0.35, 1.0), (3 / 4, 4 / 3))
    return h * w / (size[0] * size[1])


def test_every_batch_is_mixed_half_by_cutmix(draws):
    kinds = draws["cutmix"]
    assert len(kinds) == 8 * EPOCHS
    assert rate_ok(sum(kinds) / len(kinds), 0.5, len(kinds))


def test_simple_random_crop_offsets_cover_the_reflect_padding(tree, monkeypatch):
    """aug.crop src: Resize(size) then RandomCrop(size, padding 4, reflect): along the shorter side, which Resize made
    exactly `size`, the offset into the padded image takes each of 0..8."""
    seen = []
    get_params = T.RandomCrop.get_params

    def params(img, output_size):
        i, j, h, w = get_params(img, output_size)
        width, height = TF.get_image_size(img)
        seen.append(i if height < width else j)
        assert (min(width, height), h, w) == (16 + 8, 16, 16)
        return i, j, h, w

    monkeypatch.setattr(T.RandomCrop, "get_params", staticmethod(params))
    loader = _loader("train", tree, **{"aug.crop": "src", **NO_MIX})
    for epoch in range(10):
        loader.set_epoch(epoch)
        for x, _ in loader:
            assert x.shape == (8, 3, 16, 16)
    assert len(seen) == 320 and set(seen) == set(range(9))


def test_fine_tuning_runs_timms_randaugment_transform(tree):
    """aug.auto_augment with 3-Augment off: timm's create_transform, as the official fine-tuning builds it."""
    from timm.data.auto_augment import RandAugment

    loader = _loader("train", tree, **{"aug.auto_augment": "rand-m9-mstd0.5-inc1", "aug.three_augment": False})
    ops = loader.engine.dataset.transform.transforms
    assert any(isinstance(t, RandAugment) for t in ops)
    assert not any(isinstance(t, (T.ColorJitter, T.RandomChoice)) for t in ops)  # timm: no jitter with RandAugment
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 16, 16) and torch.isfinite(x).all() and y.shape == (8, 4)


# ---- order, resume, sources -------------------------------------------------------------------------------------


def test_same_samples_in_the_same_order_as_the_ffcv_engine(data):
    pytest.importorskip("ffcv")
    sets = {
        "data.train": data / "train.beton",
        "data.batch_size": 8,
        "data.repeats": 1,
        "data.workers": 1,
        "model.num_classes": 4,
        "aug.img_size": 16,
        **NO_MIX,
    }
    fast = plain_loader("train", **sets)
    slow = plain_loader("train", **{**sets, "data.engine": "reference", "data.workers": 0})
    assert len(fast) == len(slow) == 6
    for epoch in (0, 3):
        a = [y for _, y in fast.engine.batches(epoch)]
        b = [y for _, y in slow.engine.batches(epoch)]
        assert len(a) == len(b) == 6
        for ya, yb in zip(a, b):
            assert torch.equal(ya, yb)


def test_an_epoch_started_part_way_is_the_tail_of_an_uninterrupted_one(tree):
    """Workers (here one process) and the in-process path draw the same: each sample's randomness is its key's."""
    full = _loader("train", tree, **{"data.workers": 1})
    full.set_epoch(2)
    whole = list(full)
    assert len(whole) == 4
    resumed = _loader("train", tree)
    resumed.set_epoch(2)
    tail = list(resumed.iter_from(2))
    assert len(tail) == 2
    for (x, y), (xw, yw) in zip(tail, whole[2:]):
        assert torch.equal(x, xw) and torch.equal(y, yw)
    other = next(iter(_loader("train", tree, **{"data.seed": 1})))  # and the draws do depend on the seed
    assert not torch.equal(other[0], whole[0][0])


def test_a_raw_beton_reads_as_its_source_folder_and_a_jpeg_one_nearly(tree, tmp_path):
    raw = _convert(tree, tmp_path / "raw.beton", "raw")
    jpg = _convert(tree, tmp_path / "jpg.beton", "jpg")
    for split, sets in (("train", NO_MIX), ("val", {})):
        folder = list(_loader(split, tree, **sets))
        for path, exact in ((raw, True), (jpg, False)):
            got = list(_loader(split, path, **sets))
            assert len(got) == len(folder)
            for (x, y), (xf, yf) in zip(got, folder):
                assert torch.equal(y, yf)
                if exact:
                    assert torch.equal(x, xf), (split, path)
                else:  # re-encoded JPEG, same geometry: a small pixel error (normalised units; 1/255/0.225 ~ 0.017)
                    assert (x - xf).abs().mean() < 0.1, (split, path)


def test_a_quickstart_run_on_a_folder_trains(tree, tmp_path):
    from deit3_fast.config import load_config
    from deit3_fast.trainer import train

    cfg = load_config(
        "quickstart",
        [
            f"data.train={tree}",
            f"data.val={tree}",
            "data.engine=reference",
            "data.workers=0",
            "model.num_classes=auto",
            "data.batch_size=8",
            "train.global_batch=8",
            "schedule.epochs=2",
            "schedule.warmup_epochs=0",
            "aug.img_size=16",
            "train.log_every=100",
        ],
    )
    rows = train(cfg, tmp_path / "run", torch.device("cpu"), quiet=True)
    assert len(rows) == 2
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert (tmp_path / "run" / "checkpoint-last.pt").is_file()


@pytest.mark.cuda
def test_on_cuda_the_batches_are_the_cpu_ones_pinned_and_moved(tree):
    """The CUDA path (pinned DataLoader batches, the Loader's side-stream prefetch without a device stage) gives the
    host's batches: the pipeline runs on the host either way, and the mixing blend is the same fp32 arithmetic."""
    sets = {"data.workers": 1}
    cpu = list(_loader("train", tree, **sets))
    gpu = list(_loader("train", tree, device="cuda", **sets))
    assert len(cpu) == len(gpu) == 4
    for (x, y), (xg, yg) in zip(cpu, gpu):
        assert xg.is_cuda and xg.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(xg.cpu(), x, rtol=0, atol=1e-6)
        torch.testing.assert_close(yg.cpu(), y, rtol=0, atol=1e-6)


def test_torch_and_numpy_draw_streams_of_their_own_for_a_sample():
    """torch and numpy seed the same MT19937 from the same 32 bits: one seed for both made torch's first floats
    numpy's first words (so torchvision's flip and jitter tracked timm RandAugment's choices). Each gets its own key."""
    from pipelines.reference_engine import seeded

    with seeded(np.uint64(987654321)):
        t = (torch.rand(64) * 2**24).long().tolist()
        w = [int(x) & 0xFFFFFF for x in np.random.randint(0, 2**32, size=64, dtype=np.uint64)]
    assert sum(a == b for a, b in zip(t, w)) <= 1  # independent 24-bit draws agree by chance ~64 / 2^24 times

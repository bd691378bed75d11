"""`preview`'s grid: each tile's caption says the mix the tile shows (kind, lambda, partner, classes), as the mixing
drew it, and small images are enlarged so that the captions fit."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.preview import _FONT, MIN_TILE, denormalize, make_preview

from ..conftest import plain_loader

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SMOOTHING = 0.1
MIXED = re.compile(r"(mixup|cutmix) lam=(\d\.\d\d) with #(\d+)\ny=(\d+)\* \((\d\.\d\d)\)(?: \+ (\d+) \((\d\.\d\d)\))?$")


def _loader(data, **sets):
    base = {
        "data.train": data / "train.beton",
        "model.num_classes": 4,
        "data.batch_size": 16,
        "data.repeats": 1,
        "data.workers": 1,
        "aug.img_size": 32,
        "aug.label_smoothing": SMOOTHING,
    }
    return plain_loader("train", **{**base, **sets})


def _tiles(png, n: int, columns: int = 8) -> np.ndarray:
    """The grid's tiles back at the model's size (the enlargement is by a whole factor, nearest neighbour)."""
    img = np.asarray(Image.open(png).convert("RGB"))
    rows = n // columns
    tile_w = img.shape[1] // columns
    step = tile_w // 32
    return np.stack(
        [
            img[r * (img.shape[0] // rows) :, c * tile_w :][: 32 * step : step, : 32 * step : step]
            for r, c in (divmod(k, columns) for k in range(n))
        ]
    )


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_a_mixed_tiles_caption_is_the_mix_the_tile_shows(data, tmp_path, kind):
    only = {"aug.cutmix": 0.0} if kind == "mixup" else {"aug.mixup": 0.0}
    info = make_preview(_loader(data, **only), MEAN, STD, str(tmp_path / "p.png"))
    # The batch again (its draws are keyed by seed, epoch and batch index), and unmixed: the ops draw from streams
    # of their own, so turning mixing off leaves the images before mixing as they were.
    mixed, y, _, _ = next(iter(_loader(data, **only).iter_with_params()))
    x0, labels, _, _ = next(iter(_loader(data, **{"aug.mixup": 0.0, "aug.cutmix": 0.0}).iter_with_params()))
    assert np.array_equal(_tiles(tmp_path / "p.png", 16), denormalize(mixed, MEAN, STD))  # the grid shows this batch
    assert info["mix"] == kind
    own_weight = (y - SMOOTHING / 4) / (1 - SMOOTHING)  # timm's targets: lam x own + (1 - lam) x partner, smoothed
    for i, text in enumerate(info["captions"]):
        m = MIXED.search(text)
        assert m, text
        shown_kind, lam, j, own, own_w, other, other_w = m.groups()
        lam, j, own = float(lam), int(j), int(own)
        assert shown_kind == kind and own == int(labels[i])  # the sample's own class is the starred one
        if other is None:  # both of the same class
            assert int(labels[j]) == own and own_w == "1.00"
        else:
            assert int(other) == int(labels[j]) and float(own_w) == lam and float(other_w) == pytest.approx(1 - lam)
            assert float(own_weight[i, own]) == pytest.approx(lam, abs=0.005)
            assert float(own_weight[i, int(other)]) == pytest.approx(1 - lam, abs=0.005)
        if kind == "mixup":  # the tile is lam of this sample and 1 - lam of sample #j
            blend = lam * x0[i] + (1 - lam) * x0[j]
            assert torch.allclose(mixed[i], blend, atol=0.005 * float((x0[i] - x0[j]).abs().max()) + 1e-4)
        else:  # every pixel is this sample's or #j's, and #j's box is there
            mine, theirs = (mixed[i] == x0[i]).all(0), (mixed[i] == x0[j]).all(0)
            assert (mine | theirs).all() and (theirs & ~mine).any()
    assert any(MIXED.search(t).group(6) is not None for t in info["captions"])  # some pair of other classes


def test_small_images_are_enlarged_so_that_their_captions_fit(data, tmp_path):
    info = make_preview(_loader(data, **{"data.batch_size": 8}), MEAN, STD, str(tmp_path / "p.png"))
    width, height = Image.open(tmp_path / "p.png").size
    tile = width // 8
    assert tile >= MIN_TILE and height >= MIN_TILE  # 32 px images, 4x
    widest = max(_FONT.getlength(line) for text in info["captions"] for line in text.split("\n"))
    assert widest <= tile - 2, info["captions"]


def test_an_unmixed_batch_says_so():
    from pipelines.mix import MixDraw
    from pipelines.preview import captions

    labels = torch.tensor([3, 5])
    none = MixDraw("none", 1.0, labels)
    assert captions(None, labels, (), none) == ["no mix\ny=3", "no mix\ny=5"]
    assert captions(None, labels) == ["y=3", "y=5"]

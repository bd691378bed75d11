"""Keyed crop boxes against torchvision's, the keys themselves, and the bicubic resampler against PIL."""

import math

import numpy as np
import pytest
import torch

from pipelines import crops, keys


def test_rrc_scale_and_aspect_statistics():
    """Accepted boxes: area fraction ~ U(0.08, 1), log aspect ~ U(log 3/4, log 4/3), as torchvision draws them."""
    h, w = 375, 500
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    box_keys = [np.uint64(keys.sample_key(7, i, 0)) for i in range(20000)]
    boxes = np.array([crops.rrc_box(h, w, 0.08, 1.0, lo, hi, k) for k in box_keys])
    area = boxes[:, 2] * boxes[:, 3] / (h * w)
    aspect = np.log(boxes[:, 3] / boxes[:, 2])
    assert area.min() >= 0.075 and area.max() <= 1.0
    assert aspect.min() >= lo - 0.02 and aspect.max() <= hi + 0.02
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= h).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= w).all()
    # Compare with torchvision's sampler on the same image size.
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    img = torch.zeros(3, h, w)
    ref = np.array([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(20000)])
    ref_area = ref[:, 2] * ref[:, 3] / (h * w)
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(np.quantile(area, q) - np.quantile(ref_area, q)) < 0.02, q
    assert abs(aspect.mean() - np.log(ref[:, 3] / ref[:, 2]).mean()) < 0.01


def test_keys_are_deterministic_and_distinct():
    k = keys.epoch_key(0, 0, 0)
    assert k == keys.epoch_key(0, 0, 0) and k != keys.epoch_key(0, 0, 1) and k != keys.epoch_key(0, 1, 0)
    assert keys.sample_key(k, 5, 0) != keys.sample_key(k, 5, 1)
    u = np.array([keys.uniform(np.uint64(keys.sample_key(k, i, 0)), 0) for i in range(20000)])
    assert abs(u.mean() - 0.5) < 0.01 and u.min() >= 0 and u.max() < 1


def test_src_box_covers_the_crop_and_pads_at_most_4():
    for i in range(2000):
        h, w = [(375, 500), (500, 375), (224, 224), (100, 300)][i % 4]
        y0, x0, y1, x1, oi, oj, oh, ow = crops.src_box(h, w, 224, 4, np.uint64(keys.sample_key(1, i, 0)))
        assert 0 <= y0 < y1 <= h + 1e-9 and 0 <= x0 < x1 <= w + 1e-9
        assert 0 <= oi <= 4 and 0 <= oj <= 4 and oi + oh >= 220 and oj + ow >= 220
        assert oi + oh <= 224 and oj + ow <= 224
        # The box is the preimage of the in-image part: same scale as resizing the shorter side to 224.
        assert abs((y1 - y0) / oh - (x1 - x0) / ow) < 0.02 * max(h, w) / 224


def test_center_box_is_torchvision_resize_then_centre_crop():
    for h, w, ratio in [(375, 500, 1.0), (500, 375, 0.875), (256, 256, 0.875), (179, 256, 1.0)]:
        y0, x0, y1, x1 = crops.center_box(h, w, 224, ratio)
        s = int(224 / ratio)
        rh, rw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        top, left = int(round((rh - 224) / 2)), int(round((rw - 224) / 2))
        assert np.allclose([y0, x0, y1, x1], [top * h / rh, left * w / rw, (top + 224) * h / rh, (left + 224) * w / rw])


@pytest.mark.slow
def test_resize_box_matches_pil_bicubic():
    from PIL import Image

    from pipelines.resample import resize_box

    rng = np.random.default_rng(0)
    src = np.array(Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).resize((200, 150)))
    for box, size in [((0, 0, 150, 200), (64, 64)), ((10, 20, 60, 70), (96, 80)), ((5.3, 7.7, 140.2, 190.9), (48, 48))]:
        out = np.zeros((*size, 3), np.uint8)
        resize_box(src, *box, out)
        y0, x0, y1, x1 = box
        ref = np.asarray(Image.fromarray(src).resize(size[::-1], Image.BICUBIC, box=(x0, y0, x1, y1)))
        d = np.abs(out.astype(int) - ref.astype(int))
        assert d.max() <= 1, box  # Pillow uses fixed-point weights, we use float32


def test_reflect_fill_mirrors_like_torchvision():
    block = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    out = np.zeros((8, 9, 3), np.uint8)
    out[2:7, 1:7] = block
    crops.reflect_fill(out, 2, 1, 5, 6)
    ref = np.pad(block, ((2, 1), (1, 2), (0, 0)), mode="reflect")  # torchvision's padding_mode='reflect'
    np.testing.assert_array_equal(out, ref)


def test_epoch_keys_exist_for_every_seed_and_rank():
    """numba hands a uint64 back as a plain int; one above 2**63 passed back in overflowed, so most (seed, rank)
    pairs other than seed 0 on ranks 0-2 crashed every engine at its first batch."""
    from pipelines import keys

    seen = set()
    for seed in (0, 1, 5, 2**40, 2**64 - 1):
        for rank in range(8):
            for epoch in (0, 1, 799):
                k = keys.epoch_key(seed, rank, epoch)
                assert isinstance(k, np.uint64)
                seen.add(int(k))
                keys.sample_key(k, 3, 1)  # and it goes back into numba
    assert len(seen) == 5 * 8 * 3

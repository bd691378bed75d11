"""Sampler against the official RASampler / torch DistributedSampler; mixing against timm semantics; crop statistics."""
import math

import numpy as np
import pytest
import torch
from timm.data.mixup import cutmix_bbox_and_lam
from torch.utils.data import DistributedSampler

from pipelines import crops, keys
from pipelines.config import AugConfig
from pipelines.mix import Mixing
from pipelines.sampler import EpochOrder


def official_ra_sampler(n, num_replicas, rank, epoch, num_repeats=3, shuffle=True):
    """facebookresearch/deit samplers.py RASampler.__iter__, verbatim apart from the class around it."""
    num_samples = int(math.ceil(n * num_repeats / num_replicas))
    total_size = num_samples * num_replicas
    num_selected_samples = int(math.floor(n // 256 * 256 / num_replicas))
    g = torch.Generator()
    g.manual_seed(epoch)
    indices = torch.randperm(n, generator=g) if shuffle else torch.arange(start=0, end=n)
    indices = torch.repeat_interleave(indices, repeats=num_repeats, dim=0).tolist()
    padding_size = total_size - len(indices)
    if padding_size > 0:
        indices += indices[:padding_size]
    indices = indices[rank:total_size:num_replicas]
    return indices[:num_selected_samples]


@pytest.mark.parametrize("n, world", [(1000, 1), (1000, 2), (1300, 3), (2048, 8), (777, 4)])
def test_repeated_augmentation_equals_official_sampler(n, world):
    for epoch in (0, 1, 7):
        for rank in range(world):
            ours = EpochOrder(n, train=True, repeats=3, rank=rank, world=world, seed=0).indices(epoch)
            assert ours.tolist() == official_ra_sampler(n, world, rank, epoch)


def test_repeats_spread_over_ranks_and_cover_a_third():
    n, world = 3072, 4
    shards = [EpochOrder(n, train=True, repeats=3, rank=r, world=world).indices(0) for r in range(world)]
    assert all(len(s) == n // world for s in shards)  # epoch truncated to len // 256 * 256 samples in total
    counts = np.bincount(np.concatenate(shards), minlength=n)
    assert 0.3 < (counts > 0).mean() < 0.37  # about a third of the images...
    assert set(np.unique(counts)) <= {0, 1, 2, 3}  # ...each seen up to 3 times
    # The copies of one image go to different ranks (round-robin dealing of consecutive repeats).
    first = [set(s[:50].tolist()) for s in shards]
    assert first[0] & first[1] and not any(len(set(s[:3])) < 3 for s in shards)


@pytest.mark.parametrize("n, world", [(100, 1), (101, 2), (1000, 3)])
def test_without_repeats_equals_distributed_sampler(n, world):
    for rank in range(world):
        ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=5)
        ref.set_epoch(3)
        ours = EpochOrder(n, train=True, repeats=1, rank=rank, world=world, seed=5).indices(3)
        assert ours.tolist() == list(ref)


@pytest.mark.parametrize("n, world", [(10, 1), (10, 3), (1001, 4)])
def test_eval_shards_are_disjoint_and_exact(n, world):
    shards = [EpochOrder(n, train=False, rank=r, world=world).indices(0) for r in range(world)]
    merged = np.concatenate(shards)
    assert len(merged) == n and sorted(merged.tolist()) == list(range(n))


def test_epochs_differ_and_repeat():
    o = EpochOrder(500, train=True, repeats=1, seed=1)
    assert o.indices(0).tolist() != o.indices(1).tolist()
    assert o.indices(4).tolist() == o.indices(4).tolist()
    assert sorted(o.indices(2).tolist()) == list(range(500))


def test_repeats_refuse_tiny_data_sets():
    with pytest.raises(ValueError, match="data.repeats"):
        EpochOrder(100, train=True, repeats=3)


# ---- mixing ---------------------------------------------------------------------------------------------------------

def _mixing(mixup, cutmix, smoothing=0.0, num_classes=10):
    aug = AugConfig(mixup=mixup, cutmix=cutmix, mix_prob=1.0, mix_switch_prob=0.5, label_smoothing=smoothing)
    return Mixing(aug, num_classes)


def _lam_for(seed_rng_state, alpha):
    """The lambda timm will draw for this batch: replay our per-batch seed into numpy."""
    rng = np.random.default_rng(seed_rng_state)
    np.random.seed(int(rng.integers(2**32)))
    np.random.rand()  # mix_prob draw
    return np.random.beta(alpha, alpha)


def test_mixup_matches_reference_formula():
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    lam = _lam_for(11, 0.8)
    out, t = _mixing(0.8, 0.0)(x.clone(), labels, np.random.default_rng(11))
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.flip(0))
    one = torch.nn.functional.one_hot(labels, 10).double()
    torch.testing.assert_close(t.double(), lam * one + (1 - lam) * one.flip(0))


def test_cutmix_matches_timm_box_and_corrected_lambda():
    x = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([1, 2, 3, 4])
    rng_seed = 3
    lam = _lam_for(rng_seed, 1.0)
    (yl, yh, xl, xh), lam_c = cutmix_bbox_and_lam(x.shape, lam)  # continues numpy's stream like timm does
    out, t = _mixing(0.0, 1.0)(x.clone(), labels, np.random.default_rng(rng_seed))
    ref = x.clone()
    ref[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
    torch.testing.assert_close(out, ref)
    assert abs(lam_c - (1 - (yh - yl) * (xh - xl) / 1024)) < 1e-12
    one = torch.nn.functional.one_hot(labels, 10).float()
    torch.testing.assert_close(t, lam_c * one + (1 - lam_c) * one.flip(0))


def test_bce_targets_are_the_mixed_targets_binarised_and_numpy_state_untouched():
    """Mixing makes timm's soft targets and leaves numpy's global state as it was; the BCE loss binarises them
    (`> 0`, as the official engine): a mixed sample has its own class and its partner's. Unmixed: class indices."""
    from deit3_fast.losses import bce_targets

    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    x = torch.randn(8, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    _, t = _mixing(0.8, 1.0)(x, labels, np.random.default_rng(0))
    assert torch.allclose(t.sum(1), torch.ones(8)) and ((t > 0).sum(1) == 2).all()
    b = bce_targets(t, 10)
    assert set(b.unique().tolist()) <= {0.0, 1.0} and (b.sum(1) == 2).all()
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    _, idx = _mixing(0.0, 0.0)(x, labels, np.random.default_rng(0))
    assert torch.equal(idx, labels)
    torch.testing.assert_close(bce_targets(idx, 10), torch.nn.functional.one_hot(labels, 10).float())
    with pytest.raises(ValueError, match="even batch"):
        _mixing(0.8, 1.0)(x[:3], labels[:3], np.random.default_rng(0))


# ---- crops ----------------------------------------------------------------------------------------------------------

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
    for (h, w, ratio) in [(375, 500, 1.0), (500, 375, 0.875), (256, 256, 0.875), (179, 256, 1.0)]:
        y0, x0, y1, x1 = crops.center_box(h, w, 224, ratio)
        s = int(224 / ratio)
        rh, rw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        top, left = int(round((rh - 224) / 2)), int(round((rw - 224) / 2))
        assert np.allclose([y0, x0, y1, x1], [top * h / rh, left * w / rw, (top + 224) * h / rh, (left + 224) * w / rw])


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

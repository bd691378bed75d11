"""The random draws a run really makes, with its defaults, against the distributions of the official recipe.

Each test draws through the component a run uses (BatchAugment with `AugConfig()`, `Mixing`, the loader's
per-batch keys, `crops.py`) with fixed seeds, so a changed default, range or wiring shows up as a wrong rate
or a wrong distribution. Kolmogorov-Smirnov distances are compared with the 99.9% critical value
1.95 / sqrt(n) (two-sample: 1.95 * sqrt(2 / n)); rates with at least 5 standard deviations of slack.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from pipelines import crops, keys
from pipelines.augment import BRANCHES, BatchAugment
from pipelines.config import AugConfig
from pipelines.loader import Loader
from pipelines.mix import Mixing

N = 40_000


def ks_uniform(x, lo, hi) -> float:
    """Largest distance between the sample's CDF and U(lo, hi)'s."""
    x = np.sort((np.asarray(x, np.float64) - lo) / (hi - lo))
    n = len(x)
    return max(np.max(np.arange(1, n + 1) / n - x), np.max(x - np.arange(n) / n))


def ks_two_sample(a, b) -> float:
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    cdf_a, cdf_b = np.searchsorted(a, grid, "right") / len(a), np.searchsorted(b, grid, "right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def rate_ok(observed: float, p: float, n: int) -> bool:
    return abs(observed - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-9


@pytest.fixture(scope="module")
def stage_params():
    """BatchAugment's parameters for N samples, drawn by BatchAugment itself with the default AugConfig, flattened
    (flip, branch, sigma, jitter factors and order)."""
    augment = BatchAugment(AugConfig(), train=True)
    images = torch.randint(0, 256, (N, 2, 2, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    _, p = augment(images, 0)
    return _flat(p)


def _flat(p):
    return SimpleNamespace(
        flip=p["flip"].flip,
        branch=p["three_augment"].branch,
        sigma=p["three_augment"].sigma,
        jitter=p["color_jitter"].factors,
        jitter_order=p["color_jitter"].order,
    )


def test_flip_rate_is_one_half(stage_params):
    assert rate_ok(stage_params.flip.float().mean().item(), 0.5, N)


def test_three_augment_branches_are_one_third_each(stage_params):
    freq = torch.bincount(stage_params.branch, minlength=3).float() / N
    assert len(BRANCHES) == 3 and all(rate_ok(f, 1 / 3, N) for f in freq.tolist()), freq


def test_jitter_factors_are_uniform_on_0_7_1_3_in_a_uniform_order(stage_params):
    for k in range(3):  # brightness, contrast, saturation: the whole range, not a narrower one
        assert ks_uniform(stage_params.jitter[:, k].numpy(), 0.7, 1.3) < 1.95 / math.sqrt(N), k
    perms = {}
    for order in stage_params.jitter_order.tolist():
        perms[tuple(order)] = perms.get(tuple(order), 0) + 1
    assert len(perms) == 6 and all(rate_ok(c / N, 1 / 6, N) for c in perms.values()), perms


def test_blur_sigma_is_uniform_on_0_1_2_0_and_independent_of_the_branch(stage_params):
    sigma = stage_params.sigma.numpy()
    assert ks_uniform(sigma, 0.1, 2.0) < 1.95 / math.sqrt(N)
    blurred = sigma[stage_params.branch.numpy() == 2]
    assert ks_uniform(blurred, 0.1, 2.0) < 1.95 / math.sqrt(len(blurred))  # not a function of the branch draw
    flips = sigma[stage_params.flip.numpy()]
    assert ks_uniform(flips, 0.1, 2.0) < 1.95 / math.sqrt(len(flips))


def test_the_batches_of_an_epoch_draw_differently():
    """Per-batch streams are keyed by the batch index: two batches of one epoch get other flips, branches,
    jitter and mixing; the same batch of another epoch too; the same batch again, the same draws."""
    augment = BatchAugment(AugConfig(), train=True)
    loader = Loader(None, augment, Mixing(AugConfig(), 10), device=torch.device("cpu"), seed=0, rank=0)
    images = torch.full((64, 8, 8, 3), 128, dtype=torch.uint8)
    labels = torch.arange(64) % 10

    def draw(epoch, b):
        loader.epoch = epoch
        x, y, p, _ = loader.prepare(b, images, labels)
        return x, y, _flat(p)

    (_, y0, p0), (x1, y1, p1), (_, y0b, p0b) = draw(0, 0), draw(0, 1), draw(1, 0)
    assert not torch.equal(p0.flip, p1.flip) and not torch.equal(p0.branch, p1.branch)
    assert not torch.equal(p0.jitter, p1.jitter) and not torch.equal(y0, y1)
    assert not torch.equal(p0.flip, p0b.flip) and not torch.equal(y0, y0b)
    xa, ya, pa = draw(0, 1)
    assert torch.equal(pa.jitter, p1.jitter) and torch.equal(ya, y1) and torch.equal(xa, x1)


# ---- mixup / cutmix ---------------------------------------------------------------------------------------------


def _mixed_batches(n: int, aug: AugConfig):
    """(kind, lambda) of `n` batches mixed by `Mixing` with its per-batch numpy generators. Image 0 is all zeros
    and its partner (the batch reversed) all ones: mixup makes it the constant 1 - lambda, cutmix pastes a box of
    ones; the soft target's weight on image 0's class is lambda (after cutmix's box correction)."""
    mixing = Mixing(aug, 4)
    x = torch.cat([torch.zeros(1, 1, 64, 64), torch.ones(1, 1, 64, 64)])
    labels = torch.tensor([0, 1])
    out = []
    for b in range(n):
        mixed, targets = mixing(x.clone(), labels, np.random.default_rng([7, b]))
        first = mixed[0]
        lam = (targets[0, 0].item() - aug.label_smoothing / 4) / (1 - aug.label_smoothing)
        if torch.all(first == first.flatten()[0]) and 0 < first.flatten()[0] < 1:
            out.append(("mixup", lam))
        elif torch.all((first == 0) | (first == 1)):
            out.append(("cutmix" if lam < 1 else "none", lam))
        else:
            raise AssertionError("neither mixup nor cutmix")
    return out


def test_every_batch_is_mixed_half_by_mixup_half_by_cutmix():
    draws = _mixed_batches(4000, AugConfig())
    kinds = [k for k, _ in draws]
    # mix_prob 1: every batch. (A cutmix box rounds to nothing when lambda > 1 - 1/64^2: ~0.02% of cutmix draws.)
    assert kinds.count("none") <= 4
    assert rate_ok((kinds.count("cutmix") + kinds.count("none")) / len(kinds), 0.5, len(kinds))


@pytest.mark.slow
def test_mixup_lambda_is_beta_0_8_and_cutmix_lambda_is_the_box_corrected_uniform():
    draws = _mixed_batches(4000, AugConfig())
    rng = np.random.default_rng(0)
    mix = np.array([lam for k, lam in draws if k == "mixup"])
    assert ks_two_sample(mix, rng.beta(0.8, 0.8, 200_000)) < 1.95 * math.sqrt(1 / len(mix) + 1 / 200_000)
    cut = np.array([lam for k, lam in draws if k == "cutmix"])
    # timm's cutmix: lambda ~ Beta(1, 1), a box of area (1 - lambda) clipped at the border, lambda corrected to
    # the box actually pasted: sampled here the same way on the same 64 x 64 image.
    from timm.data.mixup import cutmix_bbox_and_lam

    np.random.seed(0)
    ref = np.array([cutmix_bbox_and_lam((2, 1, 64, 64), np.random.beta(1.0, 1.0))[1] for _ in range(20_000)])
    assert ks_two_sample(cut, ref) < 1.95 * math.sqrt(1 / len(cut) + 1 / len(ref))


def test_mixed_targets_keep_label_smoothing():
    """Fine-tuning: smoothing 0.1 inside the mixed soft targets, as timm's Mixup(label_smoothing=...) makes them."""
    aug = AugConfig(label_smoothing=0.1)
    mixing = Mixing(aug, 10)
    _, targets = mixing(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), np.random.default_rng(0))
    assert torch.allclose(targets.sum(1), torch.ones(4))
    assert targets.min().item() == pytest.approx(0.1 / 10) and targets.max().item() < 1 - 0.1 + 0.1 / 10 + 1e-6


# ---- primary crops ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h, w", [(1000, 100), (100, 1000), (1000, 30), (375, 500)])
def test_rrc_boxes_match_torchvision_on_extreme_aspect_ratios(h, w):
    """Where most of the 10 tries fail (tall and wide images), the fallback (the largest centred crop within the
    ratio range) is a large share of the boxes: its rate and its box, and the accepted boxes' statistics, equal
    torchvision's RandomResizedCrop.get_params."""
    n = 8000
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    ours = np.array([crops.rrc_box(h, w, 0.08, 1.0, lo, hi, np.uint64(keys.sample_key(3, i, 0))) for i in range(n)])
    torch.manual_seed(0)
    img = torch.zeros(1, h, w)
    ref = np.array([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    # torchvision's fallback box for this size (deterministic): what every box is when all 10 tries fail.
    in_ratio = w / h
    if in_ratio < 3 / 4:
        fw, fh = w, int(round(w / (3 / 4)))
    elif in_ratio > 4 / 3:
        fh, fw = h, int(round(h * (4 / 3)))
    else:
        fw, fh = w, h
    fallback = np.array([(h - fh) // 2, (w - fw) // 2, fh, fw])
    our_rate, ref_rate = (ours == fallback).all(1).mean(), (ref == fallback).all(1).mean()
    assert abs(our_rate - ref_rate) < 5 * math.sqrt(max(ref_rate * (1 - ref_rate), 1e-4) / n) + 0.005
    for k in range(4):  # top, left, height, width
        assert ks_two_sample(ours[:, k], ref[:, k]) < 1.95 * math.sqrt(2 / n) + 0.01, k


def test_src_offsets_cover_their_whole_range_on_both_axes():
    """Simple Random Crop: RandomCrop(size, padding=4, reflect) of the resized image: the offset is uniform over
    all rh + 2 pad - size + 1 rows and rw + 2 pad - size + 1 columns."""
    h, w, size, pad = 300, 240, 224, 4  # resized: 280 x 224
    rows, cols = 280 + 2 * pad - size + 1, 224 + 2 * pad - size + 1
    ys, xs = [], []
    for i in range(20_000):
        y0, x0, y1, x1, oi, oj, oh, ow = crops.src_box(h, w, size, pad, np.uint64(keys.sample_key(5, i, 0)))
        # Back to the offset in the padded resized image: rows above the image are padding (oi), else the crop
        # starts y0 * 280 / 300 rows into it.
        ys.append(round(y0 * 280 / h) - oi + pad)
        xs.append(round(x0 * 224 / w) - oj + pad)
    for got, n_values in ((np.array(ys), rows), (np.array(xs), cols)):
        assert got.min() == 0 and got.max() == n_values - 1
        counts = np.bincount(got, minlength=n_values)
        expected = len(got) / n_values
        assert np.abs(counts - expected).max() < 5 * math.sqrt(expected), counts


def test_rrc_offsets_are_uniform_over_every_row_and_column_torchvision_allows():
    """Given a box of h x w in an image of H x W, torchvision draws the top offset uniformly from the H - h + 1 rows
    0..H - h (randint(0, H - h + 1)), the left from the W - w + 1 columns: the last row and column included. A
    chi-square of the offsets, grouped by their range, against that uniform law, for our boxes and (as a check of the
    test itself) torchvision's. A small image gives small ranges, where a lost last row is a large share."""
    h_img, w_img, n = 9, 12, 30_000
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    ours = np.array(
        [crops.rrc_box(h_img, w_img, 0.08, 1.0, lo, hi, np.uint64(keys.sample_key(11, i, 0))) for i in range(n)]
    )
    torch.manual_seed(0)
    img = torch.zeros(1, h_img, w_img)
    ref = np.array([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])

    def chi2_excess(boxes) -> float:
        """Summed chi-square over (axis, range) groups minus its degrees of freedom, in standard deviations."""
        stat, dof = 0.0, 0
        for offset, extent, size in ((boxes[:, 0], boxes[:, 2], h_img), (boxes[:, 1], boxes[:, 3], w_img)):
            for span in np.unique(size - extent):
                got = offset[size - extent == span]
                if span == 0 or len(got) < 20 * (span + 1):  # too few for a chi-square cell of >= 20 expected
                    continue
                assert got.min() >= 0 and got.max() <= span
                counts = np.bincount(got, minlength=span + 1)
                expected = len(got) / (span + 1)
                stat += float(((counts - expected) ** 2 / expected).sum())
                dof += int(span)
        return (stat - dof) / math.sqrt(2 * dof)

    assert chi2_excess(ref) < 5
    assert chi2_excess(ours) < 5

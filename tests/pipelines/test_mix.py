"""Mixup / CutMix against timm's semantics: one lambda per batch, the reversed partner, soft targets."""

import numpy as np
import pytest
import torch
from timm.data.mixup import cutmix_bbox_and_lam

from pipelines.config import AugConfig
from pipelines.mix import Mixing


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


def test_mixed_targets_are_soft_and_numpy_state_untouched():
    """Mixing makes timm's soft targets (a mixed sample weighs its own class and its partner's) and leaves numpy's
    global state as it was; unmixed batches keep their class indices."""
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    x = torch.randn(8, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    _, t = _mixing(0.8, 1.0)(x, labels, np.random.default_rng(0))
    assert torch.allclose(t.sum(1), torch.ones(8)) and ((t > 0).sum(1) == 2).all()
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    _, idx = _mixing(0.0, 0.0)(x, labels, np.random.default_rng(0))
    assert torch.equal(idx, labels)
    with pytest.raises(ValueError, match="even batch"):
        _mixing(0.8, 1.0)(x[:3], labels[:3], np.random.default_rng(0))


def test_the_draw_reports_what_was_applied():
    """`Mixing.mix` reports timm's own draw: the kind, the lambda (cutmix: box-corrected), the reversed partner, the
    classes before mixing; a batch that mix_prob leaves alone is 'none'."""
    x = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([1, 2, 3, 4])
    out, _, draw = _mixing(0.8, 0.0).mix(x.clone(), labels, np.random.default_rng(11))
    assert (draw.kind, draw.lam) == ("mixup", pytest.approx(_lam_for(11, 0.8)))
    assert torch.equal(draw.partner, torch.tensor([3, 2, 1, 0])) and torch.equal(draw.labels, labels)
    torch.testing.assert_close(out, draw.lam * x + (1 - draw.lam) * x[draw.partner])
    lam = _lam_for(3, 1.0)
    _, lam_c = cutmix_bbox_and_lam(x.shape, lam)
    _, t, draw = _mixing(0.0, 1.0).mix(x.clone(), labels, np.random.default_rng(3))
    assert (draw.kind, draw.lam) == ("cutmix", pytest.approx(lam_c)) and lam_c != pytest.approx(lam, abs=1e-3)
    one = torch.nn.functional.one_hot(labels, 10).float()
    torch.testing.assert_close(t, draw.lam * one + (1 - draw.lam) * one[draw.partner])
    aug = AugConfig(mixup=0.8, cutmix=1.0, mix_prob=1e-9)
    out, _, draw = Mixing(aug, 10).mix(x.clone(), labels, np.random.default_rng(0))
    assert (draw.kind, draw.lam) == ("none", 1.0) and torch.equal(out, x)
    assert _mixing(0.0, 0.0).mix(x, labels, np.random.default_rng(0))[2] is None

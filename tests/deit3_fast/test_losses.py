"""The recipe's losses against their definitions; BCE binarises the soft mixed targets as the official code."""

import pytest
import torch
import torch.nn.functional as F

from deit3_fast.losses import RecipeLoss, bce_targets


def test_bce_on_binarised_targets_is_mean_over_batch_and_classes():
    logits = torch.randn(4, 6, dtype=torch.float64)
    targets = torch.zeros(4, 6, dtype=torch.float64)
    targets[torch.arange(4), torch.tensor([0, 1, 2, 3])] = 1
    targets[torch.arange(4), torch.tensor([3, 2, 1, 0])] = 1
    ref = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits)).mean()
    torch.testing.assert_close(RecipeLoss("bce")(logits, targets).double(), ref, rtol=1e-6, atol=1e-7)
    idx = torch.tensor([1, 2, 3, 4])
    torch.testing.assert_close(RecipeLoss("bce")(logits, idx), RecipeLoss("bce")(logits, F.one_hot(idx, 6).double()))


def test_ce_variants():
    logits = torch.randn(5, 10)
    idx = torch.randint(0, 10, (5,))
    torch.testing.assert_close(RecipeLoss("ce")(logits, idx), F.cross_entropy(logits, idx))
    torch.testing.assert_close(RecipeLoss("ce", 0.1)(logits, idx), F.cross_entropy(logits, idx, label_smoothing=0.1))
    soft = torch.softmax(torch.randn(5, 10), -1)
    torch.testing.assert_close(RecipeLoss("ce", 0.1)(logits, soft), -(soft * F.log_softmax(logits, -1)).sum(-1).mean())
    with pytest.raises(ValueError):
        RecipeLoss("mse")


def test_bce_targets_binarise_the_mixed_targets_as_the_official_engine():
    """`targets > 0`: a mixed sample has two positive classes whatever lambda; class indices are one-hot."""
    soft = torch.zeros(3, 5)
    soft[0, 1] = 1.0
    soft[1, [2, 4]] = torch.tensor([0.7, 0.3])
    soft[2, [0, 3]] = torch.tensor([0.999, 0.001])
    assert bce_targets(soft, 5).tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 0, 1], [1, 0, 0, 1, 0]]
    assert bce_targets(torch.tensor([4, 0]), 5).tolist() == [[0, 0, 0, 0, 1], [1, 0, 0, 0, 0]]
    logits = torch.randn(3, 5)
    torch.testing.assert_close(
        RecipeLoss("bce")(logits, soft), F.binary_cross_entropy_with_logits(logits, bce_targets(soft, 5))
    )

"""The sampler against the official RASampler and torch's DistributedSampler."""

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

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

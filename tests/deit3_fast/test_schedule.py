"""The schedule against timm's CosineLRScheduler at epoch boundaries."""

import math

import pytest
import torch
from timm.scheduler import CosineLRScheduler

from deit3_fast.schedule import ResolutionConfig, ScheduleConfig, WarmupCosine, lr_at


@pytest.mark.parametrize("epochs, warmup", [(800, 5), (30, 5), (20, 5), (3, 1)])
def test_per_step_schedule_equals_timm_at_epoch_boundaries(epochs, warmup):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    ref = CosineLRScheduler(
        opt, t_initial=epochs, lr_min=1e-5, warmup_lr_init=1e-6, warmup_t=warmup, cycle_limit=1, t_in_epochs=True
    )
    for e in range(epochs):
        ours = lr_at(e, lr=3e-3, epochs=epochs, warmup_epochs=warmup, warmup_lr=1e-6, min_lr=1e-5)
        assert math.isclose(ours, ref._get_lr(e)[0], rel_tol=1e-12), e
    assert lr_at(epochs, lr=3e-3, epochs=epochs, warmup_epochs=warmup, warmup_lr=1e-6, min_lr=1e-5) == 1e-5


def test_scheduler_sets_every_group_and_is_smooth():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))]}, {"params": [torch.nn.Parameter(torch.zeros(1))]}]
    opt = torch.optim.SGD(groups, lr=1.0)
    sched = WarmupCosine(opt, steps_per_epoch=10, lr=4e-3, epochs=20, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5)
    values = [sched(s) for s in range(200)]
    assert values[0] == 1e-6 and all(g["lr"] == values[-1] for g in opt.param_groups)
    # timm's cosine is not shifted by the warm-up (warmup_prefix=False): after warm-up it resumes at
    # cos(pi * 5 / 20), a visible step down on a 20-epoch budget, negligible on 800 epochs (cos(pi * 5 / 800)).
    assert values.index(max(values)) == 49 and values[50] == pytest.approx(
        lr_at(5, lr=4e-3, epochs=20, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5)
    )
    steps = [abs(b - a) for a, b in zip(values, values[1:])]
    del steps[49]
    assert max(steps) < 1e-4  # per-step values, no epoch-long stairs


def test_the_schedule_section_builds_with_every_value_it_holds():
    """ScheduleConfig.build (what the run's scheduler is made by) passes every key on, and optim.lr as the peak."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = ScheduleConfig(epochs=30, warmup_epochs=3, warmup_lr=2e-6, min_lr=3e-5)
    sched = s.build(opt, 7, lr=5e-3)
    assert sched.steps_per_epoch == 7
    for step in (0, 10, 21, 100, 210):
        assert sched(step) == lr_at(step / 7, lr=5e-3, epochs=30, warmup_epochs=3, warmup_lr=2e-6, min_lr=3e-5)
    r = ResolutionConfig(start=16, end=32, start_epoch=1, end_epoch=3, step=8)
    assert r.build(img_size=64, epochs=5) == [16, 16, 24, 32, 32] and ResolutionConfig().build(64, 5) is None

"""Progressive resolution (schedule.resolution): the epoch's crop size, the ViT at each grid, eval at the final
size, exact resume, the config's checks and the CIFAR ablation."""

import pytest
import torch

from deit3_fast import trainer
from deit3_fast.config import ConfigError, load_config
from deit3_fast.losses import RecipeLoss
from deit3_fast.schedule import resolution_at, resolution_schedule
from deit3_fast.trainer import train

from .test_train import assert_same_as_uninterrupted, sigterm_at_loss, tiny_cfg

RAMP = {"schedule.resolution": "{start: 16, start_epoch: 0, end_epoch: 2, step: 8}"}  # 16, 24, then 32 = img_size
# The same ramp with 16 per process at 16 px (no accumulation) and 4 at 24 px (4 micro-batches a step); 32 px keeps
# data.batch_size 8 (2 micro-batches): 16 images a step throughout.
RAMP_BATCHES = {
    "schedule.resolution": "{start: 16, start_epoch: 0, end_epoch: 2, step: 8, batch_sizes: {16: 16, 24: 4}}"
}


def test_resolution_is_linear_in_the_epoch_and_rounded_to_the_step():
    kw = dict(start=128, end=224, start_epoch=10, end_epoch=20, step=32)
    assert [resolution_at(e, **kw) for e in (0, 10, 11, 15, 19, 20, 99)] == [128, 128, 128, 192, 224, 224, 224]
    r = load_config("cifar10_progressive").schedule.resolution
    sizes = resolution_schedule(r, 32, 100)
    assert {s: sizes.count(s) for s in set(sizes)} == {16: 48, 24: 25, 32: 27}
    assert resolution_schedule(load_config("cifar10_deit3").schedule.resolution, 32, 100) is None


@pytest.mark.slow
def test_a_ramped_run_trains_at_each_size_and_evaluates_at_the_final_one(data, tmp_path, monkeypatch):
    seen = []
    real = RecipeLoss.__call__

    def loss(self, logits, y):
        seen.append(("train", current[0]))
        return real(self, logits, y)

    current = [None]
    forward = trainer.evaluate

    def evaluate(model, loader, *a, **kw):
        x, _ = next(iter(loader))
        seen.append(("eval", x.shape[-1]))
        return forward(model, loader, *a, **kw)

    monkeypatch.setattr(RecipeLoss, "__call__", loss)
    monkeypatch.setattr(trainer, "evaluate", evaluate)
    real_micro = trainer.train_micro_batch

    def micro(run, x, y, step, last, accum):
        current[0] = x.shape[-1]
        return real_micro(run, x, y, step, last, accum)

    monkeypatch.setattr(trainer, "train_micro_batch", micro)
    rows = train(tiny_cfg(data, **RAMP), tmp_path, torch.device("cpu"), quiet=True)
    assert [r["train_img_size"] for r in rows] == [16, 24, 32]
    trained = [s for kind, s in seen if kind == "train"]
    assert trained == [16] * 6 + [24] * 6 + [32] * 6  # 6 micro-batches per epoch
    assert [s for kind, s in seen if kind == "eval"] == [32, 32, 32] and all(r["val_acc1"] is not None for r in rows)


@pytest.mark.slow
def test_a_ramped_run_resumes_exactly(data, tmp_path):
    """Stopped after the 16 px epoch and resumed: the 24 and 32 px epochs are those of an uninterrupted run."""
    cpu = torch.device("cpu")
    full = train(tiny_cfg(data, **RAMP), tmp_path / "full", cpu, quiet=True)
    train(tiny_cfg(data, **RAMP), tmp_path / "split", cpu, quiet=True, stop_after_epoch=0)
    rest = train(tiny_cfg(data, **RAMP), tmp_path / "split", cpu, quiet=True, resume="auto")
    assert [r["train_img_size"] for r in rest] == [24, 32]
    assert_same_as_uninterrupted(tmp_path / "full", full, tmp_path / "split")


@pytest.mark.slow
def test_a_batch_per_size_keeps_the_global_batch_and_the_schedule(data, tmp_path, monkeypatch):
    """schedule.resolution.batch_sizes: each epoch's micro-batches have its size's batch and accumulation, every
    step sees 16 images, and the optimiser steps and learning rates are those of the fixed-batch ramp."""
    import json

    seen = []
    real_micro = trainer.train_micro_batch

    def micro(run, x, y, step, last, accum):
        seen.append((x.shape[-1], len(x), accum))
        return real_micro(run, x, y, step, last, accum)

    monkeypatch.setattr(trainer, "train_micro_batch", micro)
    rows = train(tiny_cfg(data, **RAMP_BATCHES), tmp_path / "b", torch.device("cpu"), quiet=True)
    assert [(r["train_img_size"], r["per_process_batch"]) for r in rows] == [(16, 16), (24, 4), (32, 8)]
    assert seen == [(16, 16, 1)] * 3 + [(24, 4, 4)] * 12 + [(32, 8, 2)] * 6
    fixed = train(tiny_cfg(data, **RAMP), tmp_path / "fixed", torch.device("cpu"), quiet=True)
    assert [r["lr"] for r in rows] == [r["lr"] for r in fixed]
    by_size = json.loads((tmp_path / "b" / "run.json").read_text())["batch_by_size"]
    assert {k: (v["per_process_batch"], v["accumulation_steps"]) for k, v in by_size.items()} == {
        "16": (16, 1),
        "24": (4, 4),
    }


def test_a_batch_per_size_must_split_the_global_batch():
    from deit3_fast.batching import batch_plans

    cfg = load_config(
        "quickstart",
        ["schedule.resolution={start: 16, start_epoch: 0, end_epoch: 2, step: 8, batch_sizes: {16: 12, 24: 64}}"],
    )  # global batch 32
    fix = r"batch_sizes.16 12 x world size 1: use --set schedule.resolution.batch_sizes.16=8 \(4 accumulation"
    with pytest.raises(ConfigError, match=fix):
        batch_plans(cfg, 1)
    # Dotted --set keys and JSON (an ablation grid's axes) give the size as text.
    cfg = load_config(
        "quickstart",
        [
            'schedule.resolution={start: 16, start_epoch: 0, end_epoch: 2, step: 8, batch_sizes: {"24": 64}}',
            "schedule.resolution.batch_sizes.16=16",
        ],
    )
    assert cfg.schedule.resolution.batch_sizes == {16: 16, 24: 64}
    plans = batch_plans(cfg, 2)
    assert (plans[16].per_process, plans[16].accum) == (16, 1) and (plans[24].per_process, plans[24].accum) == (16, 1)


@pytest.mark.slow
def test_micro_batches_average_to_the_whole_batch_gradient(data):
    """A step's gradient is the mean over its images however they are split: one micro-batch of 16 (accum 1) and
    two of 8 (accum 2) over the same images give the same gradients (no drop-path; a ViT has no batch statistics)."""
    cfg = tiny_cfg(data, **{"model.drop_path": 0.0, "train.amp": "fp32"})
    run = trainer.build(cfg, torch.device("cpu"))
    it = iter(run.train_loader)
    (x1, y1), (x2, y2) = next(it), next(it)
    it.close()

    def grads(parts, accum):
        run.optimizer.zero_grad(set_to_none=True)
        for x, y in parts:
            trainer.train_micro_batch(run, x, y, step=0, last_micro=False, accum=accum)
        return [p.grad.clone() for p in run.raw_model.parameters() if p.grad is not None]

    whole = grads([(torch.cat([x1, x2]), torch.cat([y1, y2]))], accum=1)
    split = grads([(x1, y1), (x2, y2)], accum=2)
    assert len(whole) == len(split) > 0
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_a_batch_per_size_resumes_exactly_mid_epoch(data, tmp_path, monkeypatch):
    """SIGTERM in the 24 px epoch (4 micro-batches a step): the checkpoint's step is counted in that epoch's steps,
    and the resumed run ends bit-identical to the uninterrupted one."""
    from deit3_fast.checkpoint import load

    cpu = torch.device("cpu")
    full = train(tiny_cfg(data, **RAMP_BATCHES), tmp_path / "full", cpu, quiet=True)
    calls = sigterm_at_loss(monkeypatch, 3 + 5)  # epoch 0 has 3 micro-batches; then the 24 px epoch's 2nd step
    with pytest.raises(trainer.Preempted, match="epoch 2, step 2/3"):
        train(tiny_cfg(data, **RAMP_BATCHES), tmp_path / "split", cpu, quiet=True, handle_sigterm=True)
    assert len(calls) == 3 + 8 and load(tmp_path / "split" / "checkpoint-last.pt")["resume_at"]["step"] == 2
    monkeypatch.undo()
    rest = train(tiny_cfg(data, **RAMP_BATCHES), tmp_path / "split", cpu, quiet=True, resume="auto")
    assert [(r["epoch"], r["per_process_batch"]) for r in rest] == [(1, 4), (2, 8)]
    assert_same_as_uninterrupted(tmp_path / "full", full, tmp_path / "split")


@pytest.mark.slow
def test_the_loader_keeps_its_crops_and_changes_only_their_size(data):
    """The same samples, in the same order, with the same boxes at every size: only the resampling changes."""
    from deit3_fast.loaders import make_loader

    cfg = tiny_cfg(
        data, **{"aug.mixup": 0, "aug.cutmix": 0, "aug.three_augment": False, "aug.color_jitter": 0, "aug.hflip": 0}
    )
    loader = make_loader(cfg, "train", torch.device("cpu"))
    big = [(i.clone(), y.clone()) for i, y in loader.engine.batches(0)]
    loader.set_resolution(16)
    small = [(i.clone(), y.clone()) for i, y in loader.engine.batches(0)]
    assert loader.engine.crop.size == 16 and small[0][0].shape[1:] == (16, 16, 3)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(big, small))
    # A 32 px crop scaled to 16 px is (nearly) the 16 px crop of the same box.
    down = torch.nn.functional.interpolate(big[0][0].permute(0, 3, 1, 2).float(), size=16, mode="area")
    assert (down - small[0][0].permute(0, 3, 1, 2).float()).abs().mean() < 12
    engine16 = loader.engine
    loader.set_resolution(32)
    loader.set_resolution(16)
    assert loader.engine is engine16  # built once per size
    loader.set_resolution(16, 4)  # schedule.resolution.batch_sizes: the same samples in smaller batches
    quarter = [(i.clone(), y.clone()) for i, y in loader.engine.batches(0)]
    assert loader.engine.batch_size == 4 and len(loader) == 12 and quarter[0][0].shape == (4, 16, 16, 3)
    assert torch.equal(torch.cat([y for _, y in quarter]), torch.cat([y for _, y in small]))
    loader.set_resolution(16, 8)
    assert loader.engine is engine16


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("{start: 20, start_epoch: 0, end_epoch: 5, step: 8}", "multiples of step 8"),
        ("{start: 16, end: 36, start_epoch: 0, end_epoch: 5, step: 8}", "multiples of step 8"),
        ("{start: 16, start_epoch: 0, end_epoch: 5, step: 0}", "step: must be at least 1, got 0"),
        ("{start: 0, start_epoch: 0, end_epoch: 5, step: 8}", "patch size 4"),
        ("{start: 48, start_epoch: 0, end_epoch: 5, step: 8}", "at most end 32"),
        ("{start: 16, start_epoch: 5, end_epoch: 5, step: 8}", "start_epoch < end_epoch"),
        ("{start: 16, end_epoch: 5, stpe: 8}", "did you mean 'step'"),
        ("{start: 16, start_epoch: 0, end_epoch: 40, step: 8}", "end_epoch 40 must be below schedule.epochs 40"),
        ("{start: 16, start_epoch: 0, end_epoch: 5, step: 8, batch_sizes: {20: 8}}", "never trains at 20 px"),
        ("{start: 16, start_epoch: 0, end_epoch: 5, step: 8, batch_sizes: {16: 0}}", r"batch_sizes\[16\]: must be at"),
        ("{batch_sizes: {16: 8}}", "needs a ramp"),
        ("{start: 16, start_epoch: 0, end_epoch: 5, step: 8, batch_sizes: [8]}", "batch_sizes: expected a mapping"),
    ],
)
def test_bad_ramps_are_refused_at_load(value, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        load_config("quickstart", [f"schedule.resolution={value}"])


@pytest.mark.slow
def test_compiled_ramped_run_compiles_each_size_once(data, tmp_path):
    """torch.compile with a ramp: one static graph per size, not a recompilation every epoch (and no fallback to
    eager at the recompile limit)."""
    import torch._dynamo.utils as dutils

    dutils.counters.clear()
    cfg = tiny_cfg(data, **{**RAMP, "train.compile": "true", "schedule.epochs": 4})
    rows = train(cfg, tmp_path, torch.device("cpu"), quiet=True, stop_after_epoch=2)
    after_ramp = dutils.counters["stats"]["unique_graphs"]
    assert [r["train_img_size"] for r in rows] == [16, 24, 32]
    # Epochs at sizes already compiled compile nothing new, in any order. A run built again in the process (a
    # resumed one) starts with empty caches (builder.fresh_compile_caches) and compiles each size once itself.
    run = trainer.build(cfg, torch.device("cpu"))
    for epoch in (3, 0, 1, 2):
        trainer.train_one_epoch(run, epoch)
    dutils.counters.clear()
    for epoch in (2, 0, 3, 1):
        trainer.train_one_epoch(run, epoch)
    assert after_ramp > 0 and dutils.counters["stats"]["unique_graphs"] == 0


def test_a_ramp_floors_the_patch_grid_like_the_fixed_size_model():
    """Sizes need not be multiples of the patch (ViT-H/14 pre-trains at 160): with the ramp's dynamic image size the
    leftover pixels are ignored, as the fixed-size model's strided convolution ignores them, so at the final size
    the ramped model computes exactly what the fixed one does, and at a smaller size it runs on the floored grid."""
    from deit3_fast.models import create_model

    torch.manual_seed(0)
    fixed = create_model("deit3_micro", num_classes=5, img_size=36).eval()  # patch 8: a 4 x 4 grid, 4 px left over
    ramped = create_model("deit3_micro", num_classes=5, img_size=36, dynamic_img_size=True).eval()
    ramped.load_state_dict(fixed.state_dict())
    x = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        assert torch.equal(ramped(x), fixed(x))
        assert ramped(torch.randn(2, 3, 20, 20)).shape == (2, 5)  # 2 x 2 patches, 4 px ignored
    cfg = load_config(
        "vit_h_in1k", ["schedule.resolution={start: 128, end: 160, start_epoch: 0, end_epoch: 5, step: 32}"]
    )
    assert resolution_schedule(cfg.schedule.resolution, 160, 8)[:6] == [128, 128, 128, 160, 160, 160]


@pytest.mark.slow
def test_a_ninth_size_still_runs_compiled_after_other_runs_in_the_process(data, monkeypatch):
    """torch.compile's caches belong to the compiled functions' code, which every run a process builds shares (ablate,
    profile --tune): each run starts them empty, with room for a graph per size (two for the CPU batch augmentation:
    its 16-image slices and the rest of the batch), so neither earlier runs nor a ninth size send the batch
    augmentation back to eager (dynamo's limit is 8 graphs a function). Here it compiles without train.compile, as a
    CPU run with enough pixels an epoch does; dynamo's eager backend keeps the test to the caches, without codegen."""
    import torch._dynamo

    from pipelines import build as loader_build

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, **kw: real(f, **{**kw, "backend": "eager"}))
    monkeypatch.setattr(loader_build, "CPU_COMPILE_PIXELS", 1)
    batch = {"data.batch_size": 20, "train.global_batch": 20, "schedule.epochs": 12, "aug.img_size": 32}
    ramp = "{start: 16, start_epoch: 0, end_epoch: 8, step: 2}"  # 16, 18, ..., 32
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for size in (20, 24, 28):  # the runs of an ablation over aug.img_size, before this one
            loader = trainer.build(tiny_cfg(data, **{**batch, "aug.img_size": size}), torch.device("cpu")).train_loader
            assert loader.augment.compiled and len(next(iter(loader))[0]) == 20
        run = trainer.build(tiny_cfg(data, **batch, **{"schedule.resolution": ramp}), torch.device("cpu"))
        sizes = sorted(set(run.resolutions))
        assert sizes == list(range(16, 33, 2)) and run.train_loader.augment.compiled
        for size in sizes:
            run.train_loader.set_resolution(size)
            assert next(iter(run.train_loader))[0].shape[-1] == size

"""Every shipped recipe can start: its model at the recipe's resolution (on the meta device: ViT-H does not fit a CI
machine), its optimiser groups, its loader with the recipe's augmentation on a small .beton, and one optimiser step
with a tiny stand-in of its model (same name, patch and resolution; one narrow block). A recipe that cannot start
fails here, not on a cluster."""

import math
from pathlib import Path

import pytest
import torch

from deit3_fast import models, trainer
from deit3_fast.archs import ARCHS, resolve_name
from deit3_fast.config import CONFIG_DIR, load_config
from deit3_fast.device import AMP_DTYPES
from deit3_fast.lamb import Lamb
from deit3_fast.models import create_model

from ..conftest import make_splits

RECIPES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
ABLATIONS = sorted(str(p) for p in (CONFIG_DIR / "ablations").glob("cifar10_*.yaml") if "grid" not in p.stem)
# The paper's parameter counts (models_v2.py at 224 px); another resolution changes only pos_embed.
PARAMS_M = {"deit3_small": 22.0, "deit3_base": 86.6, "deit3_large": 304.4, "deit3_huge": 632.1}
# Per-GPU batch and node count (8 GPUs each) of the official command lines (README_revenge.md).
OFFICIAL_BATCH = {
    "vit_s_in1k": (256, 1),
    "vit_b_in1k": (256, 1),
    "vit_l_in1k": (64, 4),
    "vit_h_in1k": (64, 4),
    "vit_b_in1k_ft224": (64, 1),
    "vit_l_in1k_ft224": (64, 1),
    "vit_h_in1k_ft224": (32, 2),
    "vit_s_in1k_ft384": (64, 1),
    "vit_b_in1k_ft384": (32, 2),
    "vit_l_in1k_ft384": (16, 4),
    "vit_s_in21k": (128, 2),
    "vit_b_in21k": (64, 4),
    "vit_l_in21k": (64, 4),
    "vit_h_in21k": (64, 4),
    "vit_s_in21k_ft_in1k": (128, 2),
    "vit_b_in21k_ft_in1k": (64, 4),
    "vit_l_in21k_ft_in1k": (64, 4),
    "vit_h_in21k_ft_in1k": (64, 4),
}


def test_every_recipe_is_covered():
    assert len(RECIPES) == 19 and set(OFFICIAL_BATCH) == set(RECIPES) - {"quickstart"}
    assert len(ABLATIONS) == 5


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """256 samples: one repeated-augmentation epoch (RASampler keeps len // 256 * 256 samples)."""
    return (
        make_splits(
            tmp_path_factory.mktemp("recipes"), {"train": (8, 32, 0)}, min_side=32, max_side=72, page_size=2 << 20
        )
        / "train.beton"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", [r for r in RECIPES if r != "quickstart"])
def test_recipe_model_at_its_resolution_and_its_optimiser(name):
    """The real model on the meta device: the floored patch grid (ViT-H/14: 11 x 11 at 160, 9 x 9 at 128), the
    paper's size, the recipe's drop-path in every block, LayerScale, and the optimiser the recipe asks for."""
    cfg = load_config(name)
    arch = resolve_name(cfg.model.name)[0]
    patch = ARCHS[arch][0]
    classes = 21841 if cfg.model.num_classes == "auto" else cfg.model.num_classes  # auto: fall11's count here
    with torch.device("meta"):
        model = create_model(
            cfg.model.name,
            num_classes=classes,
            img_size=cfg.aug.img_size,
            drop_path=cfg.model.drop_path,
            layer_scale_init=cfg.model.layer_scale_init,
        )
    side = cfg.aug.img_size // patch
    assert model.patch_embed.grid_size == (side, side) and model.pos_embed.shape[1] == side * side
    with torch.device("meta"):
        at_224 = create_model(arch, num_classes=1000, img_size=224)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(at_224) / 1e6 - PARAMS_M[arch]) < 0.1  # the paper's table, to its rounding
    dim = ARCHS[arch][1]
    resized = (side * side - (224 // patch) ** 2) * dim + (classes - 1000) * (dim + 1)
    assert count(model) == count(at_224) + resized  # only pos_embed and the head differ
    for block in model.blocks:  # the official rate in every block, not timm's ramp
        for dp in (block.drop_path1, block.drop_path2):
            assert dp.drop_prob == cfg.model.drop_path if cfg.model.drop_path else isinstance(dp, torch.nn.Identity)
        assert hasattr(block.ls1, "gamma") == (cfg.model.layer_scale_init is not None)
    o = cfg.optim
    opt = o.build(model)  # the section's own build, as builder.build makes the run's optimiser
    assert isinstance(opt, Lamb) == (o.name == "lamb")
    assert (opt.defaults["betas"], opt.defaults["eps"]) == (tuple(o.betas), o.eps)
    decay, no_decay = opt.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"], decay["lr"]) == (o.weight_decay, 0.0, o.lr)
    assert all(p.ndim >= 2 for p in decay["params"])
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.pos_embed) in no_decay_ids and id(model.cls_token) in no_decay_ids
    if o.name == "lamb":
        assert opt.defaults["max_grad_norm"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES + ABLATIONS, ids=lambda n: Path(n).stem)
def test_recipe_starts_and_takes_a_step(name, small, monkeypatch):
    """trainer.build on the recipe as shipped (data, checkpoint and batch arithmetic aside) with a one-block stand-in
    of its model, then one optimiser step from its real loader: augmentation, mixing, loss, optimiser, AMP."""
    real_create = models.create_model
    monkeypatch.setattr(
        models, "create_model", lambda *a, **kw: real_create(*a, **kw, depth=1, embed_dim=32, num_heads=2)
    )
    cfg = load_config(
        name,
        [
            f"data.train={small}",
            "data.val=null",
            "model.checkpoint=null",
            "data.workers=1",
            "data.batch_size=8",
            "train.global_batch=16",
        ],
    )
    run = trainer.build(cfg, torch.device("cpu"))
    assert run.raw_model.patch_embed.grid_size[0] == cfg.aug.img_size // run.raw_model.patch_embed.patch_size[0]
    before = [p.detach().clone() for p in run.raw_model.parameters()]
    it = iter(run.train_loader)
    for micro in range(run.accum):
        x, y = next(it)
        assert x.shape == (8, 3, cfg.aug.img_size, cfg.aug.img_size) and x.dtype == AMP_DTYPES[run.amp]
        loss = trainer.train_micro_batch(run, x, y, step=0, last_micro=micro == run.accum - 1, accum=run.accum)
        assert torch.isfinite(loss)
    it.close()
    assert any(not torch.equal(a, b) for a, b in zip(before, run.raw_model.parameters()))


@pytest.mark.parametrize("name", sorted(OFFICIAL_BATCH))
def test_per_gpu_batch_is_the_official_command_lines(name):
    """Mixup/cutmix draw one lambda per per-GPU batch, so the per-GPU batch is part of the recipe; the comment
    names the official nodes x GPUs."""
    batch, nodes = OFFICIAL_BATCH[name]
    cfg = load_config(name)
    assert cfg.data.batch_size == batch and batch * nodes * 8 == cfg.train.global_batch
    line = next(x for x in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines() if "batch_size:" in x)
    assert f"{nodes} node{'s' if nodes > 1 else ''} x 8 GPUs x {batch} = {cfg.train.global_batch}" in line
    assert cfg.train.amp == "auto"


# ---- what each recipe's run really uses, against the official command lines (README_revenge.md, main.py) --------

PRETRAIN_1K = dict(
    opt="lamb",
    wd=0.05,
    epochs=800,
    loss="bce",
    smoothing=0.0,
    mixup=0.8,
    cutmix=1.0,
    crop="rrc",
    three_aug=True,
    jitter=0.3,
    auto_augment=None,
    repeats=3,
    global_batch=2048,
)
FT_1K = dict(
    opt="adamw",
    lr=1e-5,
    wd=0.1,
    epochs=20,
    loss="ce",
    smoothing=0.1,
    mixup=0.8,
    cutmix=1.0,
    crop="rrc",
    three_aug=False,
    jitter=0.0,
    auto_augment="rand-m9-mstd0.5-inc1",
    repeats=1,
    global_batch=512,
)
PRETRAIN_21K = dict(
    opt="lamb",
    lr=1e-3,
    wd=0.02,
    epochs=240,
    loss="ce",
    smoothing=0.1,
    mixup=0.0,
    cutmix=1.0,
    crop="src",
    three_aug=True,
    jitter=0.3,
    auto_augment=None,
    repeats=1,
    global_batch=2048,
    classes="auto",
)
FT_21K_1K = dict(
    opt="lamb",
    lr=3e-4,
    wd=0.02,
    epochs=50,
    loss="ce",
    smoothing=0.1,
    mixup=0.0,
    cutmix=1.0,
    crop="src",
    three_aug=True,
    jitter=0.3,
    auto_augment=None,
    repeats=1,
    global_batch=2048,
)
EXPECTED = {
    "vit_s_in1k": dict(PRETRAIN_1K, model="deit3_small", res=224, lr=4e-3, drop_path=0.05),
    "vit_b_in1k": dict(PRETRAIN_1K, model="deit3_base", res=192, lr=3e-3, drop_path=0.2),
    "vit_l_in1k": dict(PRETRAIN_1K, model="deit3_large", res=192, lr=3e-3, drop_path=0.45),
    "vit_h_in1k": dict(PRETRAIN_1K, model="deit3_huge", res=160, lr=3e-3, drop_path=0.6),
    "vit_b_in1k_ft224": dict(FT_1K, model="deit3_base", res=224, drop_path=0.2),
    "vit_l_in1k_ft224": dict(FT_1K, model="deit3_large", res=224, drop_path=0.45),
    "vit_h_in1k_ft224": dict(FT_1K, model="deit3_huge", res=224, drop_path=0.55),
    "vit_s_in1k_ft384": dict(FT_1K, model="deit3_small", res=384, drop_path=0.0),
    "vit_b_in1k_ft384": dict(FT_1K, model="deit3_base", res=384, drop_path=0.15),
    "vit_l_in1k_ft384": dict(FT_1K, model="deit3_large", res=384, drop_path=0.4),
    "vit_s_in21k": dict(PRETRAIN_21K, model="deit3_small", res=224, drop_path=0.05),
    "vit_b_in21k": dict(PRETRAIN_21K, model="deit3_base", res=224, drop_path=0.1),
    "vit_l_in21k": dict(PRETRAIN_21K, model="deit3_large", res=224, drop_path=0.3),
    "vit_h_in21k": dict(PRETRAIN_21K, model="deit3_huge", res=128, drop_path=0.5, epochs=90),
    "vit_s_in21k_ft_in1k": dict(FT_21K_1K, model="deit3_small", res=224, drop_path=0.05),
    "vit_b_in21k_ft_in1k": dict(FT_21K_1K, model="deit3_base", res=224, drop_path=0.15),
    "vit_l_in21k_ft_in1k": dict(FT_21K_1K, model="deit3_large", res=224, drop_path=0.4),
    "vit_h_in21k_ft_in1k": dict(FT_21K_1K, model="deit3_huge", res=224, drop_path=0.45),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_runs_with_the_official_values(name, small, monkeypatch):
    """Built through trainer.build (the run's own components, a one-block stand-in model), every value the run uses
    is the official command line's: a value dropped on its way from the config to the component fails here."""
    e = EXPECTED[name]
    real_create = models.create_model
    monkeypatch.setattr(
        models, "create_model", lambda *a, **kw: real_create(*a, **kw, depth=1, embed_dim=32, num_heads=2)
    )
    cfg = load_config(
        name,
        [
            f"data.train={small}",
            f"data.val={small}",
            "model.checkpoint=null",
            "data.workers=1",
            "data.batch_size=8",
            "train.global_batch=16",
        ],
    )
    run = trainer.build(cfg, torch.device("cpu"))
    model = run.raw_model
    # Model: name, resolution, classes, drop-path in every block, LayerScale at 1e-4.
    assert (cfg.model.name, model.patch_embed.img_size[0]) == (e["model"], e["res"])
    # IN-21k releases differ in their class count: the recipes take it from the data (here, small's 8 classes).
    assert load_config(name).model.num_classes == e.get("classes", 1000)
    assert model.head.out_features == (8 if e.get("classes") == "auto" else e.get("classes", 1000))
    for block in model.blocks:
        for dp in (block.drop_path1, block.drop_path2):
            assert dp.drop_prob == e["drop_path"] if e["drop_path"] else isinstance(dp, torch.nn.Identity)
        assert torch.all(block.ls1.gamma == 1e-4) and torch.all(block.ls2.gamma == 1e-4)
    # Optimiser: kind, lr, betas, eps, weight decay on matrices only, LAMB's clipping at 1.0.
    opt = run.optimizer
    assert isinstance(opt, Lamb) if e["opt"] == "lamb" else isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (e["wd"], 0.0)
    for group in opt.param_groups:
        assert (group["betas"], group["eps"]) == ((0.9, 0.999), 1e-8)
    if e["opt"] == "lamb":
        assert opt.defaults["max_grad_norm"] == 1.0
    # Schedule: warm-up from 1e-6 over 5 epochs to lr, then timm's cosine (not shifted by the warm-up) to 1e-5.
    sched, steps = run.scheduler, run.scheduler.steps_per_epoch
    after_warmup = 1e-5 + 0.5 * (e["lr"] - 1e-5) * (1 + math.cos(math.pi * 5 / e["epochs"]))
    assert sched.value(0) == pytest.approx(1e-6) and sched.value(5 * steps) == pytest.approx(after_warmup)
    assert sched.value(steps * 5 // 2) == pytest.approx(1e-6 + (e["lr"] - 1e-6) * (steps * 5 // 2) / (5 * steps))
    assert sched.value(e["epochs"] * steps) == pytest.approx(1e-5) and cfg.schedule.epochs == e["epochs"]
    # Loss and mixing.
    assert run.loss.kind == e["loss"]
    if e["smoothing"]:
        assert run.loss.hard.smoothing == e["smoothing"]
    mix = run.train_loader.mixing.mixup
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.mix_prob, mix.switch_prob, mix.label_smoothing, mix.mode) == (
        e["mixup"],
        e["cutmix"],
        1.0,
        0.5,
        e["smoothing"],
        "batch",
    )
    # Augmentation: the primary crop, BatchAugment (with RandAugment when fine-tuning), the eval crop, repeats.
    engine_ = run.train_loader.engine
    assert engine_.crop.kind == e["crop"] and engine_.crop.size == e["res"]
    assert (engine_.crop.scale, engine_.crop.ratio, engine_.crop.pad) == ((0.08, 1.0), (3 / 4, 4 / 3), 4)
    a = run.train_loader.augment.aug
    assert (a.hflip, a.three_augment, a.color_jitter, a.solarize_threshold, tuple(a.blur_sigma)) == (
        0.5,
        e["three_aug"],
        e["jitter"],
        128,
        (0.1, 2.0),
    )
    ra = run.train_loader.augment.op("randaugment")
    assert (ra is not None) == (e["auto_augment"] is not None)
    if ra is not None:
        assert ra.layers == 2 and len(ra.names) == 15 and "SolarizeIncreasing" in ra.names and ra.weights is None
        assert (ra.mean, ra.std, ra.top, ra.prob) == (9, 0.5, 10, 0.5)
        assert ra.translate_const == int(0.45 * e["res"]) and ra.fill == (124, 116, 104)
    val = run.val_loader.engine.crop
    assert (val.kind, val.size, val.center_ratio) == ("center", e["res"], 1.0)
    assert run.train_loader.engine.epoch_order.repeats == e["repeats"]
    assert load_config(name).train.global_batch == e["global_batch"] and run.amp == "bf16"  # auto on a CPU


def test_defaults_are_the_official_values():
    """What a recipe that leaves a key out gets, and what the components take when called with their defaults:
    the official values (deit3-recipe.md), so a changed default cannot slip through a recipe that relies on it."""
    from deit3_fast.config import Config, DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig
    from deit3_fast.optim import build_optimizer
    from pipelines.augment import IMAGENET_MEAN, IMAGENET_STD
    from pipelines.config import AugConfig

    a = AugConfig()
    assert (a.img_size, a.crop, a.rrc_scale, a.rrc_ratio, a.src_pad, a.eval_crop_ratio) == (
        224,
        "rrc",
        (0.08, 1.0),
        (3 / 4, 4 / 3),
        4,
        1.0,
    )
    assert (a.hflip, a.three_augment, a.blur_sigma, a.solarize_threshold, a.color_jitter, a.auto_augment) == (
        0.5,
        True,
        (0.1, 2.0),
        128,
        0.3,
        None,
    )
    assert (a.mixup, a.cutmix, a.mix_prob, a.mix_switch_prob, a.label_smoothing) == (0.8, 1.0, 1.0, 0.5, 0.0)
    assert (a.mean, a.std) == (IMAGENET_MEAN, IMAGENET_STD) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    o = OptimConfig()
    assert (o.name, o.lr, o.weight_decay, o.betas, o.eps, o.max_grad_norm) == (
        "lamb",
        4e-3,
        0.05,
        (0.9, 0.999),
        1e-8,
        1.0,
    )
    s = ScheduleConfig()
    assert (s.epochs, s.warmup_epochs, s.warmup_lr, s.min_lr) == (800, 5, 1e-6, 1e-5)
    m = ModelConfig()
    assert (m.name, m.num_classes, m.drop_path, m.layer_scale_init, m.checkpoint) == (
        "deit3_small",
        1000,
        0.05,
        1e-4,
        None,
    )
    t = TrainConfig()
    assert (t.global_batch, t.amp, t.seed, t.ema_decay) == (2048, "auto", 0, None)
    d = DataConfig()
    assert (d.batch_size, d.repeats, d.shuffle, d.eval_batch_size) == (256, 3, True, None)
    assert Config().loss == "bce"
    # The components' own defaults, which the recipes' wiring passes through.
    model = create_model("deit3_nano")
    assert torch.all(model.blocks[0].ls1.gamma == 1e-4)
    opt = build_optimizer("lamb", model, lr=1e-3, weight_decay=0.05)
    assert opt.defaults["max_grad_norm"] == 1.0 and opt.defaults["betas"] == (0.9, 0.999)
    assert opt.defaults["eps"] == 1e-8 and Lamb([torch.nn.Parameter(torch.ones(1))]).defaults["max_grad_norm"] == 1.0

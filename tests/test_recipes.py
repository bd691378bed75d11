"""Every shipped recipe can start: its model at the recipe's resolution (on the meta device: ViT-H does not fit a CI
machine), its optimiser groups, its loader with the recipe's augmentation on a small .beton, and one optimiser step
with a tiny stand-in of its model (same name, patch and resolution; one narrow block). A recipe that cannot start
fails here, not on a cluster."""
from pathlib import Path

import pytest
import torch

from deit3_fast import engine
from deit3_fast.config import CONFIG_DIR, load_config
from deit3_fast.models import ARCHS, create_model, resolve_name
from deit3_fast.optim import Lamb

from .conftest import make_splits

RECIPES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
ABLATIONS = sorted(str(p) for p in (CONFIG_DIR / "ablations").glob("cifar10_*.yaml") if "grid" not in p.stem)
# The paper's parameter counts (models_v2.py at 224 px); another resolution changes only pos_embed.
PARAMS_M = {"deit3_small": 22.0, "deit3_base": 86.6, "deit3_large": 304.4, "deit3_huge": 632.1}
# Per-GPU batch and node count (8 GPUs each) of the official command lines (README_revenge.md).
OFFICIAL_BATCH = {
    "vit_s_in1k": (256, 1), "vit_b_in1k": (256, 1), "vit_l_in1k": (64, 4), "vit_h_in1k": (64, 4),
    "vit_b_in1k_ft224": (64, 1), "vit_l_in1k_ft224": (64, 1), "vit_h_in1k_ft224": (32, 2),
    "vit_s_in1k_ft384": (64, 1), "vit_b_in1k_ft384": (32, 2), "vit_l_in1k_ft384": (16, 4),
    "vit_s_in21k": (128, 2), "vit_b_in21k": (64, 4), "vit_l_in21k": (64, 4), "vit_h_in21k": (64, 4),
    "vit_s_in21k_ft_in1k": (128, 2), "vit_b_in21k_ft_in1k": (64, 4), "vit_l_in21k_ft_in1k": (64, 4),
    "vit_h_in21k_ft_in1k": (64, 4),
}


def test_every_recipe_is_covered():
    assert len(RECIPES) == 19 and set(OFFICIAL_BATCH) == set(RECIPES) - {"quickstart"}
    assert len(ABLATIONS) == 4


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """256 samples: one repeated-augmentation epoch (RASampler keeps len // 256 * 256 samples)."""
    return make_splits(tmp_path_factory.mktemp("recipes"), {"train": (8, 32, 0)}, min_side=32, max_side=72,
                       page_size=2 << 20) / "train.beton"


@pytest.mark.parametrize("name", [r for r in RECIPES if r != "quickstart"])
def test_recipe_model_at_its_resolution_and_its_optimiser(name):
    """The real model on the meta device: the floored patch grid (ViT-H/14: 11 x 11 at 160, 9 x 9 at 128), the
    paper's size, the recipe's drop-path in every block, LayerScale, and the optimiser the recipe asks for."""
    cfg = load_config(name)
    arch = resolve_name(cfg.model.name)[0]
    patch = ARCHS[arch][0]
    with torch.device("meta"):
        model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, img_size=cfg.aug.img_size,
                             drop_path=cfg.model.drop_path, layer_scale_init=cfg.model.layer_scale_init)
    side = cfg.aug.img_size // patch
    assert model.patch_embed.grid_size == (side, side) and model.pos_embed.shape[1] == side * side
    with torch.device("meta"):
        at_224 = create_model(arch, num_classes=1000, img_size=224)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(at_224) / 1e6 - PARAMS_M[arch]) < 0.1  # the paper's table, to its rounding
    dim = ARCHS[arch][1]
    resized = (side * side - (224 // patch) ** 2) * dim + (cfg.model.num_classes - 1000) * (dim + 1)
    assert count(model) == count(at_224) + resized  # only pos_embed and the head differ
    for block in model.blocks:  # the official rate in every block, not timm's ramp
        for dp in (block.drop_path1, block.drop_path2):
            assert dp.drop_prob == cfg.model.drop_path if cfg.model.drop_path else isinstance(dp, torch.nn.Identity)
        assert hasattr(block.ls1, "gamma") == (cfg.model.layer_scale_init is not None)
    o = cfg.optim
    opt = engine.build_optimizer(o.name, model, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas),
                                 eps=o.eps, max_grad_norm=o.max_grad_norm)
    assert isinstance(opt, Lamb) == (o.name == "lamb")
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
    """engine.build on the recipe as shipped (data, checkpoint and batch arithmetic aside) with a one-block stand-in
    of its model, then one optimiser step from its real loader: augmentation, mixing, loss, optimiser, AMP."""
    real_create = engine.create_model
    monkeypatch.setattr(engine, "create_model",
                        lambda *a, **kw: real_create(*a, **kw, depth=1, embed_dim=32, num_heads=2))
    cfg = load_config(name, [f"data.train={small}", "data.val=null", "model.checkpoint=null", "data.workers=1",
                             "data.batch_size=8", "train.global_batch=16"])
    run = engine.build(cfg, torch.device("cpu"))
    assert run.raw_model.patch_embed.grid_size[0] == cfg.aug.img_size // run.raw_model.patch_embed.patch_size[0]
    before = [p.detach().clone() for p in run.raw_model.parameters()]
    it = iter(run.train_loader)
    for micro in range(run.accum):
        x, y = next(it)
        assert x.shape == (8, 3, cfg.aug.img_size, cfg.aug.img_size) and x.dtype == engine.AMP_DTYPES[run.amp]
        loss = engine.train_micro_batch(run, x, y, step=0, last_micro=micro == run.accum - 1)
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

"""The config schema: torch-free, one vocabulary, model names, the checks no single key can make, batch arithmetic."""

import subprocess
import sys

import pytest

from deit3_fast.batching import batch_plan
from deit3_fast.config import ConfigError, load_config
from pipelines.registry import ENGINES

from ..conftest import REPO


def test_loading_and_checking_a_config_imports_no_torch():
    """Every command checks its config first: that must not wait seconds for torch, timm or numba, and the data
    path's config sections and the ablation grids load without them too."""
    code = (
        "import sys\nimport deit3_fast.config as c, deit3_fast.ablate, deit3_fast.batching as b, pipelines.config\n"
        "b.batch_plan(c.load_config('vit_h_in1k'), 8)\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'numba', 'numpy'})\n"
        "print(heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_each_vocabulary_is_written_once():
    """Each component owns its names; the config's sections check their keys against those very tuples."""
    from dataclasses import fields

    from deit3_fast import amp, archs, config, device, losses, optim
    from pipelines import config as data_config
    from pipelines import registry

    def choices(cls, key):
        return next(f for f in fields(cls) if f.name == key).metadata["choices"]

    assert choices(config.OptimConfig, "name") is optim.OPTIMIZERS and choices(config.Config, "loss") is losses.LOSSES
    assert choices(config.TrainConfig, "amp") is amp.AMP_CHOICES and set(device.AMP_DTYPES) | {"auto"} == set(
        amp.AMP_CHOICES
    )
    assert choices(config.ModelConfig, "name") is archs.MODEL_NAMES
    assert config._CHOICES["data.engine"] is registry.ENGINES and config._CHOICES["aug.crop"] is data_config.CROPS


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.name=sgd", "optim.name: 'sgd' is not one of lamb, adamw"),
        ("loss=mse", "loss: 'mse' is not one of bce, ce"),
        ("train.amp=fp8", "train.amp: 'fp8' is not one of auto, bf16, fp16, fp32"),
        ("data.engine=pil", f"data.engine: 'pil' is not one of {', '.join(ENGINES)}"),
        ("aug.crop=center", "aug.crop: 'center' is not one of rrc, src"),
        ("model.num_classes=0", "model.num_classes: must be at least 1, got 0"),
        ("model.num_classes=many", "model.num_classes: a class count or auto, got 'many'"),
        ("schedule.epochs=0", "schedule.epochs: must be at least 1, got 0"),
        ("train.global_batch=-2", "train.global_batch: must be at least 1, got -2"),
    ],
)
def test_each_section_checks_its_keys(override, message):
    """The checks a section declares on its fields (schema.py) run on the values read, wherever it lives."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message


def test_an_image_smaller_than_one_patch_is_refused_at_load():
    """Like the official code, the patch grid is floored: any size of at least one patch is fine."""
    assert load_config("vit_h_in1k").aug.img_size == 160  # 11 x 11 patches of 14
    with pytest.raises(ConfigError, match="aug.img_size 8 is smaller than deit3_huge's patch size 14"):
        load_config("vit_h_in1k", ["aug.img_size=8"])


def test_names_everywhere_a_model_is_named():
    """model.name in a config (a timm name sets the resolution unless aug.img_size is given), and one error that
    lists the valid names."""
    cfg = load_config(None, ["model.name=deit3_base_patch16_384"])
    assert cfg.aug.img_size == 384
    assert load_config(None, ["model.name=deit3_base_patch16_384", "aug.img_size=448"]).aug.img_size == 448
    assert load_config("vit_b_in1k", ["model.name=deit_base_patch16_LS"]).aug.img_size == 192  # the recipe's
    assert load_config(None, ["model.name=deit_huge_patch14_LS"]).aug.img_size == 224
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.name=deit3_base_patch16_192"])
    assert "deit3_base_patch16_384" in str(e.value) and "deit_huge_patch14_LS" in str(e.value)
    from deit3_fast.archs import resolve_name

    with pytest.raises(ValueError, match="valid names: .*deit3_small_patch16_224"):
        resolve_name("vit_base_patch16_224")


@pytest.mark.parametrize(
    "batch, global_batch, world, expected",
    [
        (32, 32, 1, (32, 1, None)),
        (8, 2048, 1, (8, 256, None)),
        (256, 2048, 8, (256, 1, None)),
        (32, 32, 2, (16, 1, "data.batch_size 32 -> 16 per process")),
        (64, 512, 16, (32, 1, "64 -> 32 per process")),
        (48, 2048, 2, "use --set data.batch_size=32 (32 accumulation steps)"),
        (256, 2048, 24, "cannot be split over 24 processes: use a world size that divides it (e.g. 16 or 32)"),
    ],
)
def test_batch_plan_splits_the_global_batch_or_names_a_batch_that_works(batch, global_batch, world, expected):
    cfg = load_config("quickstart", [f"data.batch_size={batch}", f"train.global_batch={global_batch}"])
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            batch_plan(cfg, world)
        return
    plan = batch_plan(cfg, world)
    assert (plan.per_process, plan.accum) == expected[:2]
    assert plan.per_process * world * plan.accum == global_batch
    assert (plan.note is None) if expected[2] is None else expected[2] in plan.note


@pytest.mark.parametrize("value", ["2.5", "-1", "many", "true"])
def test_a_bad_worker_count_says_what_data_workers_takes(value):
    """Against `int | str`, a wrong type would otherwise be named as a Python type ("expected str, got 2.5")."""
    with pytest.raises(ConfigError, match=r"data.workers: a count of CPU workers \(0 or more\) or auto, got"):
        load_config("quickstart", [f"data.workers={value}"])


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("0", 0), ("3", 3)])
def test_data_workers_takes_a_count_or_auto(value, expected):
    assert load_config("quickstart", [f"data.workers={value}"]).data.workers == expected

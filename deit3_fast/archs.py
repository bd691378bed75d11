"""The model names users type, and what they build: a torch-free table (the config schema checks names and sizes
with it without importing torch).

Our names are the architectures; timm's (`deit3_base_patch16_384`: the resolution suffix is the default img_size;
a pretrained tag such as `.fb_in22k_ft_in1k` is ignored) and the official `models_v2.py` names map onto them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema import ConfigError, checked, one_of

# name -> (patch, dim, depth, heads). The first five are the paper's; the others are not in the paper: deit3_cifar is
# DeiT's ViT-Ti width and depth (192, 12 blocks, 3 heads) with patch 4, so 32x32 CIFAR images give 8x8 = 64 tokens
# (5.4M parameters); the last two are small enough for CPU tests and the quickstart.
ARCHS = {
    "deit3_small": (16, 384, 12, 6),
    "deit3_medium": (16, 512, 12, 8),
    "deit3_base": (16, 768, 12, 12),
    "deit3_large": (16, 1024, 24, 16),
    "deit3_huge": (14, 1280, 32, 16),
    "deit3_cifar": (4, 192, 12, 3),
    "deit3_micro": (8, 192, 6, 3),
    "deit3_nano": (4, 64, 2, 2),
}
TIMM_NAMES = {
    f"deit3_{size}_patch16_{res}": (f"deit3_{size}", res)
    for size in ("small", "medium", "base", "large")
    for res in (224, 384)
    if (size, res) != ("medium", 384)
}
TIMM_NAMES["deit3_huge_patch14_224"] = ("deit3_huge", 224)
OFFICIAL_NAMES = {f"deit_{size}_patch16_LS": (f"deit3_{size}", None) for size in ("small", "medium", "base", "large")}
OFFICIAL_NAMES["deit_huge_patch14_LS"] = ("deit3_huge", None)
MODEL_NAMES = (*ARCHS, *TIMM_NAMES, *OFFICIAL_NAMES)
DEFAULT_IMG_SIZE = 224


def resolve_name(name: str) -> tuple[str, int | None]:
    """(architecture in ARCHS, the resolution the name implies or None) for any accepted model name."""
    base = name.split(".", 1)[0] if name.startswith("deit3_") else name  # timm's pretrained tags
    if base in ARCHS:
        return base, None
    if base in TIMM_NAMES:
        return TIMM_NAMES[base]
    if base in OFFICIAL_NAMES:
        return OFFICIAL_NAMES[base]
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")


def default_img_size(name: str) -> int:
    return resolve_name(name)[1] or DEFAULT_IMG_SIZE


def patch_size(name: str) -> int:
    return ARCHS[resolve_name(name)[0]][0]


def _count_or_auto(value, where: str) -> None:
    if isinstance(value, str) and value != "auto":
        raise ConfigError(f"{where}: a class count or auto, got {value!r}")


@dataclass
class ModelConfig:
    """The config's `model` section, beside the names it takes; `models.build_model(section, ...)` makes the model
    (here no torch: the config schema imports this module)."""

    # deit3_{small,...,huge}, timm's deit3_*_patch*_RES or official deit_*_LS names
    name: str = one_of("deit3_small", MODEL_NAMES)
    # or auto: the class count of data.train's manifest or conversion report
    num_classes: int | str = checked(1000, _count_or_auto, positive=True)
    drop_path: float = 0.05  # the same rate in every block (official), not timm's linear ramp
    layer_scale_init: float | None = 1e-4  # null: no LayerScale (plain pre-norm residual blocks)
    checkpoint: str | None = None  # weights to start from (fine-tuning)

"""DeiT III ViTs (official `models_v2.py` `vit_models`) built on timm's VisionTransformer, with the official init.

timm's `deit3_*` models are the same architecture (pre-norm blocks with LayerScale, qkv bias, LayerNorm eps 1e-6,
pos_embed without a class-token slot, SDPA attention) but not the same init: timm uses LayerScale 1e-6, a linear
drop-path ramp over depth and cls_token std 1e-6. `create_model` sets the recipe's: LayerScale 1e-4, the same
drop-path rate in every block, trunc-normal(0.02) for pos_embed, cls_token and Linear weights, zero biases.

Checkpoints: official DeiT III `.pth` files (key `model`, `gamma_1/2`), timm checkpoints, safetensors files and ours
(each read by checkpoint.py) load through timm's `checkpoint_filter_fn`; pos_embed is resized bicubically over the
patch grid for another resolution (as the official fine-tuning code does, without antialiasing) and a head of the
wrong size is dropped (fine-tuning).
"""

from __future__ import annotations

from functools import partial

import torch.nn as nn
from timm.layers import DropPath, trunc_normal_
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .archs import ARCHS, DEFAULT_IMG_SIZE, ModelConfig, resolve_name
from .checkpoint import CheckpointError, load_weights

__all__ = ["create_model", "load_checkpoint", "CheckpointError", "ARCHS"]


def _official_init(model: VisionTransformer, drop_path: float) -> None:
    trunc_normal_(model.pos_embed, std=0.02)
    trunc_normal_(model.cls_token, std=0.02)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    # The official stochastic depth rate is the same in every block (timm ramps it linearly from 0).
    for block in model.blocks:
        block.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        block.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()


def _floor_to_patches(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    ph, pw = module.patch_size
    return (x[..., : x.shape[-2] // ph * ph, : x.shape[-1] // pw * pw], *args[1:])


def create_model(
    name: str,
    num_classes: int = 1000,
    img_size: int | None = None,
    drop_path: float = 0.0,
    layer_scale_init: float | None = 1e-4,
    checkpoint: str | None = None,
    **overrides,
) -> VisionTransformer:
    """A DeiT III ViT with the official from-scratch init, optionally loading `checkpoint` on top.

    `name`: one of MODEL_NAMES (ours, timm's or the official ones); `img_size` defaults to the resolution a timm name
    carries, else 224. Any size of at least one patch works: like the official code and timm, the patch grid is
    floored (ViT-H/14 at 160 px sees 11 x 11 patches; the stride-14 convolution never reads the last 6 pixels).
    `layer_scale_init=None` builds the blocks without LayerScale (timm's init_values=None), for ablations."""
    arch, implied = resolve_name(name)
    img_size = img_size or implied or DEFAULT_IMG_SIZE
    patch, dim, depth, heads = ARCHS[arch]
    if img_size < patch:
        raise ValueError(f"img_size {img_size} is smaller than {name}'s patch size {patch}")
    kwargs = dict(
        img_size=img_size,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        num_classes=num_classes,
        no_embed_class=True,
        class_token=True,
        global_pool="token",
        init_values=layer_scale_init,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    kwargs.update(overrides)
    model = VisionTransformer(**kwargs)
    if kwargs.get("dynamic_img_size"):
        # timm's dynamic size asserts that the input is a multiple of the patch; the official floor (the strided
        # convolution never reads the leftover pixels) is the same as cropping them off first.
        model.patch_embed.register_forward_pre_hook(_floor_to_patches)
    _official_init(model, drop_path)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model


def build_model(section: ModelConfig, img_size: int, *, train: bool = True, **overrides) -> VisionTransformer:
    """The config's `model` section made into its model at `img_size`: for training (`train`) with its drop-path
    rate and its `checkpoint` loaded; for evaluation without either (drop-path is off in eval mode anyway, and the
    weights to score are the caller's)."""
    if not isinstance(section.num_classes, int):
        raise ValueError("model.num_classes is still 'auto': resolve it from the data first (resolve_num_classes)")
    return create_model(
        section.name,
        num_classes=section.num_classes,
        img_size=img_size,
        drop_path=section.drop_path if train else 0.0,
        layer_scale_init=section.layer_scale_init,
        checkpoint=section.checkpoint if train else None,
        **overrides,
    )


def load_checkpoint(model: VisionTransformer, path: str) -> list[str]:
    """Load the weights of any file checkpoint.py reads (ours, official, timm, safetensors) for fine-tuning or
    evaluation; returns the keys left at their init (a dropped head)."""
    return load_state(model, load_weights(path), path)


def load_state(model: VisionTransformer, state: dict, path: str) -> list[str]:
    """Fit `state` (read from `path`, which messages name) into `model`: official layouts mapped to timm's, pos_embed
    resized, a head of another size dropped; returns the keys left at their init."""
    state = checkpoint_filter_fn(state, model, adapt_layer_scale=True, antialias=False)
    own = model.state_dict()
    dropped = [k for k in ("head.weight", "head.bias") if k in state and state[k].shape != own[k].shape]
    for k in dropped:
        del state[k]
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong:
        raise CheckpointError(f"checkpoint {path} does not fit {type(model).__name__}: {'; '.join(wrong[:3])}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (is it the right model name?)"
        )
    return dropped

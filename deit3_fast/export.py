"""`deit3-fast export CHECKPOINT OUT_DIR`: weights any timm user can load. From any file checkpoint.py reads (a run's
checkpoint-*.pt, its EMA with `--ema`, an official DeiT III .pth, a timm file, a .safetensors file) it writes
`OUT_DIR/model.safetensors` (timm's state-dict layout) and `OUT_DIR/config.json` in timm's pretrained-config form
(the architecture name and arguments, class count, and the data settings of the run: input size, mean/std,
interpolation, crop ratio, under the tag `deit3_fast`). It prints the call that loads them from any directory:

    timm.create_model("deit3_small_patch16_224", pretrained=True,
                      pretrained_cfg=dict(file="/abs/OUT_DIR/model.safetensors", input_size=(3, 224, 224), ...))

which gives the same logits, and a model whose `pretrained_cfg` (what `timm.data.resolve_model_data_config`
reads) is the run's, not that of Meta's weights of the same name. A timm that knows `local-dir:` sources also
loads `timm.create_model("local-dir:/abs/OUT_DIR", pretrained=True)`. Every architecture the trainer builds
exports: those without a timm name of their own (deit3_cifar, deit3_micro, deit3_nano), and models without
LayerScale, as timm's DeiT III builder with their arguments.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path

from .archs import ARCHS, TIMM_NAMES, resolve_name
from .checkpoint import CheckpointError, read_weights, run_config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TAG = "deit3_fast"  # the pretrained tag of an export: these weights are not the ones timm's own tags name
GENERIC = "deit3_small_patch16_224"  # timm's DeiT III builder, for an architecture timm has no name for


def timm_architecture(arch: str, img_size: int, layer_scale: bool = True) -> tuple[str, dict]:
    """timm's model name for our architecture, and the model arguments it needs: img_size where timm has no name
    for the resolution (the 192-px pre-training checkpoints), the shape of ours that timm has no name for
    (deit3_cifar, deit3_micro, deit3_nano: timm's DeiT III builder takes them as arguments), and init_values=0.0
    for a model without LayerScale."""
    patch, dim, depth, heads = ARCHS[arch]
    size = arch.removeprefix("deit3_")
    name, args = f"deit3_{size}_patch{patch}_{img_size}", {}
    if name not in TIMM_NAMES:
        name = f"deit3_{size}_patch{patch}_224"
        if name not in TIMM_NAMES:
            name, args = GENERIC, {"patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": heads}
        args["img_size"] = img_size
    if not layer_scale:
        # 0.0, not None: timm.create_model drops arguments that are None, and its blocks build LayerScale only for
        # a truthy init_values.
        args["init_values"] = 0.0
    return name, args


def _read(path: str, given: str | None, ema: bool) -> tuple[str, dict, int | None]:
    """(model name, state dict, the image size the file records or None): --model, else the name the file records
    (a run checkpoint's config, an official file's args)."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    weights = read_weights(path, ema=ema)
    name = given or weights.model
    if not name:
        raise CheckpointError(f"{path} does not say which model it holds: give --model (e.g. deit3_small_patch16_224)")
    return name, weights.state, weights.img_size


def export(checkpoint: str, out_dir: str | Path, model: str | None = None, ema: bool = False) -> dict:
    from safetensors.torch import save

    from dataset_tools.atomic import AtomicOutput

    from .models import create_model, load_state

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder: give a folder for model.safetensors and config.json")
    name, state, run_img_size = _read(checkpoint, model, ema)
    try:
        arch = resolve_name(name)[0]
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if "head.weight" not in state or "pos_embed" not in state:
        raise CheckpointError(f"{checkpoint}: not a ViT state dict (no head.weight / pos_embed)")
    num_classes = state["head.weight"].shape[0]
    # The resolution where the checkpoint says it (a run's config, an official file's args): the patch grid is
    # floored (ViT-H/14 at 160 px: 11 x 11), so the grid alone gives 154.
    img_size = run_img_size or int(math.isqrt(state["pos_embed"].shape[1])) * ARCHS[arch][0]
    # LayerScale where the weights have it (ours: ls1.gamma; official: gamma_1): the ablation trains without.
    layer_scale = any(k.endswith(("ls1.gamma", "gamma_1")) for k in state)
    net = create_model(arch, num_classes=num_classes, img_size=img_size, layer_scale_init=1e-4 if layer_scale else None)
    if ema:
        net.load_state_dict(state)  # our own layout, at the run's size
    else:
        load_state(net, state, checkpoint)
    timm_name, model_args = timm_architecture(arch, img_size, layer_scale)
    # The data settings the run evaluated with (its config), else the official ones (DeiT III: crop ratio 1.0).
    aug = (run_config(checkpoint) or {}).get("aug") or {}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {out}: {e.strerror or e}") from None
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    config = {
        "architecture": timm_name,
        "num_classes": num_classes,
        "num_features": ARCHS[arch][1],
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": TAG,
            "custom_load": False,
            "input_size": [3, img_size, img_size],
            "fixed_input_size": True,
            "interpolation": "bicubic",  # every engine resizes with Pillow's bicubic (pipelines/)
            "crop_pct": float(aug.get("eval_crop_ratio", 1.0)),
            "crop_mode": "center",
            "mean": [float(v) for v in aug.get("mean", MEAN)],
            "std": [float(v) for v in aug.get("std", STD)],
            "num_classes": num_classes,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
    weights = None
    try:
        with ExitStack() as stack:
            weights = stack.enter_context(AtomicOutput(str(out / "model.safetensors")))
            described = stack.enter_context(AtomicOutput(str(out / "config.json")))
            with open(weights.path, "wb") as f:
                f.write(save(tensors, metadata={"format": "pt"}))
            described.write_text(json.dumps(config, indent=1) + "\n")
            # Both written and prepared before either replaces an earlier export's file: a failure (a full disk) leaves
            # that export whole, and never weights beside a config.json that describes other ones.
            weights.prepare()
            described.prepare()
            weights.commit()
            described.commit()
    except OSError as e:
        replaced = (
            "model.safetensors was replaced, config.json was not"
            if weights and weights.committed
            else "no file there was replaced"
        )
        raise CheckpointError(f"writing the export into {out} failed: {e.strerror or e}; {replaced}") from None
    return {
        "out": str(out.resolve()),
        "architecture": timm_name,
        "num_classes": num_classes,
        "img_size": img_size,
        "weights": "ema" if ema else "model",
        "load_with": load_call(out, config),
    }


def load_call(out: Path, config: dict) -> str:
    """The timm.create_model call that loads an export from any directory (absolute paths) with any timm 1.x: a
    whole pretrained_cfg replaces timm's registered one (Meta's weights, input 224, crop 0.9), so the loaded
    model's data config is the run's; with fixed_input_size, timm takes img_size from its input_size."""
    pretrained = {"file": str((out / "model.safetensors").resolve()), **config["pretrained_cfg"]}
    pretrained = {k: tuple(v) if isinstance(v, list) else v for k, v in pretrained.items() if v is not None}
    return (
        f"timm.create_model({config['architecture']!r}, pretrained=True, pretrained_cfg=dict("
        + ", ".join(f"{k}={v!r}" for k, v in pretrained.items())
        + ")"
        + "".join(f", {k}={v!r}" for k, v in config["model_args"].items())
        + ")"
    )

"""`deit3-fast export CHECKPOINT OUT_DIR`: weights any timm user can load. From any file checkpoint.py reads (a run's
checkpoint-*.pt, its EMA with `--ema`, an official DeiT III .pth, a timm file, a .safetensors file) it writes
`OUT_DIR/model.safetensors` (timm's state-dict layout) and `OUT_DIR/config.json` in timm's pretrained-config form
(the architecture name, class count, input size, mean/std, interpolation, crop). Then

    timm.create_model("deit3_small_patch16_224", pretrained=True,
                      pretrained_cfg_overlay=dict(file="OUT_DIR/model.safetensors", num_classes=N))

gives the same logits (`num_classes` only where it is not 1000: timm drops a head of another size).
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path

from .archs import ARCHS, TIMM_NAMES, resolve_name
from .checkpoint import CheckpointError, read_weights

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def timm_architecture(arch: str, img_size: int) -> tuple[str, dict]:
    """timm's model name for our architecture, and the model arguments it needs (img_size where timm has no
    name for the resolution, e.g. the 192-px pre-training checkpoints)."""
    patch = ARCHS[arch][0]
    size = arch.removeprefix("deit3_")
    exact = f"deit3_{size}_patch{patch}_{img_size}"
    if exact in TIMM_NAMES:
        return exact, {}
    base = f"deit3_{size}_patch{patch}_224"
    if base not in TIMM_NAMES:
        raise CheckpointError(
            f"timm has no DeiT III model for {arch}: export supports small, medium, base, large and huge"
        )
    return base, {"img_size": img_size}


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
    net = create_model(arch, num_classes=num_classes, img_size=img_size)
    if ema:
        net.load_state_dict(state)  # our own layout, at the run's size
    else:
        load_state(net, state, checkpoint)
    timm_name, model_args = timm_architecture(arch, img_size)
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
            "tag": "deit3_fast",
            "custom_load": False,
            "input_size": [3, img_size, img_size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(MEAN),
            "std": list(STD),
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
        "out": str(out),
        "architecture": timm_name,
        "num_classes": num_classes,
        "img_size": img_size,
        "weights": "ema" if ema else "model",
        "load_with": (
            f"timm.create_model({timm_name!r}, pretrained=True, pretrained_cfg_overlay=dict(file="
            f"{str(out / 'model.safetensors')!r}"
            + (f", num_classes={num_classes}" if num_classes != 1000 else "")
            + ")"
            + "".join(f", {k}={v!r}" for k, v in model_args.items())
            + ")"
        ),
    }

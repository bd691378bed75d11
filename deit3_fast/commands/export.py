"""`deit3-fast export`: weights that timm.create_model loads (export.py writes them)."""

from __future__ import annotations

import json

NAME = "export"
HELP = "write model.safetensors + config.json that timm.create_model loads"
DESCRIPTION = (
    "From a run checkpoint (or its EMA), an official DeiT III .pth or a timm file, write "
    "OUT_DIR/model.safetensors and OUT_DIR/config.json (timm's pretrained-config form); prints the "
    "timm.create_model call that loads them."
)


def add_arguments(x) -> None:
    x.add_argument("checkpoint", metavar="CHECKPOINT", help="a run's checkpoint-*.pt, an official .pth or a timm file")
    x.add_argument("out", metavar="OUT_DIR", help="folder for model.safetensors and config.json")
    x.add_argument("--ema", action="store_true", help="export the EMA weights of a run checkpoint")
    x.add_argument("--model", help="model name, where the checkpoint does not say (an official .pth does)")


def run(args) -> int:
    from ..export import export

    print(json.dumps(export(args.checkpoint, args.out, model=args.model, ema=args.ema)))
    return 0

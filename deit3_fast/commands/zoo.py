"""`deit3-fast zoo`: the model-zoo table on this machine (zoo.py measures it)."""

from __future__ import annotations

import json

NAME = "zoo"
HELP = "the model-zoo table on this machine: params, GFLOPs, img/s, peak memory"
DESCRIPTION = (
    "For every DeiT III model at its resolutions: parameters and GFLOPs (multiply-adds, the paper's "
    "convention), checked against the official table, then inference throughput and peak memory (batch "
    "256 with AMP on a GPU) next to the official V100 figures. On a CPU the counts are exact and the "
    "timings are CPU timings (batch 8)."
)


def add_arguments(z) -> None:
    z.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    z.add_argument("--no-timing", action="store_true", help="counts only (seconds on any machine)")
    z.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    z.add_argument("--batch", type=int, help="timing batch (256 on a GPU, 8 on a CPU)")
    z.add_argument("--steps", type=int, default=10, help="timed batches per model on a GPU (10)")
    z.add_argument("--models", nargs="+", metavar="MODEL", help="only these models' rows (e.g. deit3_small)")


def run(args) -> int:
    from ..device import pick_device
    from ..zoo import render, zoo

    result = zoo(
        pick_device(args.device),
        timings=not args.no_timing,
        batch=args.batch,
        steps=max(1, args.steps),
        models=args.models,
    )
    if args.json:
        print(json.dumps(result))
    else:
        render(result)
    return 0

"""`deit3-fast eval`: top-1/top-5 of a checkpoint on one or more validation sets (evalsets.py does the work)."""

from __future__ import annotations

import json

from ..config import ConfigError, load_config, resolve_num_classes
from ._common import add_cfg_args
from ._common import overrides as _overrides
from ._common import process_device as _device

NAME = "eval"
HELP = "top-1/top-5 of a checkpoint on a validation .beton (prints JSON)"
DESCRIPTION = (
    "Evaluate a checkpoint. A run's own (RUN_DIR, its checkpoint-best.pt, or --checkpoint RUN_DIR/checkpoint-*.pt) "
    "is evaluated with the config it carries, on the run's validation set unless --data-val or --val names "
    "others; --cfg, --model and --set override it. Any other file needs a recipe (--cfg), a model name (--model: "
    "ours, timm's such as deit3_base_patch16_384, whose suffix sets the resolution, or the official "
    "deit_base_patch16_LS), or both (--model then overrides the recipe's model)."
)


def add_arguments(e) -> None:
    e.add_argument("run", nargs="?", metavar="RUN_DIR", help="a run dir: its checkpoint-best.pt, with its config")
    add_cfg_args(e, data_train=False, cfg_required=False)
    e.add_argument("--model", help="model name (overrides model.name; a timm name's resolution sets aug.img_size)")
    e.add_argument("--checkpoint", help="checkpoint-*.pt of a run, an official .pth or a timm file")
    e.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a run checkpoint")
    e.add_argument(
        "--val",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a named validation set (repeatable): in1k, v2, a / imagenet-a and r / imagenet-r (scored over "
        "their 200 classes), or any name; prints a table and JSON",
    )
    e.add_argument(
        "--real",
        metavar="REAL_JSON",
        help="also score the IN-1k validation set (in1k, or --data-val) with ReaL's labels (real.json)",
    )
    e.add_argument(
        "--save-predictions",
        metavar="FILE",
        help="write one JSON line per sample: set, index, source file, label, top-5 and their probabilities, with "
        "class names where the set's conversion report (or the run's training data) has them",
    )


def checkpoint_of(args) -> str:
    """The checkpoint to score: --checkpoint, or RUN_DIR's best (its last where it has no best yet)."""
    from pathlib import Path

    from ..checkpoint import BEST, LAST

    if args.run and args.checkpoint:
        raise ConfigError("give a RUN_DIR or --checkpoint, not both")
    if args.checkpoint:
        return args.checkpoint
    if not args.run:
        raise ConfigError("nothing to evaluate: give a RUN_DIR or --checkpoint FILE")
    run = Path(args.run)
    if run.is_file():
        return str(run)
    for name in (BEST, LAST):
        if (run / name).is_file():
            return str(run / name)
    raise ConfigError(f"{run}: no run dir with a checkpoint ({BEST} or {LAST})")


def run(args) -> int:
    from .. import distributed as dist  # torch: imported when the command runs, not when it is parsed
    from ..evalsets import EvalSet, evaluate_checkpoint, load_real, parse_sets, real_set, render, save_predictions

    from ..checkpoint import run_config

    checkpoint = checkpoint_of(args)
    recorded = run_config(checkpoint) if not args.cfg else None  # a run's checkpoint carries its config
    if not args.cfg and not args.model and recorded is None:
        raise ConfigError(
            f"{checkpoint} is not a deit3-fast run's checkpoint (it carries no config): eval needs --cfg RECIPE or "
            "--model NAME (or both)"
        )
    cfg = resolve_num_classes(load_config(args.cfg, _overrides(args), base=recorded))
    sets = parse_sets(args.val)
    if cfg.data.val and (not sets or args.data_val):
        if any(s.name == "val" for s in sets):
            raise ConfigError("validation set 'val' is --data-val's name: give the other set another name")
        sets.insert(0, EvalSet("val", cfg.data.val))
    if not sets:
        raise ConfigError("nothing to evaluate: give --data-val PATH or --val NAME=PATH (repeatable)")
    real = load_real(args.real) if args.real else None
    if args.save_predictions:
        from dataset_tools.atomic import check_writable

        problem = check_writable(args.save_predictions)
        if problem:
            raise ConfigError(f"--save-predictions: cannot write {args.save_predictions}: {problem}")
    real_set(sets, real)  # before a device or a model is set up
    results, predictions = evaluate_checkpoint(
        cfg,
        checkpoint,
        sets,
        _device(args.device),
        ema=args.ema,
        real=real,
        keep=bool(args.real or args.save_predictions),
    )
    if not dist.is_main():
        return 0
    if args.save_predictions:
        save_predictions(args.save_predictions, predictions)
    if len(results) == 1 and "val" in results:  # the plain form: one line, as before named sets existed
        print(json.dumps(results["val"]))
        return 0
    render(results)
    print(json.dumps({"sets": results}))
    return 0

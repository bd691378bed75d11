"""`deit3-fast profile`: input- or compute-bound, and `--tune` (profile.py and tune.py do the work)."""

from __future__ import annotations

import json

from ..config import ConfigError, load_config
from ._common import add_cfg_args
from ._common import overrides as _overrides

NAME = "profile"
HELP = "input- or compute-bound? loader, model and end-to-end throughput, MFU"
DESCRIPTION = (
    "Measures the loader alone (decode + crop, then the batch augmentation), the model step alone "
    "on synthetic batches already on the device (img/s, TFLOP/s, MFU against this device's measured matmul "
    "peak) and the real end-to-end step, each several times (median and spread); prints a table and a verdict "
    "naming the slowest stage and what to change. Numbers that cannot be (end to end faster than the model "
    "alone, MFU of 100% or more) are measured again, then reported as a failed measurement with no verdict and "
    "exit status 1."
)


def add_arguments(f) -> None:
    add_cfg_args(f)
    f.add_argument("--steps", type=int, default=20, help="timed batches per measurement (20)")
    f.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    f.add_argument(
        "--tune",
        action="store_true",
        help="try engines, data.workers, data.os_cache and train.compile; write the setting with the fastest "
        "measured end-to-end rate as an override YAML for --overrides",
    )
    f.add_argument("--budget-s", type=float, default=300.0, help="with --tune: time to spend (300 s)")
    f.add_argument("--tune-out", default="tuned.yaml", help="with --tune: the override file (tuned.yaml)")


def run(args) -> int:
    from ..device import pick_device
    from ..profile import as_json, profile, render

    if args.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {args.steps}")
    cfg = load_config(args.cfg, _overrides(args))
    if args.tune:
        from ..tune import tune, write_overrides

        if args.budget_s <= 0:
            raise ConfigError(f"--budget-s must be positive, got {args.budget_s}")
        log = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
        tuned = tune(cfg, pick_device(args.device), budget_s=args.budget_s, steps=args.steps, log=log)
        write_overrides(tuned, args.tune_out)
        if args.json:
            print(json.dumps(tuned))
        else:
            print(
                f"best: {tuned['overrides']} -> {args.tune_out} (use --overrides {args.tune_out}); "
                f"{len(tuned['tried'])} settings in {tuned['seconds']:.0f} s of {args.budget_s:.0f}"
            )
        return 0
    result = profile(cfg, pick_device(args.device), steps=args.steps)
    if args.json:
        print(as_json(result))
    else:
        render(result)
    # The verdict is what this command is for: numbers too implausible to give one are a failure, not a result.
    return 1 if result["measurement_failed"] else 0

"""`deit3-fast train`: train (or resume) a recipe in one process, or one per GPU under torchrun."""

from __future__ import annotations

import json
from pathlib import Path

from .. import rundir
from ..config import load_config, to_dict
from ._common import add_cfg_args
from ._common import overrides as _overrides
from ._common import process_device as _device

NAME = "train"
HELP = "train (or resume) a recipe"
DESCRIPTION = (
    "Train a recipe. The run dir gets config.yaml, metrics.jsonl, checkpoint-last.pt, checkpoint-best.pt "
    "and curves.png."
)


def add_arguments(t) -> None:
    add_cfg_args(t)
    t.add_argument(
        "--out", help="run dir (default: runs/<config name>); one that holds a run is continued only with --resume"
    )
    t.add_argument("--epochs", type=int, help="overrides schedule.epochs")
    t.add_argument("--resume", metavar="DIR|FILE|auto", help="continue from a checkpoint; auto: the run dir's last")
    t.add_argument("--force", action="store_true", help="resume even if the config differs from the checkpoint's")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit")
    t.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def run(args) -> int:
    from .. import distributed as dist  # torch: imported when the command runs, not when it is parsed
    from ..trainer import train

    cfg = load_config(args.cfg, _overrides(args))
    if args.dry_run:
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    out = args.out or str(Path("runs") / Path(args.cfg).stem)
    device = _device(args.device)
    history = train(cfg, out, device, resume=args.resume, force=args.force, quiet=args.quiet, handle_sigterm=True)
    # No epoch left to train: the run was finished, and its last epoch's numbers are the run's.
    last = (history or rundir.read_metrics(Path(out)) or [{}])[-1]
    if dist.is_main():
        summary = {
            "out": out,
            "epochs_run": len(history),
            "val_acc1": last.get("val_acc1"),
            "val_acc5": last.get("val_acc5"),
            "world_size": dist.world(),
        }
        if not history:
            summary["finished"] = True
        print(json.dumps(summary))
    return 0

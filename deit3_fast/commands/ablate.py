"""`deit3-fast ablate`: a grid of recipe variants on short schedules (the ablate package runs and tabulates it)."""

from __future__ import annotations

from ._common import add_grid_submit_args

NAME = "ablate"
HELP = "run a grid of recipe variants on short schedules and tabulate them"
DESCRIPTION = (
    "Runs every variant of a grid file (a base config, override sets and/or a product over config keys) "
    "one after another, or each as a submitit job with --submit; skips finished variants and resumes an "
    "interrupted one; writes results.csv, results.md and curves.png to --out. The grid format is in "
    "deit3_fast/ablate/__init__.py and docs/training.md#grid-files."
)


def add_arguments(a) -> None:
    a.add_argument("--grid", required=True, help="grid YAML path, or a name in configs/ablations/ (cifar10_grid)")
    a.add_argument("--out", help="run dirs and results (default: runs/ablate/<grid name>)")
    a.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for every variant, after the grid's own sets (repeatable)",
    )
    a.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    a.add_argument(
        "--dry-run",
        action="store_true",
        help="check every variant's data and batch, list the variants and their overrides (with --submit: the jobs), "
        "and exit",
    )
    a.add_argument("--collect", action="store_true", help="only write the results from the run dirs; run nothing")
    a.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    add_grid_submit_args(a, "variant")


def run(args) -> int:
    from ..ablate import run_grid

    return run_grid(args)

"""`deit3-fast compare`: runs against each other and the official curve (compare.py builds the table and plot)."""

from __future__ import annotations

import json
import sys

from ._common import check_image_out as _image_out

NAME = "compare"
HELP = "runs against each other and the official curve: table, JSON, plot"
DESCRIPTION = (
    "An epoch-aligned table of validation top-1 for each run dir (ablation variants too) and the official "
    "curve of the recipe they follow (or --reference NAME), with each run's gap; --out writes the plot."
)


def add_arguments(c) -> None:
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run dirs (a train --out, an ablation's variants)")
    c.add_argument("--reference", help="official curve to compare with (a recipe name; none for no curve)")
    c.add_argument("--json", action="store_true", help="print every row as JSON instead of the table")
    c.add_argument("--out", help="write the plot here (PNG)")


def run(args) -> int:
    from ..compare import compare, plot, render

    _image_out(args.out)
    result = compare(args.runs, args.reference)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "shown"}))
    else:
        render(result)
    if result["note"]:
        print(f"compare: {result['note']}", file=sys.stderr)
    if args.out and not plot(result, args.out):
        print(f"compare: no run has finished an epoch yet: no plot written to {args.out}", file=sys.stderr)
    return 0

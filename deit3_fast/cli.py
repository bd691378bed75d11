"""`deit3-fast` command line. Subcommands are added as the trainer grows; each lives in its own module."""
from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deit3-fast", description="DeiT III training at GPU speed.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    q = sub.add_parser("quickstart", help="generate a small data set, convert it, and check the result (CPU, ~1 min)",
                       description="The embedded default job: a generated 10-class ImageFolder is converted into "
                       "train/val .beton files with deit3-convert, and both are inspected.")
    q.add_argument("--out", default="runs/quickstart", help="where data and outputs go (runs/quickstart)")
    q.add_argument("--classes", type=int, default=10)
    q.add_argument("--train-per-class", type=int, default=60)
    q.add_argument("--val-per-class", type=int, default=20)
    q.add_argument("--workers", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "quickstart":
        from .quickstart import run_quickstart

        return run_quickstart(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())

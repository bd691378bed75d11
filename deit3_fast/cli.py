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
    v = sub.add_parser("preview", help="save a grid of augmented training samples as a PNG",
                       description="Runs the real training loader on --data-train and saves one batch as the model "
                       "sees it (after crop, flip, 3-Augment, colour jitter and, unless --no-mix, mixup/cutmix), "
                       "each sample captioned with its 3-Augment branch and its positive classes.")
    v.add_argument("--cfg", required=True, help="recipe name (configs/) or YAML path")
    v.add_argument("--data-train", help="the .beton to preview (default: the config's data.train)")
    v.add_argument("--out", default="preview.png")
    v.add_argument("--n", type=int, default=32, help="samples in the grid (even; 32)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--no-mix", action="store_true", help="show the samples before mixup/cutmix")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    return p


def _preview(args) -> int:
    from pipelines import build_loader
    from pipelines.preview import make_preview

    from .config import load_config

    sets = [*args.set, f"data.batch_size={args.n}", "data.repeats=1", f"data.seed={args.seed}", "train.amp=fp32"]
    if args.data_train:
        sets.append(f"data.train={args.data_train}")
    if args.no_mix:
        sets += ["aug.mixup=0", "aug.cutmix=0"]
    cfg = load_config(args.cfg, sets)
    info = make_preview(build_loader(cfg, "train", "cpu"), cfg.aug.mean, cfg.aug.std, args.out)
    print(f"wrote {info['path']}: {info['samples']} samples, branches {info['branches']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipelines import DataError

    from .config import ConfigError

    try:
        if args.command == "quickstart":
            from .quickstart import run_quickstart

            return run_quickstart(args)
        if args.command == "preview":
            return _preview(args)
    except (ConfigError, DataError) as e:
        print(f"deit3-fast: error: {e}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())

"""`deit3-fast quickstart`: the embedded default job (quickstart.py runs it)."""

from __future__ import annotations

NAME = "quickstart"
HELP = "the embedded default job: convert, train and evaluate on CPU (minutes)"
DESCRIPTION = (
    "Generates a small 10-class ImageFolder, converts train/val with deit3-convert, inspects both, trains a "
    "tiny DeiT III ViT with the recipe (configs/quickstart.yaml) and evaluates it."
)


def add_arguments(q) -> None:
    q.add_argument("--out", default="runs/quickstart", help="where data and outputs go (runs/quickstart)")
    q.add_argument("--classes", type=int, default=10, help="classes of the generated data set (10)")
    q.add_argument("--train-per-class", type=int, default=60, help="generated training images per class (60)")
    q.add_argument("--val-per-class", type=int, default=20, help="generated validation images per class (20)")
    q.add_argument("--workers", type=int, default=None, help="deit3-convert's writer processes (all cores)")
    q.add_argument("--epochs", type=int, default=None, help="overrides the quickstart recipe's epochs")


def run(args) -> int:
    from ..quickstart import run_quickstart

    return run_quickstart(args)

"""The official training curves (`configs/reference/official-curves.csv`: the DeiT III logs' validation top-1 every
5 epochs), and whether a run follows one of them.

The curves' epoch e is the accuracy after e epochs: they run from 0 (before training: chance, or the starting
checkpoint's accuracy when fine-tuning) to the recipe's epoch count. Our metrics' `epoch` k is 0-based, the accuracy
after k + 1 epochs, so row k is compared with the official point k + 1.

A run follows a recipe when every key that defines what it computes equals the recipe's: the model (but its
checkpoint and class count), the augmentation, the optimiser, the schedule, the loss, the global batch and the
repeated augmentation. Where the data lives, the engine, the per-GPU split of the batch and the logging do not
matter. `train.reference: auto` finds the recipe, a recipe name forces one, `none` turns the comparison off.
"""

from __future__ import annotations

import csv
from functools import cache

from .config import CONFIG_DIR, Config, ConfigError, load_config, to_dict

CURVES_CSV = CONFIG_DIR / "reference" / "official-curves.csv"


@cache
def _curves() -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    with open(CURVES_CSV) as f:
        for r in csv.DictReader(f):
            out.setdefault(r["recipe"], {})[int(r["epoch"])] = float(r["val_acc1"])
    return out


def recipes() -> list[str]:
    return sorted(_curves())


def official_curve(name: str) -> dict[int, float]:
    """{epochs completed: official val top-1 (%)} of a recipe."""
    curves = _curves()
    if name not in curves:
        raise ConfigError(f"no official curve named {name!r} (known: {', '.join(sorted(curves))})")
    return curves[name]


def _defining(cfg: dict) -> dict:
    model = {k: v for k, v in cfg["model"].items() if k not in ("checkpoint", "num_classes")}
    return {
        "model": model,
        "aug": cfg["aug"],
        "optim": cfg["optim"],
        "schedule": cfg["schedule"],
        "loss": cfg["loss"],
        "global_batch": cfg["train"]["global_batch"],
        "repeats": cfg["data"]["repeats"],
    }


def follows(cfg: Config) -> str | None:
    """The shipped recipe this config computes the same run as, or None."""
    mine = _defining(to_dict(cfg))
    return next((name for name in recipes() if _defining(to_dict(load_config(name))) == mine), None)


def resolve(cfg: Config) -> str | None:
    """train.reference for this run: auto -> the followed recipe (or None), none -> None, a name -> that name."""
    choice = cfg.train.reference
    if choice == "none":
        return None
    if choice == "auto":
        return follows(cfg)
    official_curve(choice)  # a wrong name fails before training
    return choice


class Gap:
    """The run against its official curve, epoch by epoch: adds `official_acc1` and `gap` (points, run minus
    official) to rows at official epochs, and says once when the run has been more than `tolerance` points behind
    at two consecutive official points."""

    def __init__(self, name: str, tolerance: float, history: list[dict] = ()):
        self.name, self.tolerance, self.curve = name, tolerance, official_curve(name)
        self.behind, self.warned = 0, False
        for row in history:  # a resumed run continues the count (and does not warn twice)
            if row.get("gap") is not None:
                self._count(row["gap"])

    def _count(self, gap: float) -> bool:
        self.behind = self.behind + 1 if gap < -self.tolerance else 0
        if self.behind >= 2 and not self.warned:
            self.warned = True
            return True
        return False

    def update(self, row: dict) -> str | None:
        """Annotate `row` (epoch, val_acc1); returns the warning to print, once."""
        official = self.curve.get(row["epoch"] + 1)
        if official is None or row.get("val_acc1") is None:
            return None
        row["official_acc1"], row["gap"] = official, row["val_acc1"] - official
        if self._count(row["gap"]):
            return (
                f"warning: {row['gap']:+.1f} points behind the official {self.name} curve at two official "
                f"epochs in a row (tolerance {self.tolerance}; now {row['val_acc1']:.2f} vs {official:.2f} at "
                f"epoch {row['epoch'] + 1}). Check the data (deit3-fast preview), the batch arithmetic and the "
                f"config against the recipe before spending the remaining epochs."
            )
        return None

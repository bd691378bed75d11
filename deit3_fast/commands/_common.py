"""What several commands share: the recipe options (`--cfg`, `--set`, `--overrides`, ...) and their translation into
config overrides, the process's device, and the check of an image path given to `--out`.

Torch-free at import, as every command module must be (`--help` imports them all).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.registry import ENGINES

from ..archs import resolve_name
from ..config import ConfigError


def add_cfg_args(p: argparse.ArgumentParser, data_train: bool = True, cfg_required: bool = True) -> None:
    p.add_argument("--cfg", required=cfg_required, help="recipe name in configs/ (e.g. vit_s_in1k) or a YAML path")
    if data_train:
        p.add_argument("--data-train", help="training .beton (overrides data.train)")
    p.add_argument("--data-val", help="validation .beton (overrides data.val)")
    p.add_argument("--engine", choices=ENGINES, help="loader engine (overrides data.engine)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument(
        "--overrides",
        metavar="FILE",
        help="a YAML of config overrides (as profile --tune writes), applied before any --set",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, repeatable (e.g. --set optim.lr=1e-3)",
    )


def _flatten(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v)}")  # JSON is YAML: lists, true/false, null survive
    return out


def overrides(args) -> list[str]:
    """The `--set` list the recipe options of `add_cfg_args` (and `--model`, `--epochs`) stand for, in the order they
    apply: the --overrides file, the model and the resolution it implies, --set, then the single-key flags."""
    sets = []
    if getattr(args, "overrides", None):
        import yaml

        try:
            tree = yaml.safe_load(Path(args.overrides).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"--overrides {args.overrides}: unreadable ({str(e).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"--overrides {args.overrides}: expected a mapping of config sections")
        sets += _flatten(tree)
    model = getattr(args, "model", None)
    if model:  # first, so that an explicit --set still wins
        sets.append(f"model.name={model}")
        try:
            implied = resolve_name(model)[1]
        except ValueError:
            implied = None  # the config check names the valid models
        if implied:
            sets.append(f"aug.img_size={implied}")
    sets += list(args.set)
    for flag, key in (
        ("data_train", "data.train"),
        ("data_val", "data.val"),
        ("engine", "data.engine"),
        ("epochs", "schedule.epochs"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{key}={value}")
    return sets


def process_device(name: str | None):
    """This process's device: torchrun's (one process per GPU) or --device / the default."""
    from .. import distributed as dist  # torch: when a command runs, not when it is parsed
    from ..device import pick_device

    return dist.init_from_env(name) or pick_device(name)


def check_image_out(path: str | None, flag: str = "--out") -> None:
    """A plot or picture path whose format is known by its suffix, checked before the work that fills it."""
    if path and Path(path).suffix.lower() not in (".png", ".jpg", ".jpeg", ".pdf", ".svg", ".webp"):
        raise ConfigError(f"{flag} {path}: name an image file (.png, .jpg, .pdf, .svg)")


def add_grid_submit_args(a: argparse.ArgumentParser, unit: str, also: str = "") -> None:
    """`--submit/--local/--resubmit` and the Slurm options of a command that runs a grid through ablate's machinery
    (ablate, parity): one job per unfinished `unit` (variant, run)."""
    from ..submit import add_slurm_args

    g = a.add_argument_group(f"Slurm through submitit (one job per unfinished {unit}{also})")
    g.add_argument("--submit", action="store_true", help=f"submit the {unit}s instead of running them here")
    g.add_argument("--local", action="store_true", help="with --submit: submitit's local executor, one job at a time")
    g.add_argument("--resubmit", action="store_true", help=f"with --submit: also {unit}s that already have a job")
    add_slurm_args(g)

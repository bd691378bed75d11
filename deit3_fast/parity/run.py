"""`deit3-fast parity`: the variants x seeds as an ablation grid, run by `ablate`'s machinery, then the verdict.

OUT holds `parity-plan.json` (what was asked: recipe, variants, seeds, baseline), `parity-grid.yaml` (the grid it
stands for, an ordinary ablate grid: `deit3-fast ablate --grid OUT/parity-grid.yaml` runs the same runs), one run
dir per variant and seed (`OUT/ffcv@max256,seed=1`), ablate's results.csv/md and curves.png, and parity.md/.json.
Everything ablate promises holds: finished runs are skipped, an interrupted one resumes, `--submit` sends each run
to Slurm as its own job, and a run dir of a different config is refused.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
import tempfile
from pathlib import Path

import yaml

from dataset_tools.atomic import write_text_atomic

from ..ablate import execute, load_grid, write_results
from ..ablate.run import check_run_dir
from ..config import ConfigError, load_config, resolve_path
from . import data
from .report import JSON, MARKDOWN, markdown, write_report
from .variants import FOLDER, ParityVariant, parse_storage, parse_variants

PLAN, GRID = "parity-plan.json", "parity-grid.yaml"


def seeds_of(spec: str) -> list[int]:
    """`--seeds 3` (seeds 0, 1, 2) or an explicit list `--seeds 0,5,7`."""
    try:
        if "," in spec:
            seeds = [int(s) for s in spec.split(",")]
        else:
            n = int(spec)
            if n < 1:
                raise ValueError
            seeds = list(range(n))
    except ValueError:
        raise ConfigError(f"--seeds {spec}: a count (3) or a list of seeds (0,1,2)") from None
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds {spec}: seeds are distinct and non-negative")
    return seeds


def _grid_entries(variants: list[ParityVariant], seeds: list[int], out: Path, folders, val_storage) -> list[dict]:
    entries = []
    for v in variants:
        train, val = data.data_paths(v, out, folders, val_storage)
        for s in seeds:
            # Both seeds: train.seed (model init, mixing, augmentation keys) and data.seed (the sample order).
            entries.append(
                {
                    "name": f"{v.name},seed={s}",
                    "sets": {
                        "data.engine": v.engine,
                        "data.train": train,
                        "data.val": val,
                        "train.seed": s,
                        "data.seed": s,
                    },
                }
            )
    return entries


def plan_from_args(args) -> tuple[dict, list[ParityVariant]]:
    cfg_path = resolve_path(args.cfg)
    storage = parse_storage(args.storage, where="--storage")
    val_storage = parse_storage(args.val_storage, storage, where="--val-storage")
    variants = parse_variants(args.variants, storage)
    if args.baseline not in (v.name for v in variants):
        raise ConfigError(
            f"--baseline {args.baseline}: not among --variants {args.variants} (the baseline is what every "
            "other variant is compared with; the official pipeline is `reference`)"
        )
    sets = list(args.set)
    if args.epochs is not None:
        sets.append(f"schedule.epochs={args.epochs}")
    epochs = load_config(str(cfg_path), sets).schedule.epochs  # also checks the recipe and --set up front
    plan = {
        "cfg": str(cfg_path.resolve()),
        "sets": sets,
        "epochs": epochs,
        "seeds": seeds_of(args.seeds),
        "baseline": args.baseline,
        "storage": storage.name,
        "val_storage": val_storage.name,
        "train_folder": str(Path(args.train_folder).resolve()),
        "val_folder": str(Path(args.val_folder).resolve()),
        "variants": [
            {"name": v.name, "engine": v.engine, "storage": v.storage.name if v.storage else FOLDER} for v in variants
        ],
    }
    return plan, variants


def grid_text(plan: dict, variants: list[ParityVariant], out: Path) -> str:
    folders = data.Folders(Path(plan["train_folder"]), Path(plan["val_folder"]))
    val_storage = parse_storage(plan["val_storage"])
    grid = {
        "base": plan["cfg"],
        "sets": plan["sets"],
        "variants": _grid_entries(variants, plan["seeds"], out, folders, val_storage),
    }
    header = (
        "# Written by deit3-fast parity (the plan: parity-plan.json). The runs of this grid are parity's runs:\n"
        "# `deit3-fast parity --out THIS_FOLDER --collect` writes the verdict from them.\n"
    )
    return header + yaml.safe_dump(grid, sort_keys=False, width=120)


def resolve_grid(plan: dict, variants: list[ParityVariant], out: Path):
    """The grid, resolved and checked against OUT's run dirs before OUT gets the plan: a folder of other runs is
    refused with the plan it holds left as it was."""
    text = grid_text(plan, variants, out)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / GRID).write_text(text)
        grid = load_grid(str(Path(tmp) / GRID))
    for gv in grid.variants:
        check_run_dir(gv, out / gv.name)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / GRID, text)
    write_text_atomic(out / PLAN, json.dumps(plan, indent=1) + "\n")
    grid.path = out / GRID
    return grid


def _read_plan(out: Path) -> dict:
    try:
        return json.loads((out / PLAN).read_text())
    except OSError:
        raise ConfigError(
            f"--collect: {out / PLAN} does not exist (run deit3-fast parity with this --out first)"
        ) from None
    except ValueError:
        raise ConfigError(f"--collect: {out / PLAN} is not the JSON deit3-fast parity writes") from None


def _report(plan: dict, grid, out: Path, as_json: bool) -> None:
    summary = write_report(plan, write_results(grid, out), out)
    if as_json:
        print(json.dumps(summary, indent=1))
    else:
        print(markdown(summary))
        print(f"[parity] wrote {out / MARKDOWN}, {out / JSON} (runs: {out / 'results.md'})")


def run_parity(args) -> int:
    """`deit3-fast parity` (its options: commands/parity.py)."""
    if (args.local or args.resubmit) and not args.submit:
        raise ConfigError("--local and --resubmit go with --submit")
    if args.collect:
        if not args.out:
            raise ConfigError("--collect needs --out (the folder of the parity runs)")
        out = Path(args.out)
        plan = _read_plan(out)
        grid = load_grid(str(out / GRID))
        _report(plan, grid, out, args.json)
        return 0
    if not (args.cfg and args.train_folder and args.val_folder):
        raise ConfigError("parity needs --cfg, --train-folder and --val-folder (or --out DIR --collect)")
    plan, variants = plan_from_args(args)
    out = Path(args.out or Path("runs") / "parity" / Path(plan["cfg"]).stem)
    folders = data.Folders(Path(plan["train_folder"]), Path(plan["val_folder"]))
    val_storage = parse_storage(plan["val_storage"])
    data.class_list(folders)  # both folders exist and hold the same classes, before anything is written
    if args.dry_run:
        for split, st, path in data.needed(variants, out, val_storage):
            cached = " (cached)" if path.exists() else ""
            print(f"convert {split} at {st.name}: {path}{cached}")
        for v in plan["variants"]:
            seeds = ", ".join(map(str, plan["seeds"]))
            where = f"{out}/{v['name']},seed=S"
            print(f"{v['name']}: engine {v['engine']}, storage {v['storage']}, seeds {seeds} -> {where}")
        return 0
    grid = resolve_grid(plan, variants, out)
    # With --json, stdout is the verdict alone: the progress of conversion and training goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        data.prepare(variants, out, folders, val_storage, quiet=args.quiet)
        status = execute(grid, out, args, f"deit3-fast parity --out {shlex.quote(str(out))} --collect")
    if not args.submit or args.local:
        _report(plan, grid, out, args.json)
    return status

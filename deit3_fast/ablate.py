"""`deit3-fast ablate --grid GRID`: does a recipe change help? Short-schedule ablations, one run dir per variant.

A grid file (YAML; `--grid` takes a path or a name in configs/ablations/):

    base: cifar10_deit3              # config name or path: every variant starts from it
    sets:                            # optional: applied to every variant (a mapping, or a list of key=value)
      data.workers: 4
    variants:                        # optional: named override sets; a variant may start from its own config
      - name: deit3
      - name: deit_style
        cfg: cifar10_deit_style
      - name: no_3aug
        sets: {aug.three_augment: false}
    axes:                            # optional: a product over config keys, crossed with `variants` if both given
      schedule.epochs: [30, 100]
      loss: [bce, ce]

A variant is its config + the grid's `sets` + `--set` from the command line + its own sets + its axis values, in
that order (later wins). Names are stable and readable: a named variant keeps its name and each axis adds
`key=value` (the key's last part, the full key when two axes share it), joined by commas, e.g.
`deit3,epochs=30,loss=bce`; the run dir is `OUT/NAME` (OUT defaults to runs/ablate/<grid file stem>). Every
variant is resolved and validated before anything runs: an unknown key, a bad axis, a missing config or a
duplicate name is one ConfigError, and so are (for the variants still to run) a batch that does not divide the
global batch and missing data files.

Epoch budgets: when the overrides change `schedule.epochs` and none sets `schedule.warmup_epochs`, the warm-up is
scaled by the same factor (rounded half up, at least 1 when the config had one). The cosine always spans
schedule.epochs (schedule.py), so a 30-epoch variant is a compressed copy of the 100-epoch schedule.

Resumable: a variant is finished when its run dir has `done.json` (written when all epochs are in metrics.jsonl, or
when the run diverged: that is a result too). Finished variants are skipped; an interrupted one continues from
its checkpoint-last.pt (`resume="auto"`). A variant that crashes gets `failed.json` (the traceback), the grid goes
on and the command exits 1; the next run retries it. SIGTERM (Preempted) and Ctrl-C stop the grid. A run dir
written with a different config is an error, not a silent mix. Each attempt's wall time is appended to
`ablate-attempts.jsonl` (also on Ctrl-C or an exception; a SIGKILLed attempt's time is lost). After every
variant, OUT gets `results.csv`, `results.md` (one row per variant, unrun ones included) and `curves.png` (val
top-1 and train loss against epoch, all variants overlaid).

`--submit` sends each unfinished variant to Slurm as its own submitit job (the parameters of `deit3-fast submit`,
preemption-safe requeue included) and records the job in `ablate-job.json`; a variant with a recorded job is not
submitted again unless `--resubmit`. The jobs write done.json and the attempt times themselves; `--collect` (or
any later run of the command) writes the results from the run dirs. `--local` runs the jobs one after another
through submitit's local executor and writes the results at the end.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import re
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from .submit import TrainJob, submitit

if TYPE_CHECKING:
    from .config import Config

# deit3_fast.config is imported where it is used: it pulls in torch (seconds), and add_parser runs for every
# deit3-fast command line.
ABLATIONS_DIR = Path(__file__).resolve().parent.parent / "configs" / "ablations"
DONE, FAILED, ATTEMPTS, JOB = "done.json", "failed.json", "ablate-attempts.jsonl", "ablate-job.json"
GRID_KEYS = ("base", "sets", "variants", "axes")
VARIANT_KEYS = ("name", "cfg", "sets")


@dataclass
class Variant:
    name: str
    cfg: str                      # config name or path it starts from
    sets: list[str]               # every override, in order, as `key=value` for load_config / the job
    shown: list[str]              # what sets it apart besides its config (its own sets, axes, derived warm-up)
    config: Config = field(repr=False)


@dataclass
class Grid:
    name: str
    path: Path
    base: str | None
    common: list[str]
    variants: list[Variant]


# --- the grid file ---------------------------------------------------------------------------------------------

def _error(message: str) -> Exception:
    from .config import ConfigError

    return ConfigError(message)


def _closest(key: str, options) -> str:
    from .config import _closest

    return _closest(key, options)


def resolve_grid(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    if (ABLATIONS_DIR / stem).is_file():
        return ABLATIONS_DIR / stem
    known = sorted(q.stem for q in ABLATIONS_DIR.glob("*.yaml")) if ABLATIONS_DIR.is_dir() else []
    hint = _closest(Path(stem).stem, known) if known else ""
    raise _error(f"grid '{name_or_path}' not found (not a file, not in {ABLATIONS_DIR}){hint}")


def _assignment(key: str, value) -> str:
    # JSON is valid YAML, so load_config reads back exactly this value (a string stays a string, a list a list).
    return f"{key}={json.dumps(value)}"


def _sets(value, where: str) -> list[str]:
    """A mapping {key: value} or a list of `key=value` strings, as `key=value` strings."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [_assignment(str(k), v) for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(s, str) and "=" in s for s in value):
        return list(value)
    raise _error(f"{where}: expected a mapping of config keys to values or a list of key=value, got {value!r:.80}")


def _key(assignment: str) -> str:
    return assignment.split("=", 1)[0].strip()


def _shown(assignment: str) -> str:
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw)
    return f"{key.strip()}={value if isinstance(value, str) else json.dumps(value)}"


def _name_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "-".join(_name_value(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", str(value)).strip("-") or "empty"


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _scaled_warmup(cfg: str, sets: list[str]) -> list[str]:
    """`schedule.warmup_epochs=W` that keeps warm-up proportional when the overrides change the epoch budget."""
    from .config import load_config

    keys = {_key(s) for s in sets}
    if "schedule.epochs" not in keys or "schedule.warmup_epochs" in keys:
        return []
    ref = load_config(cfg, [s for s in sets if _key(s) != "schedule.epochs"]).schedule
    epochs = load_config(cfg, sets).schedule.epochs
    if epochs == ref.epochs or ref.warmup_epochs == 0:
        return []
    return [f"schedule.warmup_epochs={max(1, _round_half_up(ref.warmup_epochs * epochs / ref.epochs))}"]


def _variant_entries(raw, where: str) -> list[tuple[str, str | None, list[str]]]:
    if raw is None:
        return [("", None, [])]
    if not isinstance(raw, list) or not raw:
        raise _error(f"{where}: 'variants' must be a non-empty list of {{name, cfg, sets}}")
    out = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise _error(f"{where}: variants[{i}] needs a 'name' (a string), got {entry!r:.80}")
        for k in entry:
            if k not in VARIANT_KEYS:
                raise _error(f"{where}: variant '{entry['name']}': unknown key '{k}'"
                             + _closest(str(k), VARIANT_KEYS))
        cfg = entry.get("cfg")
        if cfg is not None and not isinstance(cfg, str):
            raise _error(f"{where}: variant '{entry['name']}': 'cfg' must be a config name or path")
        out.append((entry["name"], cfg, _sets(entry.get("sets"), f"{where}: variant '{entry['name']}': sets")))
    return out


def _axis_points(raw, where: str) -> list[list[tuple[str, str, object]]]:
    """Each point of the product: [(key, name part, value), ...]."""
    if raw is None:
        return [[]]
    if not isinstance(raw, dict) or not raw:
        raise _error(f"{where}: 'axes' must be a mapping of config keys to lists of values")
    for key, values in raw.items():
        if not isinstance(key, str) or not key:
            raise _error(f"{where}: axis {key!r} is not a config key")
        if not isinstance(values, list) or not values:
            raise _error(f"{where}: axis '{key}' must be a non-empty list of values, got {values!r:.80}")
    last = [k.rsplit(".", 1)[-1] for k in raw]
    short = {k: (s if last.count(s) == 1 else k) for k, s in zip(raw, last)}
    return [[(k, short[k], v) for k, v in zip(raw, point)] for point in itertools.product(*raw.values())]


def load_grid(name_or_path: str, extra_sets: list[str] | tuple = ()) -> Grid:
    """Parse, expand and validate a grid; every variant's config is resolved here, before anything runs."""
    from .config import ConfigError, load_config

    path = resolve_grid(name_or_path)
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise _error(f"{where}: cannot read the grid ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise _error(f"{where}: a grid is a mapping with keys {', '.join(GRID_KEYS)}")
    for k in raw:
        if k not in GRID_KEYS:
            raise _error(f"{where}: unknown grid key '{k}'" + _closest(str(k), GRID_KEYS))
    if "variants" not in raw and "axes" not in raw:
        raise _error(f"{where}: a grid needs 'variants', 'axes' or both")
    base = raw.get("base")
    if base is not None and not isinstance(base, str):
        raise _error(f"{where}: 'base' must be a config name or path, got {base!r:.80}")
    common = _sets(raw.get("sets"), f"{where}: sets") + list(extra_sets)
    variants, seen = [], set()
    for (vname, vcfg, vsets), point in itertools.product(_variant_entries(raw.get("variants"), where),
                                                         _axis_points(raw.get("axes"), where)):
        name = ",".join([vname] * bool(vname) + [f"{short}={_name_value(v)}" for _, short, v in point])
        if not re.fullmatch(r"[A-Za-z0-9_+=,.-]+", name) or name.startswith("."):
            raise _error(f"{where}: variant name '{name}' is not usable as a folder name "
                         "(letters, digits and _ + = , . - only)")
        if name in seen:
            raise _error(f"{where}: two variants are called '{name}'")
        seen.add(name)
        cfg = vcfg or base
        if cfg is None:
            raise _error(f"{where}: variant '{name}' has no config: set 'base' or the variant's 'cfg'")
        own = vsets + [_assignment(k, v) for k, _, v in point]
        try:
            derived = _scaled_warmup(cfg, common + own)
            config = load_config(cfg, common + own + derived)
        except ConfigError as e:
            raise ConfigError(f"{where}: variant '{name}': {e}") from None
        shown = [_shown(s) for s in own] + [f"{_shown(s)} (scaled)" for s in derived]
        variants.append(Variant(name, cfg, common + own + derived, shown, config))
    return Grid(path.stem, path, base, common, variants)


# --- running ---------------------------------------------------------------------------------------------------

def metrics(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def check_run_dir(v: Variant, run_dir: Path) -> None:
    """A run dir written by another config would be resumed or reported as this variant: refuse up front."""
    from .config import NO_EFFECT_KEYS, differences, to_dict

    written = run_dir / "config.yaml"
    if not written.exists():
        return
    try:
        old = yaml.safe_load(written.read_text()) or {}
    except (OSError, yaml.YAMLError):
        old = {}
    # Unlike a resume, schedule.epochs may not differ: a finished 30-epoch run is not the first 30 epochs of a
    # 100-epoch run.
    diff = ([k for k in differences(old, to_dict(v.config)) if k not in NO_EFFECT_KEYS] if isinstance(old, dict)
            else ["config.yaml"])
    if diff:
        raise _error(f"variant '{v.name}': {run_dir} holds a run of a different config ({', '.join(diff[:5])}); "
                     "use another --out or remove that folder")


def epochs_done(run_dir: Path) -> int:
    return len({r["epoch"] for r in metrics(run_dir)})


def run_variant(run_dir: Path, cfg: Config, launch, *, main: bool = True, world: int = 1, gpus: int = 0) -> None:
    """`launch()` trains the variant to its end (resuming if it was interrupted). Times the attempt, whatever ends
    it; writes done.json when every epoch is in metrics.jsonl or the run diverged, failed.json when it crashed."""
    from .engine import Preempted, TrainingDiverged

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED).unlink(missing_ok=True)
    before, started, t0 = epochs_done(run_dir), time.time(), time.perf_counter()
    status, message = None, None
    try:
        launch()
    except TrainingDiverged as e:  # a result, not a crash: the table says so and the grid goes on
        status, message = "diverged", str(e)
    except Preempted:  # SIGTERM: the position is saved; stopping was asked for, nothing failed
        raise
    except Exception as e:  # a crash: kept for the table (and the next attempt), then raised
        if main:
            (run_dir / FAILED).write_text(json.dumps({"error": f"{type(e).__name__}: {e}",
                                                      "traceback": traceback.format_exc()}) + "\n")
        raise
    finally:
        if main:
            row = {"started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
                   "seconds": round(time.perf_counter() - t0, 3), "world_size": world, "gpus": gpus,
                   "epochs_before": before, "epochs_after": epochs_done(run_dir)}
            with open(run_dir / ATTEMPTS, "a") as f:
                f.write(json.dumps(row) + "\n")
    if status is None and epochs_done(run_dir) >= cfg.schedule.epochs:
        status = "done"
    if main and status:
        (run_dir / DONE).write_text(json.dumps({
            "status": status, "epochs": cfg.schedule.epochs, "message": message,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}) + "\n")


class AblateJob(TrainJob):
    """A submitted variant: TrainJob's Slurm set-up, training and requeue, plus the attempt time and done.json."""

    def __call__(self) -> None:
        import torch

        from .config import load_config

        env = submitit().JobEnvironment()
        cfg = load_config(self.cfg, self.sets)
        run_variant(Path(self.out), cfg, super().__call__, main=env.global_rank == 0, world=env.num_tasks,
                    gpus=env.num_tasks if torch.cuda.is_available() and self.device != "cpu" else 0)

    def checkpoint(self, *args, **kwargs):
        return submitit().helpers.DelayedSubmission(AblateJob(self.cfg, self.sets, self.out, self.device))


# --- results ---------------------------------------------------------------------------------------------------

COLUMNS = ["variant", "status", "config", "epochs", "overrides", "final_top1", "final_top5", "best_top1", "img_per_s",
           "wall_s", "gpus", "gpu_hours"]


def _status(v: Variant, run_dir: Path, rows: list[dict] | None = None) -> str:
    rows = metrics(run_dir) if rows is None else rows
    done = _read_json(run_dir / DONE)
    if done:
        return done.get("status", "done")
    failed = _read_json(run_dir / FAILED)
    if failed:
        return f"failed after {len({r['epoch'] for r in rows})} epochs ({failed['error'].splitlines()[0][:100]})"
    if rows:
        return f"partial ({len({r['epoch'] for r in rows})}/{v.config.schedule.epochs} epochs)"
    job = _read_json(run_dir / JOB)
    return f"submitted (job {job['job_id']})" if job else "not run"


def result_row(v: Variant, run_dir: Path) -> dict:
    rows = metrics(run_dir)
    acc = [r["val_acc1"] for r in rows if r.get("val_acc1") is not None]
    attempts = [json.loads(x) for x in (run_dir / ATTEMPTS).read_text().splitlines()
                if x.strip()] if (run_dir / ATTEMPTS).exists() else []
    wall = sum(a["seconds"] for a in attempts)
    gpu_s = sum(a["seconds"] * a["gpus"] for a in attempts)
    return {"variant": v.name, "status": _status(v, run_dir, rows), "config": v.cfg,
            "epochs": v.config.schedule.epochs,
            "overrides": "; ".join(v.shown),
            "final_top1": rows[-1].get("val_acc1") if rows else None,
            "final_top5": rows[-1].get("val_acc5") if rows else None,
            "best_top1": max(acc) if acc else None,
            "img_per_s": sum(r["img_per_s"] for r in rows) / len(rows) if rows else None,
            "wall_s": wall if attempts else None, "gpus": max((a["gpus"] for a in attempts), default=None),
            "gpu_hours": gpu_s / 3600 if attempts else None}


def _fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def write_results(grid: Grid, out: Path) -> list[dict]:
    """results.csv, results.md and curves.png from whatever the run dirs hold now (finished or not)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [result_row(v, out / v.name) for v in grid.variants]
    tmp = out / ".results.csv.partial"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / "results.csv")
    common = ", ".join(f"`{_shown(s)}`" for s in grid.common) or "none"
    lines = [f"# Ablation `{grid.name}`", "",
             f"Grid `{grid.path}`; overrides of every variant: {common}. "
             f"Written {datetime.now(timezone.utc).isoformat(timespec='seconds')}.", "",
             "| variant | status | config | overrides | epochs | final top-1 | final top-5 | best top-1 | img/s "
             "| wall | GPU-hours (0 on CPU) |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [r["variant"], r["status"], r["config"], r["overrides"] or "–", r["epochs"], _fmt(r["final_top1"]),
                 _fmt(r["final_top5"]), _fmt(r["best_top1"]), _fmt(r["img_per_s"], 0), _duration(r["wall_s"]),
                 _fmt(r["gpu_hours"], 2)]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += ["", "Top-1/top-5: validation accuracy (%) after the last epoch run and the best epoch. img/s: mean "
              "training throughput over epochs, all processes together. wall: the variant's attempts added up "
              "(training, evaluation and start-up). GPU-hours: wall x GPUs used, 0 for CPU runs.", ""]
    (out / "results.md").write_text("\n".join(lines))
    plot(grid, out)
    return rows


def plot(grid: Grid, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top1, loss) = plt.subplots(1, 2, figsize=(12, 4.2))
    for v in grid.variants:
        rows = metrics(out / v.name)
        if not rows:
            continue
        # relative to the first epoch: BCE (~0.5) and cross-entropy (~2) curves share one readable axis
        first = rows[0]["train_loss"] or 1.0
        line, = loss.plot([r["epoch"] + 1 for r in rows], [r["train_loss"] / first for r in rows], label=v.name)
        if rows[0].get("val_acc1") is not None:
            top1.plot([r["epoch"] + 1 for r in rows], [r["val_acc1"] for r in rows], label=v.name,
                      color=line.get_color())
    top1.set_title("val top-1 (%)")
    loss.set_title("train loss / train loss of epoch 1")
    for a in (top1, loss):
        a.set_xlabel("epoch")
        if a.get_lines():
            a.legend(fontsize=7)
    fig.suptitle(f"ablation {grid.name}")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


# --- command line ----------------------------------------------------------------------------------------------

def add_parser(sub) -> None:
    a = sub.add_parser("ablate", help="run a grid of recipe variants on short schedules and tabulate them",
                       description="Runs every variant of a grid file (a base config, override sets and/or a "
                       "product over config keys) one after another, or each as a submitit job with --submit; skips "
                       "finished variants and resumes an interrupted one; writes results.csv, results.md and "
                       "curves.png to --out. The grid format is in deit3_fast/ablate.py and the README.")
    a.add_argument("--grid", required=True, help="grid YAML path, or a name in configs/ablations/ (cifar10_grid)")
    a.add_argument("--out", help="run dirs and results (default: runs/ablate/<grid name>)")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every variant, after the grid's own sets (repeatable)")
    a.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    a.add_argument("--dry-run", action="store_true", help="list the variants (with --submit: the jobs) and exit")
    a.add_argument("--collect", action="store_true", help="only write the results from the run dirs; run nothing")
    a.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    s = a.add_argument_group("Slurm through submitit (one job per unfinished variant)")
    s.add_argument("--submit", action="store_true", help="submit the variants instead of running them here")
    s.add_argument("--local", action="store_true", help="with --submit: submitit's local executor, one job at a time")
    s.add_argument("--resubmit", action="store_true", help="with --submit: also variants that already have a job")
    from .cli import add_slurm_args

    add_slurm_args(s)


def _check_runnable(grid: Grid, out: Path, world: int, local_data: bool) -> None:
    """What would otherwise fail in the middle of the grid, hours in: batch arithmetic, missing data."""
    from .config import ConfigError
    from .engine import batch_plan

    for v in grid.variants:
        if (out / v.name / DONE).exists():
            continue
        try:
            batch_plan(v.config, world)
        except ConfigError as e:
            raise ConfigError(f"variant '{v.name}': {e}") from None
        for split in ("train", "val"):
            path = getattr(v.config.data, split)
            if not path:
                raise _error(f"variant '{v.name}': data.{split} is not set (an ablation compares "
                             "validation accuracy)")
            if local_data and not Path(path).exists():
                raise _error(f"variant '{v.name}': data.{split} {path} does not exist (convert it with "
                             f"deit3-convert, or --set data.{split}=PATH)")


def _print_results(out: Path) -> None:
    print((out / "results.md").read_text())
    print(f"[ablate] wrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'curves.png'}")


def _run_here(grid: Grid, out: Path, args) -> int:
    from functools import partial

    from .cli import _device
    from .engine import Preempted, train

    device = _device(args.device)
    failed = []
    todo = {v.name for v in grid.variants if not (out / v.name / DONE).exists()}
    print(f"[ablate] {grid.name}: {len(grid.variants)} variants, {len(todo)} to run on {device}, out {out}", flush=True)
    for i, v in enumerate(grid.variants, 1):
        run_dir = out / v.name
        if v.name not in todo:
            print(f"[ablate] {i}/{len(grid.variants)} {v.name}: {_status(v, run_dir)}, skipped", flush=True)
            continue
        k = epochs_done(run_dir)
        print(f"[ablate] {i}/{len(grid.variants)} {v.name}: " + (f"resuming after epoch {k}" if k else "training")
              + f" ({v.config.schedule.epochs} epochs) -> {run_dir}", flush=True)
        launch = partial(train, v.config, run_dir, device, resume="auto", quiet=args.quiet, handle_sigterm=True)
        try:
            run_variant(run_dir, v.config, launch, gpus=1 if device.type == "cuda" else 0)
        except Preempted:
            raise
        except Exception as e:  # one variant's crash does not cost the others their run; the exit code says it
            failed.append(v.name)
            print(f"deit3-fast: error: variant '{v.name}' failed: {type(e).__name__}: {e} (traceback in "
                  f"{run_dir / FAILED})", file=sys.stderr, flush=True)
        r = write_results(grid, out)[i - 1]
        print(f"[ablate] {v.name}: {r['status']}, final top-1 {_fmt(r['final_top1'])}%, best "
              f"{_fmt(r['best_top1'])}%, {_duration(r['wall_s'])}", flush=True)
    write_results(grid, out)
    _print_results(out)
    return 1 if failed else 0


def _submit_all(grid: Grid, out: Path, args) -> int:
    submitit()  # one clear error where it is missing
    from submitit.core.utils import FailedJobError

    from .submit import describe, submit

    failed = []
    for v in grid.variants:
        run_dir = out / v.name
        job = _read_json(run_dir / JOB)
        if (run_dir / DONE).exists() or (job and not args.resubmit):
            again = "" if (run_dir / DONE).exists() else f" (job {job['job_id']}; --resubmit sends it again)"
            print(f"[ablate] {v.name}: {_status(v, run_dir)}, skipped{again}", flush=True)
            continue
        desc = submit(v.cfg, v.sets, str(run_dir), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                      timeout_min=args.timeout_min, partition=args.partition, account=args.account,
                      constraint=args.constraint, cpus_per_task=args.cpus_per_task, local=args.local, dry_run=True,
                      device=args.device)
        desc["parameters"]["name"] = f"ablate-{grid.name}-{v.name}"
        if args.dry_run:
            print(describe({"variant": v.name, **desc}))
            continue
        executor = submitit().AutoExecutor(folder=desc["folder"], cluster="local" if args.local else None)
        executor.update_parameters(**desc["parameters"])
        handle = executor.submit(AblateJob(v.cfg, v.sets, str(run_dir), args.device))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / JOB).write_text(json.dumps({"job_id": handle.job_id, "executor": desc["executor"], "submitted":
                                               datetime.now(timezone.utc).isoformat(timespec="seconds")}) + "\n")
        print(json.dumps({"variant": v.name, "job_id": handle.job_id, "out": str(run_dir),
                          "logs": desc["folder"]}), flush=True)
        if args.local:  # the local executor would run every job at once on this host: one after another instead
            try:
                handle.result()
            except FailedJobError as e:
                failed.append(v.name)
                print(f"deit3-fast: error: variant '{v.name}' failed: {str(e).strip().splitlines()[-1]} "
                      f"(log: {desc['folder']})", file=sys.stderr)
            write_results(grid, out)
    if args.dry_run:
        return 0
    write_results(grid, out)
    if args.local:
        _print_results(out)
    else:
        again = " ".join(shlex.quote(a) for a in ["--grid", args.grid, "--out", str(out),
                                                  *[x for s in args.set for x in ("--set", s)]])
        print(f"[ablate] submitted; when the jobs are done: deit3-fast ablate {again} --collect", flush=True)
    return 1 if failed else 0


def run(args) -> int:
    if (args.local or args.resubmit) and not args.submit:
        raise _error("--local and --resubmit go with --submit")
    grid = load_grid(args.grid, args.set)
    out = Path(args.out or Path("runs") / "ablate" / grid.name)
    for v in grid.variants:
        check_run_dir(v, out / v.name)
    if args.collect:
        write_results(grid, out)
        _print_results(out)
        return 0
    if args.dry_run and not args.submit:
        for v in grid.variants:
            print(f"{v.name}: {_status(v, out / v.name)}; {v.cfg}" + "".join(f"; {s}" for s in v.shown))
        return 0
    world = args.nodes * args.gpus_per_node if args.submit and not args.local else 1
    _check_runnable(grid, out, world, local_data=not (args.submit and not args.local))
    return _submit_all(grid, out, args) if args.submit else _run_here(grid, out, args)

"""Running a grid: here, one variant after another, or as submitit jobs; every attempt timed, every end recorded."""

from __future__ import annotations

import json
import shlex
import sys
import time
import traceback
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from dataset_tools.atomic import write_text_atomic

from .. import rundir
from ..batching import batch_plan, batch_plans
from ..config import (
    NO_EFFECT_KEYS,
    Config,
    ConfigError,
    absolute_paths,
    differences,
    load_config,
    to_dict,
    with_defaults,
)
from ..submit import TrainJob, describe, describe_job, slurm_executor, slurm_options, submitit
from .grid import Grid, Variant, format_assignment, load_grid
from .results import (
    ATTEMPTS,
    DONE,
    FAILED,
    JOB,
    epochs_done,
    format_duration,
    format_value,
    print_results,
    read_json,
    status,
    write_results,
)


def check_run_dir(v: Variant, run_dir: Path) -> None:
    """A run dir written by another config would be resumed or reported as this variant: refuse up front."""
    old = rundir.read_config(run_dir)
    if old is None and not (run_dir / rundir.CONFIG).exists():
        return
    # Unlike a resume, schedule.epochs may not differ: a finished 30-epoch run is not the first 30 epochs of a
    # 100-epoch run.
    diff = (
        [
            k
            for k in differences(absolute_paths(with_defaults(old))[0], absolute_paths(to_dict(v.config))[0])
            if k not in NO_EFFECT_KEYS
        ]
        if old is not None
        else ["config.yaml"]
    )
    if diff:
        raise ConfigError(
            f"variant '{v.name}': {run_dir} holds a run of a different config "
            f"({', '.join(diff[:5])}); use another --out or remove that folder"
        )


def run_variant(run_dir: Path, cfg: Config, launch, *, main: bool = True, world: int = 1, gpus: int = 0) -> None:
    """`launch()` trains the variant to its end (resuming if it was interrupted). Times the attempt, whatever ends
    it; writes done.json when every epoch is in metrics.jsonl or the run diverged, failed.json when it crashed."""
    from ..trainer import Preempted, TrainingDiverged  # torch: imported when a variant runs, not for --help

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED).unlink(missing_ok=True)
    before, started, t0 = epochs_done(run_dir), time.time(), time.perf_counter()
    outcome, message = None, None
    try:
        launch()
    except TrainingDiverged as e:  # a result, not a crash: the table says so and the grid goes on
        outcome, message = "diverged", str(e)
    except Preempted:  # SIGTERM: the position is saved; stopping was asked for, nothing failed
        raise
    except Exception as e:  # a crash: kept for the table (and the next attempt), then raised
        if main:
            write_text_atomic(
                run_dir / FAILED,
                json.dumps({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}) + "\n",
            )
        raise
    finally:
        if main:
            row = {
                "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.perf_counter() - t0, 3),
                "world_size": world,
                "gpus": gpus,
                "epochs_before": before,
                "epochs_after": epochs_done(run_dir),
            }
            with open(run_dir / ATTEMPTS, "a") as f:
                f.write(json.dumps(row) + "\n")
    if outcome is None and epochs_done(run_dir) >= cfg.schedule.epochs:
        outcome = "done"
    if main and outcome:
        write_text_atomic(
            run_dir / DONE,
            json.dumps(
                {
                    "status": outcome,
                    "epochs": cfg.schedule.epochs,
                    "message": message,
                    "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
            )
            + "\n",
        )


class AblateJob(TrainJob):
    """A submitted variant: TrainJob's Slurm set-up, training and requeue, plus the attempt time and done.json."""

    def __call__(self) -> None:
        import torch

        env = submitit().JobEnvironment()
        cfg = load_config(self.cfg, self.sets)
        run_variant(
            Path(self.out),
            cfg,
            super().__call__,
            main=env.global_rank == 0,
            world=env.num_tasks,
            gpus=env.num_tasks if torch.cuda.is_available() and self.device != "cpu" else 0,
        )

    def checkpoint(self, *args, **kwargs):
        return submitit().helpers.DelayedSubmission(AblateJob(self.cfg, self.sets, self.out, self.device))


def check_variant_data(v: Variant, split: str, checked: set | None = None) -> None:
    """Variant `v`'s data.`split` is there and is what its engine reads: the loader's own check (pipelines.build.
    check_data: a readable .beton or shard set with labels within the model's classes; an ImageFolder tree for the
    engines that read one), so a grid fails here, before anything runs, rather than when that variant starts.
    `checked` holds the (path, split, classes, engine) already passed: the variants of a grid share their data."""
    from pipelines import DataError
    from pipelines.build import check_data

    from ..config import resolve_num_classes

    key, path = f"data.{split}", getattr(v.config.data, split)
    if not path:
        raise ConfigError(f"variant '{v.name}': {key} is not set (an ablation compares validation accuracy)")
    if not Path(path).exists():
        raise ConfigError(
            f"variant '{v.name}': {key} {path} does not exist (convert it with deit3-convert, or --set {key}=PATH)"
        )
    checked = set() if checked is None else checked
    try:
        what = (path, split, resolve_num_classes(v.config).model.num_classes, v.config.data.engine)
        if what not in checked:
            check_data(*what)
            checked.add(what)
    except (DataError, ConfigError, OSError) as e:
        detail = str(e)  # most name the path already
        where = key if path in detail else f"{key} {path}"
        raise ConfigError(f"variant '{v.name}': {where}: {detail}") from None


def check_runnable(grid: Grid, out: Path, world: int, local_data: bool) -> None:
    """What would otherwise fail in the middle of the grid, hours in: batch arithmetic, missing or unreadable data
    (`local_data`: the data is on this machine; a Slurm job's is on the cluster, only its keys are checked here)."""
    checked: set = set()
    for v in grid.variants:
        if (out / v.name / DONE).exists():
            continue
        try:
            batch_plan(v.config, world), batch_plans(v.config, world)
        except ConfigError as e:
            raise ConfigError(f"variant '{v.name}': {e}") from None
        for split in ("train", "val"):
            if local_data:
                check_variant_data(v, split, checked)
            elif not getattr(v.config.data, split):
                raise ConfigError(
                    f"variant '{v.name}': data.{split} is not set (an ablation compares validation accuracy)"
                )


def print_overrides(grid: Grid, out: Path, extra_sets: list[str]) -> None:
    """--dry-run: each variant, its state and config, then every override it runs with, one a line, saying where the
    shared ones come from (the grid's `sets`, --set) and which ablate derived (a warm-up or ramp scaled to the
    budget); the variant's own sets and axis values are plain."""
    shared = [(s, "grid") for s in grid.common[: len(grid.common) - len(extra_sets)]]
    shared += [(s, "--set") for s in grid.common[len(grid.common) - len(extra_sets) :]]
    for v in grid.variants:
        print(f"{v.name}: {status(v, out / v.name)}; {v.cfg}")
        lines = [f"{format_assignment(s)} ({where})" for s, where in shared] + v.shown
        print("".join(f"  {line}\n" for line in lines) or "  (no overrides)\n", end="")


def run_here(grid: Grid, out: Path, args) -> int:
    from ..device import pick_device
    from ..trainer import Preempted, train  # torch: imported when something runs, not for --help

    device = pick_device(args.device)
    failed = []
    todo = {v.name for v in grid.variants if not (out / v.name / DONE).exists()}
    print(f"[ablate] {grid.name}: {len(grid.variants)} variants, {len(todo)} to run on {device}, out {out}", flush=True)
    for i, v in enumerate(grid.variants, 1):
        run_dir = out / v.name
        if v.name not in todo:
            print(f"[ablate] {i}/{len(grid.variants)} {v.name}: {status(v, run_dir)}, skipped", flush=True)
            continue
        k = epochs_done(run_dir)
        print(
            f"[ablate] {i}/{len(grid.variants)} {v.name}: "
            + (f"resuming after epoch {k}" if k else "training")
            + f" ({v.config.schedule.epochs} epochs) -> {run_dir}",
            flush=True,
        )
        launch = partial(train, v.config, run_dir, device, resume="auto", quiet=args.quiet, handle_sigterm=True)
        try:
            run_variant(run_dir, v.config, launch, gpus=1 if device.type == "cuda" else 0)
        except Preempted:
            raise
        except Exception as e:  # one variant's crash does not cost the others their run; the exit code says it
            failed.append(v.name)
            print(
                f"deit3-fast: error: variant '{v.name}' failed: {type(e).__name__}: {e} (traceback in "
                f"{run_dir / FAILED})",
                file=sys.stderr,
                flush=True,
            )
        r = write_results(grid, out)[i - 1]
        print(
            f"[ablate] {v.name}: {r['status']}, final top-1 {format_value(r['final_top1'])}%, best "
            f"{format_value(r['best_top1'])}%, {format_duration(r['wall_s'])}",
            flush=True,
        )
    write_results(grid, out)
    print_results(out)
    return 1 if failed else 0


def submit_all(grid: Grid, out: Path, args, collect: str) -> int:
    submitit()  # one clear error where it is missing
    from submitit.core.utils import FailedJobError

    failed = []
    for v in grid.variants:
        run_dir = out / v.name
        job = read_json(run_dir / JOB)
        if (run_dir / DONE).exists() or (job and not args.resubmit):
            again = "" if (run_dir / DONE).exists() else f" (job {job['job_id']}; --resubmit sends it again)"
            print(f"[ablate] {v.name}: {status(v, run_dir)}, skipped{again}", flush=True)
            continue
        desc = describe_job(v.cfg, v.sets, str(run_dir), **slurm_options(args))
        desc["parameters"]["name"] = f"ablate-{grid.name}-{v.name}"
        if args.dry_run:
            print(describe({"variant": v.name, **desc}))
            continue
        handle = slurm_executor(desc).submit(AblateJob(v.cfg, v.sets, str(run_dir), args.device))
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(
            run_dir / JOB,
            json.dumps(
                {
                    "job_id": handle.job_id,
                    "executor": desc["executor"],
                    "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
            )
            + "\n",
        )
        print(
            json.dumps({"variant": v.name, "job_id": handle.job_id, "out": str(run_dir), "logs": desc["folder"]}),
            flush=True,
        )
        if args.local:  # the local executor would run every job at once on this host: one after another instead
            try:
                handle.result()
            except FailedJobError as e:
                failed.append(v.name)
                print(
                    f"deit3-fast: error: variant '{v.name}' failed: {str(e).strip().splitlines()[-1]} "
                    f"(log: {desc['folder']})",
                    file=sys.stderr,
                )
            write_results(grid, out)
    if args.dry_run:
        return 0
    write_results(grid, out)
    if args.local:
        print_results(out)
    else:
        print(f"[ablate] submitted; when the jobs are done: {collect}", flush=True)
    return 1 if failed else 0


def run_grid(args) -> int:
    """`deit3-fast ablate` (its options: commands/ablate.py)."""
    if (args.local or args.resubmit) and not args.submit:
        raise ConfigError("--local and --resubmit go with --submit")
    grid = load_grid(args.grid, args.set)
    out = Path(args.out or Path("runs") / "ablate" / grid.name)
    for v in grid.variants:
        check_run_dir(v, out / v.name)
    if args.collect:
        write_results(grid, out)
        print_results(out)
        return 0
    if args.dry_run and not args.submit:
        # The checks a run makes before its first variant (data paths, batch arithmetic), and nothing written.
        check_runnable(grid, out, 1, local_data=True)
        print_overrides(grid, out, args.set)
        return 0
    again = " ".join(
        shlex.quote(a) for a in ["--grid", args.grid, "--out", str(out), *[x for s in args.set for x in ("--set", s)]]
    )
    return execute(grid, out, args, f"deit3-fast ablate {again} --collect")


def execute(grid: Grid, out: Path, args, collect: str) -> int:
    """Run (or with args.submit, submit) a resolved grid's unfinished variants into OUT/<variant>; `collect` is the
    command line that tabulates submitted jobs once they end. `ablate` and `parity` both run their grids here."""
    world = args.nodes * args.gpus_per_node if args.submit and not args.local else 1
    check_runnable(grid, out, world, local_data=not (args.submit and not args.local))
    return submit_all(grid, out, args, collect) if args.submit else run_here(grid, out, args)

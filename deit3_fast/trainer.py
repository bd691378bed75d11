"""Training and evaluation: config -> components (`build`, builder.py) -> loop (`train`), around one `Run`.

One optimiser step = `accum` micro-batches of the per-process batch; global batch = per-process batch x world x
accum = `train.global_batch` (`batching.batch_plan`); under DDP only the last micro-batch of a step all-reduces
gradients. The learning rate is set every step (schedule.py). Losses stay on the device and are read back every
`train.log_every` micro-batches, so the host never waits for the device in between.

Checkpoints (checkpoint.py) are written at every epoch end, and on SIGTERM at the next step boundary (`Preempted`):
such a checkpoint records its position in the epoch, and a resume continues from exactly there (the loader can start
an epoch part-way with the same batches, see pipelines/loader.py). The run dir's other files: rundir.py.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dataset_tools.errors import UserError
from pipelines import keys

from . import checkpoint as ckpt
from . import distributed as dist
from . import reference, rundir
from .batching import batch_plan
from .builder import Run, StopFlag, build, run_facts, stage_data
from .config import (
    NO_EFFECT_KEYS,
    Config,
    ConfigError,
    absolute_paths,
    config_warnings,
    differences,
    resolve_num_classes,
    to_dict,
    with_absolute_paths,
    with_defaults,
)
from .device import autocast, is_out_of_memory, max_mem_mb, reset_peak_memory
from .eval_loop import evaluate
from .loggers import EpochLoggers, required as loggers_required


class TrainingDiverged(UserError):
    """The loss became NaN or inf: the run stops (exit code 3) with its last good checkpoint kept."""

    exit_code, prefix = 3, "stopped"


class ConfigMismatch(UserError):
    """A resume whose config differs from the checkpoint's in a key that changes what the run computes."""


class OutOfMemory(UserError):
    """The device ran out of memory at the configured batch: the message names the settings that lower it."""


class Preempted(Exception):
    """SIGTERM: the run stopped at a step boundary and `checkpoint` holds that exact position: after `step` of the
    `steps` steps of epoch `epoch` (0-based, as metrics.jsonl; the message counts from 1, as the console does)."""

    def __init__(self, checkpoint: Path, epoch: int, step: int, steps: int):
        super().__init__(
            f"SIGTERM: stopped at epoch {epoch + 1}, step {step}/{steps}; checkpoint written to "
            f"{checkpoint}; continue with --resume auto"
        )
        self.checkpoint, self.epoch, self.step = checkpoint, epoch, step


def train_micro_batch(
    run: Run, x: torch.Tensor, y: torch.Tensor, step: int, last_micro: bool, accum: int
) -> torch.Tensor:
    """Forward and backward of one of a step's `accum` micro-batches; on its last also the optimiser step (at the
    scheduled learning rate) and the EMA update. Returns the loss as a device tensor (nothing is read back)."""
    # Micro-batches before a step's last one keep their gradients local: one all-reduce per optimiser step.
    with run.ddp.no_sync() if run.ddp is not None and not last_micro else nullcontext():
        with autocast(run.device, run.amp):
            loss = run.loss(run.model(x), y)
        run.scaler.scale(loss / accum).backward()
    if last_micro:
        run.scheduler(step)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        if run.ema is not None:
            run.ema.update(run.raw_model)
    return loss.detach()


@dataclass
class EpochResult:
    """A finished epoch's training statistics (`row`), or where a stop request ended it (`resume_at`: the step and
    the partial sums a resume continues from)."""

    steps: int
    row: dict | None = None
    resume_at: dict | None = None


def train_one_epoch(
    run: Run, epoch: int, progress: Progress | None = None, resume_at: dict | None = None
) -> EpochResult:
    """One epoch, or its remainder from `resume_at` (a mid-epoch checkpoint's position)."""
    loader = run.train_loader
    run.model.train()
    loader.set_epoch(epoch)
    plan = run.batch_at(epoch)
    loader.set_resolution(run.train_size(epoch), plan.per_process)
    accum, steps = plan.accum, run.steps_per_epoch
    first = resume_at["step"] if resume_at else 0
    micro_total = steps * accum
    name = f"epoch {epoch + 1}/{run.cfg.schedule.epochs}"  # counted from 1, as the console's epoch lines
    task = progress.add_task(name, total=micro_total, completed=first * accum, info="") if progress else None
    done = resume_at or {"loss_sum": 0.0, "images": 0, "seconds": 0.0}
    loss_sum = torch.full((), float(done["loss_sum"]), device=run.device)
    ek = keys.epoch_key(run.cfg.train.seed, dist.rank(), epoch)
    images, wait, started = int(done["images"]), 0.0, time.perf_counter() - done["seconds"]
    lr = run.scheduler.value(epoch * steps + first)
    stopped_at = None
    # Closed here however the loop ends: an engine's decode threads must stop before the process may exit.
    with closing(loader.iter_from(first * accum)) as it:
        for micro in range(first * accum, micro_total):
            t0 = time.perf_counter()
            x, y = next(it)
            wait += time.perf_counter() - t0
            step = epoch * steps + micro // accum
            last_micro = (micro + 1) % accum == 0
            # Drop-path draws from the global RNG (CPU and CUDA), seeded per (seed, rank, epoch, micro-batch) like the
            # data keys: every rank has its own stream, and a run resumed at any step on any number of processes draws
            # what an uninterrupted one would, without carrying RNG states (which are per rank and per device).
            torch.manual_seed(keys.seed_of(keys.combine(ek, np.uint64(micro))))
            loss_sum += train_micro_batch(run, x, y, step, last_micro, accum)
            images += len(x)
            if last_micro:
                lr = run.scheduler.value(step)
            if (micro + 1) % run.cfg.train.log_every == 0 or micro + 1 == micro_total:
                # The one host sync, every log_every micro-batches; summed over ranks, so all ranks stop together, and
                # carrying the stop flag, so all ranks agree on where a SIGTERM ends the run.
                flag = torch.full((), float(run.stop.requested), device=loss_sum.device)
                total, stops = dist.all_reduce_sum(torch.stack([loss_sum, flag])).tolist()
                mean = total / ((micro + 1) * dist.world())
                run.stop.agreed |= stops > 0
                if not math.isfinite(mean):
                    raise TrainingDiverged(
                        f"loss is {mean} at epoch {epoch + 1}, step {micro // accum + 1}/{steps}; stopping. The "
                        "last good checkpoint is kept; lower optim.lr or use train.amp: bf16"
                    )
                if progress:
                    progress.update(task, completed=micro + 1, info=f"loss {mean:.4f} lr {lr:.2e}")
            if last_micro and micro + 1 < micro_total and run.stop.should_stop():
                stopped_at = (micro + 1) // accum
                break
        if stopped_at is None:
            for _ in it:  # the engine's epoch ends cleanly even when accumulation leaves micro-batches over
                pass
    elapsed = time.perf_counter() - started
    if progress:
        progress.remove_task(task)
    if stopped_at is not None:
        # The checkpoint holds one rank's share of the partial sums (rank 0 writes it, every rank resumes from it):
        # the mean over ranks, so the epoch's loss comes out right on any number of processes.
        mean_sum = dist.all_reduce_sum(loss_sum.clone()).item() / dist.world()
        return EpochResult(
            steps, resume_at={"step": stopped_at, "loss_sum": mean_sum, "images": images, "seconds": elapsed}
        )
    report = loader.epoch_report()  # JPEGs the GPU decoder refused on this rank (reasons: this rank's)
    counts = torch.tensor([float(images), float(report.get("cpu_decoded", 0))]).to(loss_sum.device)
    total = dist.all_reduce_sum(torch.cat([loss_sum[None], counts])).tolist()
    row = {
        "train_loss": total[0] / (micro_total * dist.world()),
        "lr": lr,
        "img_per_s": total[1] / elapsed,
        "data_wait_frac": wait / elapsed,
        "train_seconds": elapsed,
    }
    if run.resolutions is not None:
        row["train_img_size"] = run.train_size(epoch)
    if run.batches:
        row["per_process_batch"] = plan.per_process
    if total[2]:
        row.update(cpu_decoded=int(total[2]), cpu_decoded_reasons=report.get("cpu_decoded_reasons", {}))
    return EpochResult(steps, row=row)


# May change on resume: what does not change the computation, and schedule.epochs (extending a run).
_RESUMABLE = NO_EFFECT_KEYS | {"schedule.epochs"}


def _resume(run: Run, resume: str | None, out: Path, force: bool) -> tuple[Path, ckpt.Position] | None:
    """Load the checkpoint `--resume` names into `run`; that file and its position, or None when starting afresh."""
    path = ckpt.find_resume(resume, out)
    if path is None:
        return None
    saved = ckpt.load_run(path)
    # Paths compared absolute: a checkpoint written before runs recorded them so holds them as given.
    ours, theirs = (absolute_paths(t)[0] for t in (with_defaults(saved.config), to_dict(run.cfg)))
    changed = [k for k in differences(ours, theirs) if k not in _RESUMABLE]
    if changed and not force:
        raise ConfigMismatch(
            f"{path} was written with a different config ({', '.join(changed)}); resume with the "
            "same config, or pass --force"
        )
    run.load_state_dict(saved.state)
    return path, saved.position


def _refuse_overwrite(out: Path, resume: str | None) -> None:
    """A run dir that holds a run is continued (`--resume auto`, or a checkpoint of its own), never trained over."""
    if not rundir.holds_run(out):
        return
    found = ckpt.find_resume(resume, out)
    if found is None or found.parent.resolve() != out.resolve():
        raise ConfigError(
            f"{out} holds a run ({len(rundir.read_metrics(out))} epochs in {rundir.METRICS}): continue it with "
            "--resume auto, or train into a new --out"
        )


def train(
    cfg: Config,
    out_dir: str | Path,
    device: torch.device,
    resume: str | None = None,
    force: bool = False,
    quiet: bool = False,
    stop_after_epoch: int | None = None,
    handle_sigterm: bool = False,
) -> list[dict]:
    """Train from scratch or `resume`; `stop_after_epoch` ends this process's share of the run early (the
    schedule still spans schedule.epochs), as a time limit or preemption would. With `handle_sigterm`, SIGTERM
    stops at the next step boundary, writes a checkpoint of that position and raises `Preempted`."""
    previous, stop = None, StopFlag()
    _refuse_overwrite(Path(out_dir), resume)
    cfg, given = with_absolute_paths(cfg)  # the run dir's config works from any directory (given: for the reader)
    cfg = resolve_num_classes(stage_data(cfg))  # config.yaml records the class count, not "auto"
    try:
        if handle_sigterm and threading.current_thread() is threading.main_thread():

            def on_sigterm(signum, frame):
                stop.requested = True

            previous = signal.signal(signal.SIGTERM, on_sigterm)
        return _train(cfg, Path(out_dir), device, resume, force, quiet, stop_after_epoch, stop, given)
    except (RuntimeError, MemoryError) as e:  # numpy (FFCV's buffers) raises MemoryError, torch a RuntimeError
        if is_out_of_memory(e):
            raise OutOfMemory(_oom_message(cfg, device, e)) from None
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _train(
    cfg: Config,
    out: Path,
    device: torch.device,
    resume: str | None,
    force: bool,
    quiet: bool,
    stop_after_epoch: int | None,
    stop: StopFlag,
    given: dict[str, str],
) -> list[dict]:
    reset_peak_memory(device)
    run = build(cfg, device)
    run.stop = stop
    found = _resume(run, resume, out, force)
    pos = found[1] if found else None
    if found and dist.is_main():  # also --quiet: a resume says what it continues
        print(_resume_line(out, *found, cfg.schedule.epochs, run.steps_per_epoch), flush=True)
    if pos is not None and pos.resume_at is None and pos.epoch + 1 >= cfg.schedule.epochs:
        return []  # finished: nothing to train, and its run dir stays as it is
    if dist.is_main():
        loggers_required(cfg)  # a logging package asked for and missing is refused before the run dir is touched
    out.mkdir(parents=True, exist_ok=True)  # after the inputs are checked: a refused run leaves no empty run dir
    resumed = pos is not None
    pos = pos or ckpt.Position()
    main = dist.is_main()  # only rank 0 writes the run dir and talks
    quiet = quiet or not main
    config = to_dict(cfg)
    followed = reference.resolve(cfg)  # the official curve this run is compared with, if any
    if main:
        rundir.write_config(out, config, given)
        facts = {**run_facts(run), "reference": followed}
        rundir.write_facts(out, facts)
        if not quiet:
            print(rundir.describe_facts(facts), flush=True)
        share_warning = run.train_loader.cpu_share.warning()
        for warning in config_warnings(cfg) + ([share_warning] if share_warning else []):
            print(f"warning: {warning}", file=sys.stderr, flush=True)  # also when quiet: what a user must act on
        rundir.start_metrics(out, pos.epoch if resumed else None)
    gap = reference.Gap(followed, cfg.train.reference_tolerance, rundir.read_metrics(out)) if followed else None
    loggers = EpochLoggers(cfg, out, config, main, followed, resumed=resumed)
    history, resume_at, started, first_epoch = [], pos.resume_at, time.perf_counter(), pos.epoch + 1
    progress = _progress() if not quiet else None
    # The loggers are closed however the loop ends (a preempted run's W&B run finishes, its TensorBoard events flush).
    with progress or nullcontext(), closing(loggers):
        for epoch in range(pos.epoch + 1, cfg.schedule.epochs):
            result = train_one_epoch(run, epoch, progress, resume_at)
            resume_at = None
            if result.resume_at is not None:  # stopped part-way (SIGTERM): save exactly where
                if main:
                    stopped = ckpt.Position(epoch - 1, pos.best, result.resume_at)
                    ckpt.save_run(out / ckpt.LAST, run.state_dict(), stopped, config)
                dist.barrier()
                raise Preempted(out / ckpt.LAST, epoch, result.resume_at["step"], result.steps)
            row = {"epoch": epoch, **result.row, "val_acc1": None, "val_acc5": None}
            if run.val_loader is not None:
                ev = evaluate(run.model, run.val_loader, run.amp, progress)
                row.update(val_acc1=ev["acc1"], val_acc5=ev["acc5"])
            every = cfg.train.extra_val_every
            due = epoch + 1 == cfg.schedule.epochs or (every and (epoch + 1) % every == 0)
            for name, loader, mask in run.extra_val:  # None where not evaluated: every row has the same keys
                ev = evaluate(run.model, loader, run.amp, progress, mask=mask) if due else {}
                row.update({f"val_{name}_acc1": ev.get("acc1"), f"val_{name}_acc5": ev.get("acc5")})
            row["max_mem_mb"] = max_mem_mb(device)
            warning = gap.update(row) if gap is not None else None
            history.append(row)
            acc = row["val_acc1"] if row["val_acc1"] is not None else -row["train_loss"]
            improved = acc > pos.best
            pos = ckpt.Position(epoch, max(pos.best, acc))
            if main:
                rundir.append_metrics(out, row)
                _plot(out, followed, cfg.schedule.epochs)  # after every epoch: a stopped or long run has it too
                loggers.log(row)
                ckpt.save_run(out / ckpt.LAST, run.state_dict(), pos, config)
                if improved:
                    ckpt.save_run(out / ckpt.BEST, run.state_dict(), pos, config)
            per_epoch = (time.perf_counter() - started) / (epoch + 1 - first_epoch)
            _report(row, quiet, main, cfg.schedule.epochs, per_epoch * (cfg.schedule.epochs - epoch - 1))
            if warning and main:
                print(warning, file=sys.stderr, flush=True)
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break
            if run.stop.should_stop() and epoch + 1 < cfg.schedule.epochs:  # SIGTERM in the epoch's last step
                dist.barrier()
                raise Preempted(out / ckpt.LAST, epoch, run.steps_per_epoch, run.steps_per_epoch)
    dist.barrier()  # nobody leaves before the last checkpoint is on disk
    return history


def _plot(out: Path, followed: str | None, epochs: int) -> None:
    """curves.png of the run dir's metrics.jsonl (the rows of earlier processes of a resumed run too), with the
    official curve the run follows up to its last epoch."""
    official = {e: v for e, v in reference.official_curve(followed).items() if e <= epochs} if followed else None
    rundir.plot_curves(
        {out.name: rundir.read_metrics(out)},
        out / rundir.CURVES,
        reference=(f"official {followed}", official) if official else None,
    )


def _resume_line(out: Path, path: Path, pos: ckpt.Position, epochs: int, steps: int) -> str:
    source = path.name if path.parent.resolve() == out.resolve() else str(path)
    done = pos.epoch + 1
    if pos.resume_at is None and done >= epochs:
        return (
            f"{out} is finished: {done}/{epochs} epochs ({source}); nothing to train (--epochs N with N > {done} "
            "extends it)"
        )
    step = pos.resume_at["step"] if pos.resume_at else 0
    return f"resuming {out} from epoch {done + 1}/{epochs}, step {step}/{steps} ({source})"


def _report(row: dict, quiet: bool, main: bool, epochs: int, eta_s: float) -> None:
    if not quiet:
        print(rundir.epoch_line(row, epochs, eta_s), flush=True)
    if main and row.get("cpu_decoded"):
        reasons = ", ".join(f"{n} {why}" for why, n in row["cpu_decoded_reasons"].items())
        print(
            f"epoch {row['epoch'] + 1}: {row['cpu_decoded']} JPEGs the GPU decoder refuses were decoded on the CPU "
            f"({reasons})",
            file=sys.stderr,
            flush=True,
        )


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=True,
    )


def _oom_message(cfg: Config, device: torch.device, error: Exception) -> str:
    plan = batch_plan(cfg, dist.world())
    b, accum = plan.per_process, plan.accum
    detail = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    hint = (
        (
            f"--set data.batch_size={b // 2} keeps train.global_batch {cfg.train.global_batch} with {2 * accum} "
            "accumulation steps instead of " + str(accum)
        )
        if b > 1
        else "use a smaller model or aug.img_size"
    )
    if cfg.schedule.resolution.batch_sizes:
        hint += "; schedule.resolution.batch_sizes sets the batch at the sizes it names"
    return f"out of memory on {device} with data.batch_size {b} per process ({detail}); {hint}"

"""Training and evaluation: config -> components -> loop. The loop does not know which engine feeds it.

One optimiser step = `accum` micro-batches of `data.batch_size`; global batch = batch_size x world x accum, which
must equal `train.global_batch`; under DDP only the last micro-batch of a step all-reduces gradients. The learning
rate is set every step (schedule.py). Losses stay on the device and are read back every `train.log_every` steps, so
the host never waits for the device in between.

Checkpoints are written at every epoch end, and on SIGTERM at the next step boundary (`Preempted`): such a
checkpoint records its position in the epoch, and a resume continues from exactly there (the loader can start an
epoch part-way with the same batches, see pipelines/loader.py).
"""
from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pipelines import AMP_DTYPES, DataError, build_loader, check_same_classes, native_bf16
from pipelines.crops import combine, epoch_key

from . import checkpoint as ckpt
from . import distributed as dist
from .config import NO_EFFECT_KEYS, Config, ConfigError, differences, to_dict
from .losses import RecipeLoss
from .models import create_model, patch_size
from .optim import build_optimizer
from .schedule import WarmupCosine


class TrainingDiverged(Exception):
    pass


class ConfigMismatch(Exception):
    pass


class OutOfMemory(Exception):
    pass


class Preempted(Exception):
    """SIGTERM: the run stopped at a step boundary and `checkpoint` holds that exact position."""

    def __init__(self, checkpoint: Path, epoch: int, step: int, steps: int):
        super().__init__(f"SIGTERM: stopped at epoch {epoch}, step {step}/{steps}; checkpoint written to "
                         f"{checkpoint}; continue with --resume auto")
        self.checkpoint, self.epoch, self.step = checkpoint, epoch, step


class StopFlag:
    """`requested`: set by this process's SIGTERM handler. `agreed`: some rank's request, as every rank learnt it at
    the same log point; with several processes only that one may end the run, or the ranks would part ways."""
    requested = False
    agreed = False

    def should_stop(self) -> bool:
        return self.agreed or (dist.world() == 1 and self.requested)


@dataclass
class Run:
    cfg: Config
    model: torch.nn.Module          # what runs forward: compiled when train.compile
    raw_model: torch.nn.Module      # its parameters and state dict (no torch.compile '_orig_mod.' prefixes)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: WarmupCosine
    loss: RecipeLoss
    train_loader: object
    val_loader: object
    device: torch.device
    accum: int
    amp: str                        # the AMP dtype in use (train.amp: auto resolved for this device)
    batch: BatchPlan
    ema: object | None = None
    ddp: torch.nn.parallel.DistributedDataParallel | None = None
    stop: StopFlag = field(default_factory=StopFlag)  # train() hands in the one its SIGTERM handler sets


@dataclass(frozen=True)
class BatchPlan:
    """How `train.global_batch` is split: per-process batch x world size x accumulation steps."""
    per_process: int
    accum: int
    note: str | None = None  # one line when the per-process batch differs from data.batch_size


def batch_plan(cfg: Config, world: int) -> BatchPlan:
    """`data.batch_size` as given when the global batch is a multiple of it times the world size; when the
    processes together would exceed the global batch (the quickstart's 32 under torchrun with 2 processes), global /
    world per process; otherwise an error naming a per-process batch that works."""
    b, g = cfg.data.batch_size, cfg.train.global_batch
    if g % (b * world) == 0:
        return BatchPlan(b, g // (b * world))
    if b * world > g and g % world == 0:
        return BatchPlan(g // world, 1, f"train.global_batch {g} over {world} processes: data.batch_size {b} -> "
                                        f"{g // world} per process, no accumulation")
    if g % world:
        below = max(d for d in range(1, world) if g % d == 0)
        above = next(d for d in range(world + 1, g + 1) if g % d == 0) if world < g else None
        sizes = f"{below} or {above}" if above else str(below)
        raise ConfigError(f"train.global_batch {g} cannot be split over {world} processes: use a world size that "
                          f"divides it (e.g. {sizes}), or another train.global_batch")
    fits = [d for d in range(1, g // world + 1) if (g // world) % d == 0 and d <= b] or [1]
    even = [d for d in fits if d % 2 == 0]  # mixup/cutmix pair the batch with its reverse
    s = (even or fits)[-1]
    raise ConfigError(f"train.global_batch {g} is not a multiple of data.batch_size {b} x world size {world}: "
                      f"use --set data.batch_size={s} ({g // (s * world)} accumulation steps)")


def check_img_size(cfg: Config) -> None:
    """Like the official code and timm, the patch grid is floored (ViT-H/14 at 160 px sees 11 x 11 patches): any
    size of at least one patch works."""
    if cfg.aug.img_size < patch_size(cfg.model.name):
        raise ConfigError(f"aug.img_size {cfg.aug.img_size} is smaller than {cfg.model.name}'s patch size "
                          f"{patch_size(cfg.model.name)}")


def resolve_amp(cfg: Config, device: torch.device) -> str:
    """`train.amp: auto` is bf16 where the device computes it natively (Ampere and later, CPUs), else fp16 with the
    GradScaler (V100, T4); an explicit bf16 on a device that only emulates it works but is slow: one warning."""
    amp = cfg.train.amp
    if amp == "auto":
        return "bf16" if native_bf16(device) else "fp16"
    if amp == "bf16" and not native_bf16(device):
        import warnings

        warnings.warn(f"train.amp: bf16 on {torch.cuda.get_device_name(device)}, which has no native bf16 (it is "
                      "emulated, several times slower): use train.amp: auto or fp16", stacklevel=2)
    return amp


def build(cfg: Config, device: torch.device) -> Run:
    """The run's components from its config. `cfg` stays as given (it is what the run dir records and a resume
    compares); the per-process batch and the AMP dtype actually used are `Run.batch` and `Run.amp`."""
    torch.manual_seed(cfg.train.seed)  # the same init on every rank (DDP also broadcasts rank 0's)
    plan = batch_plan(cfg, dist.world())
    accum = plan.accum
    amp = resolve_amp(cfg, device)
    check_img_size(cfg)
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, img_size=cfg.aug.img_size,
                         drop_path=cfg.model.drop_path, layer_scale_init=cfg.model.layer_scale_init,
                         checkpoint=cfg.model.checkpoint).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = cfg.optim
    optimizer = build_optimizer(o.name, model, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas),
                                eps=o.eps, max_grad_norm=o.max_grad_norm, compile=cfg.train.compile)
    forward = ddp = None
    if dist.world() > 1:
        forward = ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = forward or model
    forward = torch.compile(forward) if cfg.train.compile else forward
    data_cfg = replace(cfg, data=replace(cfg.data, batch_size=plan.per_process), train=replace(cfg.train, amp=amp))
    train_loader = build_loader(data_cfg, "train", device)
    if len(train_loader) < accum:
        raise DataError(f"{cfg.data.train}: an epoch has {len(train_loader)} batch(es) of {plan.per_process} per "
                        f"process, fewer than one optimiser step ({accum} micro-batches); lower data.batch_size or "
                        "train.global_batch")
    if cfg.data.val:
        check_same_classes(cfg.data.train, cfg.data.val)
    val_loader = build_loader(data_cfg, "val", device) if cfg.data.val else None
    steps_per_epoch = max(1, len(train_loader) // accum)
    s = cfg.schedule
    scheduler = WarmupCosine(optimizer, steps_per_epoch, lr=o.lr, epochs=s.epochs, warmup_epochs=s.warmup_epochs,
                             warmup_lr=s.warmup_lr, min_lr=s.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    ema = None
    if cfg.train.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
    return Run(cfg, forward, model, optimizer, scaler, scheduler, RecipeLoss(cfg.loss, cfg.aug.label_smoothing),
               train_loader, val_loader, device, accum, amp, plan, ema, ddp)


def autocast(device: torch.device, amp: str):
    """The forward pass's autocast for train.amp (bf16 | fp16 | fp32 = none)."""
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp != "fp32" else nullcontext()


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), transient=True)


def train_micro_batch(run: Run, x: torch.Tensor, y: torch.Tensor, step: int, last_micro: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch; on a step's last micro-batch also the optimiser step (at the
    scheduled learning rate) and the EMA update. Returns the loss as a device tensor (nothing is read back)."""
    # Micro-batches before a step's last one keep their gradients local: one all-reduce per optimiser step.
    with run.ddp.no_sync() if run.ddp is not None and not last_micro else nullcontext():
        with autocast(run.device, run.amp):
            loss = run.loss(run.model(x), y)
        run.scaler.scale(loss / run.accum).backward()
    if last_micro:
        run.scheduler(step)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        if run.ema is not None:
            run.ema.update(run.raw_model)
    return loss.detach()


def train_one_epoch(run: Run, epoch: int, progress: Progress | None = None, resume_at: dict | None = None) -> dict:
    """One epoch, or its remainder from `resume_at` (a mid-epoch checkpoint's position). Returns the epoch's stats;
    with `stopped_at_step` set when a stop was requested (SIGTERM) and the epoch ended early at that step."""
    loader = run.train_loader
    run.model.train()
    loader.set_epoch(epoch)
    steps = max(1, len(loader) // run.accum)
    first = resume_at["step"] if resume_at else 0
    micro_total = steps * run.accum
    task = progress.add_task(f"epoch {epoch}", total=micro_total, completed=first * run.accum, info="") \
        if progress else None
    done = resume_at or {"loss_sum": 0.0, "images": 0, "seconds": 0.0}
    loss_sum = torch.full((), float(done["loss_sum"]), device=run.device)
    ek = epoch_key(run.cfg.train.seed, dist.rank(), epoch)
    images, wait, started = int(done["images"]), 0.0, time.perf_counter() - done["seconds"]
    lr = run.scheduler.value(epoch * steps + first)
    stopped_at = None
    it = loader.iter_from(first * run.accum)
    for micro in range(first * run.accum, micro_total):
        t0 = time.perf_counter()
        x, y = next(it)
        wait += time.perf_counter() - t0
        step = epoch * steps + micro // run.accum
        last_micro = (micro + 1) % run.accum == 0
        # Drop-path draws from the global RNG (CPU and CUDA), seeded per (seed, rank, epoch, micro-batch) like the
        # data keys: every rank has its own stream, and a run resumed at any step on any number of processes draws
        # what an uninterrupted one would, without carrying RNG states (which are per rank and per device).
        torch.manual_seed(int(combine(ek, np.uint64(micro))) & 0x7FFF_FFFF_FFFF_FFFF)
        loss_sum += train_micro_batch(run, x, y, step, last_micro)
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
                raise TrainingDiverged(f"loss is {mean} at epoch {epoch}, step {step}; stopping. The last good "
                                       f"checkpoint is kept; lower optim.lr or use train.amp: bf16")
            if progress:
                progress.update(task, completed=micro + 1, info=f"loss {mean:.4f} lr {lr:.2e}")
        if last_micro and micro + 1 < micro_total and run.stop.should_stop():
            stopped_at = (micro + 1) // run.accum
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
        return {"stopped_at_step": stopped_at, "steps": steps, "loss_sum": mean_sum, "images": images,
                "seconds": elapsed}
    report = loader.epoch_report()  # JPEGs the GPU decoder refused on this rank (reasons: this rank's)
    counts = torch.tensor([float(images), float(report.get("cpu_decoded", 0))]).to(loss_sum.device)
    total = dist.all_reduce_sum(torch.cat([loss_sum[None], counts])).tolist()
    row = {"train_loss": total[0] / (micro_total * dist.world()), "lr": lr, "img_per_s": total[1] / elapsed,
           "data_wait_frac": wait / elapsed, "train_seconds": elapsed}
    if total[2]:
        row.update(cpu_decoded=int(total[2]), cpu_decoded_reasons=report.get("cpu_decoded_reasons", {}))
    return row


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, amp: str, progress: Progress | None = None) -> dict:
    model.eval()
    correct1 = correct5 = n = 0
    task = progress.add_task("eval", total=len(loader), info="") if progress else None
    for x, y in loader:
        with autocast(x.device, amp):
            logits = model(x)
        top5 = logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices
        hit = top5 == y[:, None]
        correct1 += hit[:, 0].sum()
        correct5 += hit.any(dim=-1).sum()
        n += len(y)
        if progress:
            progress.advance(task)
    if progress:
        progress.remove_task(task)
    # Each rank saw its own unpadded shard: summing the counts gives every sample exactly once.
    device = next(model.parameters()).device
    sums = dist.all_reduce_sum(torch.tensor([float(correct1), float(correct5), float(n)], dtype=torch.float64,
                                            device=device))
    c1, c5, n = sums.tolist()
    return {"acc1": 100.0 * c1 / max(n, 1), "acc5": 100.0 * c5 / max(n, 1), "n": int(n)}


def _reset_peak_memory(device: torch.device) -> None:
    """At the start of each run: `ablate` runs several in one process, and each reports its own peak. (On a CPU
    the peak is the process's resident set, which cannot be reset.)"""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _max_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _payload(run: Run, epoch: int, best: float, resume_at: dict | None = None) -> dict:
    """`epoch` is the last completed epoch; `resume_at` the position inside the next one (mid-epoch checkpoints)."""
    return {"model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "ema": run.ema.module.state_dict() if run.ema is not None else None,
            "epoch": epoch, "best_acc1": best, "config": to_dict(run.cfg),
            "resume_at": resume_at}


# May change on resume: what does not change the computation, and schedule.epochs (extending a run).
_RESUMABLE = NO_EFFECT_KEYS | {"schedule.epochs"}


def _oom_message(cfg: Config, device: torch.device, error: Exception) -> str:
    plan = batch_plan(cfg, dist.world())
    b, accum = plan.per_process, plan.accum
    detail = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    hint = (f"--set data.batch_size={b // 2} keeps train.global_batch {cfg.train.global_batch} with {2 * accum} "
            "accumulation steps instead of " + str(accum)) if b > 1 else "use a smaller model or aug.img_size"
    return f"out of memory on {device} with data.batch_size {b} per process ({detail}); {hint}"


def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (isinstance(e, RuntimeError) and (
        "not enough memory" in text or "can't allocate memory" in text or "out of memory" in text.lower()))


def train(cfg: Config, out_dir: str | Path, device: torch.device, resume: str | None = None,
          force: bool = False, quiet: bool = False, stop_after_epoch: int | None = None,
          handle_sigterm: bool = False) -> list[dict]:
    """Train from scratch or `resume`; `stop_after_epoch` ends this process's share of the run early (the
    schedule still spans schedule.epochs), as a time limit or preemption would. With `handle_sigterm`, SIGTERM
    stops at the next step boundary, writes a checkpoint of that position and raises `Preempted`."""
    previous, stop = None, StopFlag()
    try:
        if handle_sigterm and threading.current_thread() is threading.main_thread():
            def on_sigterm(signum, frame):
                stop.requested = True
            previous = signal.signal(signal.SIGTERM, on_sigterm)
        return _train(cfg, Path(out_dir), device, resume, force, quiet, stop_after_epoch, stop)
    except (RuntimeError, MemoryError) as e:  # numpy (FFCV's buffers) raises MemoryError, torch a RuntimeError
        if _is_oom(e):
            raise OutOfMemory(_oom_message(cfg, device, e)) from None
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _train(cfg: Config, out: Path, device: torch.device, resume: str | None, force: bool, quiet: bool,
           stop_after_epoch: int | None, stop: StopFlag) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    _reset_peak_memory(device)
    run = build(cfg, device)
    run.stop = stop
    start, best, resume_at = 0, -1.0, None
    resume_from = ckpt.find_resume(resume, out)
    if resume_from is not None:
        state = ckpt.load(resume_from)
        changed = [k for k in differences(state["config"], to_dict(cfg)) if k not in _RESUMABLE]
        if changed and not force:
            raise ConfigMismatch(f"{resume_from} was written with a different config ({', '.join(changed)}); "
                                 "resume with the same config, or pass --force")
        run.raw_model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scaler.load_state_dict(state["scaler"])
        if run.ema is not None and state.get("ema") is not None:
            run.ema.module.load_state_dict(state["ema"])
        start, best, resume_at = state["epoch"] + 1, state["best_acc1"], state.get("resume_at")
    main = dist.is_main()  # only rank 0 writes the run dir and talks
    quiet = quiet or not main
    history = []
    metrics_path = out / "metrics.jsonl"
    if main:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        facts = run_facts(run)
        (out / "run.json").write_text(json.dumps(facts, indent=1) + "\n")
        if not quiet:
            print(describe_run(facts), flush=True)
        if resume_from is None and metrics_path.exists():
            metrics_path.unlink()
        elif resume_from is not None:
            _keep_rows_until(metrics_path, start - 1)
    progress = _progress() if not quiet else None
    with progress or nullcontext():
        for epoch in range(start, cfg.schedule.epochs):
            stats = train_one_epoch(run, epoch, progress, resume_at)
            resume_at = None
            if "stopped_at_step" in stats:
                if main:
                    ckpt.save(out / ckpt.LAST, _payload(run, epoch - 1, best, {
                        "step": stats["stopped_at_step"], **{k: stats[k] for k in ("loss_sum", "images", "seconds")}}))
                dist.barrier()
                raise Preempted(out / ckpt.LAST, epoch, stats["stopped_at_step"], stats["steps"])
            row = {"epoch": epoch, **stats, "val_acc1": None, "val_acc5": None}
            if run.val_loader is not None:
                ev = evaluate(run.model, run.val_loader, run.amp, progress)
                row.update(val_acc1=ev["acc1"], val_acc5=ev["acc5"])
            row["max_mem_mb"] = _max_mem_mb(device)
            history.append(row)
            acc = row["val_acc1"] if row["val_acc1"] is not None else -row["train_loss"]
            if main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                ckpt.save(out / ckpt.LAST, _payload(run, epoch, max(best, acc)))
                if acc > best:
                    ckpt.save(out / ckpt.BEST, _payload(run, epoch, acc))
            best = max(best, acc)
            if not quiet:
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            if main and row.get("cpu_decoded"):
                reasons = ", ".join(f"{n} {why}" for why, n in row["cpu_decoded_reasons"].items())
                print(f"epoch {epoch}: {row['cpu_decoded']} JPEGs the GPU decoder refuses were decoded on the CPU "
                      f"({reasons})", file=sys.stderr, flush=True)
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break
            if run.stop.should_stop() and epoch + 1 < cfg.schedule.epochs:  # SIGTERM in the epoch's last step
                dist.barrier()
                raise Preempted(out / ckpt.LAST, epoch + 1, 0, len(run.train_loader) // run.accum)
    if main:
        plot_curves(metrics_path, out / "curves.png")
    dist.barrier()  # nobody leaves before the last checkpoint is on disk
    return history


def run_facts(run: Run) -> dict:
    """What this process actually runs with, beyond the config: written to the run dir as run.json."""
    cfg, device = run.cfg, run.device
    return {"amp": run.amp, "amp_config": cfg.train.amp, "device": device_name(device), "world_size": dist.world(),
            "per_process_batch": run.batch.per_process, "accumulation_steps": run.accum,
            "global_batch": cfg.train.global_batch, "batch_note": run.batch.note, "torch": torch.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def describe_run(f: dict) -> str:
    amp = f["amp"] if f["amp_config"] == f["amp"] else f"{f['amp_config']} -> {f['amp']}"
    line = (f"{f['device']} x {f['world_size']}, amp {amp}, global batch {f['global_batch']} = "
            f"{f['per_process_batch']} per process x {f['world_size']} x {f['accumulation_steps']} accumulation")
    return line + (f"\n{f['batch_note']}" if f["batch_note"] else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({len(os.sched_getaffinity(0))} cores)"


def _keep_rows_until(metrics_path: Path, last_epoch: int) -> None:
    """A run killed between logging an epoch and saving its checkpoint redoes that epoch on resume: drop its row
    (and any later one), so every epoch is logged once."""
    if not metrics_path.exists():
        return
    lines = metrics_path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] <= last_epoch]
    if len(kept) != len(lines):
        metrics_path.write_text("".join(line + "\n" for line in kept))


def plot_curves(metrics_path: Path, png: Path) -> None:
    if not metrics_path.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(ep, [r["train_loss"] for r in rows])
    axes[0].set_title("train loss")
    if rows[0].get("val_acc1") is not None:
        axes[1].plot(ep, [r["val_acc1"] for r in rows], label="top-1")
        axes[1].plot(ep, [r["val_acc5"] for r in rows], label="top-5")
        axes[1].legend()
    axes[1].set_title("val accuracy (%)")
    axes[2].plot(ep, [r["lr"] for r in rows])
    axes[2].set_title("learning rate (end of epoch)")
    for a in axes:
        a.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)

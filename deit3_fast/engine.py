"""Training and evaluation: config -> components -> loop. The loop does not know which engine feeds it.

One optimiser step = `accum` micro-batches of `data.batch_size`; global batch = batch_size x world x accum, which
must equal `train.global_batch`. The learning rate is set every step (schedule.py). Losses stay on the device and
are read back every `train.log_every` steps, so the host never waits for the device in between.
"""
from __future__ import annotations

import json
import math
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pipelines import AMP_DTYPES, build_loader
from pipelines.crops import epoch_key

from . import checkpoint as ckpt
from . import distributed as dist
from .config import Config, ConfigError, to_dict
from .losses import RecipeLoss
from .models import create_model
from .optim import build_optimizer
from .schedule import WarmupCosine


class TrainingDiverged(Exception):
    pass


class ConfigMismatch(Exception):
    pass


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
    ema: object | None = None


def accumulation_steps(cfg: Config, world: int) -> int:
    per_step = cfg.data.batch_size * world
    if cfg.train.global_batch % per_step:
        raise ConfigError(f"train.global_batch {cfg.train.global_batch} is not a multiple of data.batch_size "
                         f"{cfg.data.batch_size} x world size {world}")
    return cfg.train.global_batch // per_step


def build(cfg: Config, device: torch.device) -> Run:
    torch.manual_seed(cfg.train.seed)  # the same init on every rank (DDP also broadcasts rank 0's)
    accum = accumulation_steps(cfg, dist.world())
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, img_size=cfg.aug.img_size,
                         drop_path=cfg.model.drop_path, layer_scale_init=cfg.model.layer_scale_init,
                         checkpoint=cfg.model.checkpoint).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = cfg.optim
    optimizer = build_optimizer(o.name, model, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas),
                                eps=o.eps, max_grad_norm=o.max_grad_norm)
    forward = model
    if dist.world() > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(forward) if cfg.train.compile else forward
    train_loader = build_loader(cfg, "train", device)
    val_loader = build_loader(cfg, "val", device) if cfg.data.val else None
    steps_per_epoch = max(1, len(train_loader) // accum)
    s = cfg.schedule
    scheduler = WarmupCosine(optimizer, steps_per_epoch, lr=o.lr, epochs=s.epochs, warmup_epochs=s.warmup_epochs,
                             warmup_lr=s.warmup_lr, min_lr=s.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    ema = None
    if cfg.train.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
    return Run(cfg, forward, model, optimizer, scaler, scheduler, RecipeLoss(cfg.loss, cfg.aug.label_smoothing),
               train_loader, val_loader, device, accum, ema)


def autocast(device: torch.device, amp: str):
    """The forward pass's autocast for train.amp (bf16 | fp16 | fp32 = none)."""
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp != "fp32" else nullcontext()


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), transient=True)


def train_one_epoch(run: Run, epoch: int, progress: Progress | None = None) -> dict:
    model, opt, loader = run.model, run.optimizer, run.train_loader
    model.train()
    loader.set_epoch(epoch)
    # Drop-path draws from the global RNG: seeded per (seed, rank, epoch), like the data keys, so every rank has its
    # own stream and a resumed epoch draws what an uninterrupted one would.
    torch.manual_seed(int(epoch_key(run.cfg.train.seed, dist.rank(), epoch)) & 0x7FFF_FFFF_FFFF_FFFF)
    steps = max(1, len(loader) // run.accum)
    micro_total = steps * run.accum
    task = progress.add_task(f"epoch {epoch}", total=micro_total, info="") if progress else None
    loss_sum = torch.zeros((), device=run.device)
    images, wait, started = 0, 0.0, time.perf_counter()
    lr = run.scheduler(epoch * steps)
    it = iter(loader)
    for micro in range(micro_total):
        t0 = time.perf_counter()
        x, y = next(it)
        wait += time.perf_counter() - t0
        step = epoch * steps + micro // run.accum
        with autocast(run.device, run.cfg.train.amp):
            loss = run.loss(model(x), y)
        run.scaler.scale(loss / run.accum).backward()
        loss_sum += loss.detach()
        images += len(x)
        if (micro + 1) % run.accum == 0:
            lr = run.scheduler(step)
            run.scaler.step(opt)
            run.scaler.update()
            opt.zero_grad(set_to_none=True)
            if run.ema is not None:
                run.ema.update(run.raw_model)
        if (micro + 1) % run.cfg.train.log_every == 0 or micro + 1 == micro_total:
            # The one host sync, every log_every micro-batches; summed over ranks, so all ranks stop together.
            mean = dist.all_reduce_sum(loss_sum.clone()).item() / ((micro + 1) * dist.world())
            if not math.isfinite(mean):
                raise TrainingDiverged(f"loss is {mean} at epoch {epoch}, step {step}; stopping. The last good "
                                       f"checkpoint is kept; lower optim.lr or use train.amp: bf16")
            if progress:
                progress.update(task, completed=micro + 1, info=f"loss {mean:.4f} lr {lr:.2e}")
    for _ in it:  # the engine's epoch ends cleanly even when accumulation leaves micro-batches over
        pass
    elapsed = time.perf_counter() - started
    if progress:
        progress.remove_task(task)
    total = dist.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(images), device=loss_sum.device)]))
    return {"train_loss": total[0].item() / (micro_total * dist.world()), "lr": lr,
            "img_per_s": total[1].item() / elapsed,
            "data_wait_frac": wait / elapsed, "train_seconds": elapsed}


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


def _max_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _payload(run: Run, epoch: int, best: float) -> dict:
    return {"model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "ema": run.ema.module.state_dict() if run.ema is not None else None,
            "epoch": epoch, "best_acc1": best, "rng": ckpt.rng_state(), "config": to_dict(run.cfg)}


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}")
    return out


# Changing these on resume does not change what the run computes.
_RESUMABLE = {"schedule.epochs", "train.log_every", "data.workers", "data.train", "data.val", "data.os_cache"}


def train(cfg: Config, out_dir: str | Path, device: torch.device, resume: str | None = None,
          force: bool = False, quiet: bool = False, stop_after_epoch: int | None = None) -> list[dict]:
    """Train from scratch or `resume`; `stop_after_epoch` ends this process's share of the run early (the
    schedule still spans schedule.epochs), as a time limit or preemption would."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = build(cfg, device)
    start, best = 0, -1.0
    resume_from = ckpt.find_resume(resume, out)
    if resume_from is not None:
        state = ckpt.load(resume_from)
        changed = [k for k in _differences(state["config"], to_dict(cfg)) if k not in _RESUMABLE]
        if changed and not force:
            raise ConfigMismatch(f"{resume_from} was written with a different config ({', '.join(changed)}); "
                                 "resume with the same config, or pass --force")
        run.raw_model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scaler.load_state_dict(state["scaler"])
        if run.ema is not None and state.get("ema") is not None:
            run.ema.module.load_state_dict(state["ema"])
        ckpt.set_rng_state(state["rng"])
        start, best = state["epoch"] + 1, state["best_acc1"]
    main = dist.is_main()  # only rank 0 writes the run dir and talks
    quiet = quiet or not main
    history = []
    metrics_path = out / "metrics.jsonl"
    if main:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if resume_from is None and metrics_path.exists():
            metrics_path.unlink()
    progress = _progress() if not quiet else None
    with progress or nullcontext():
        for epoch in range(start, cfg.schedule.epochs):
            stats = train_one_epoch(run, epoch, progress)
            row = {"epoch": epoch, **stats, "val_acc1": None, "val_acc5": None}
            if run.val_loader is not None:
                ev = evaluate(run.model, run.val_loader, cfg.train.amp, progress)
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
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break
    if main:
        plot_curves(metrics_path, out / "curves.png")
    dist.barrier()  # nobody leaves before the last checkpoint is on disk
    return history


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

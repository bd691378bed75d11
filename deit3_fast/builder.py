"""The run's builder: the components of a run, built from a config (`build`): model, optimiser, schedule, loss,
loaders, and the batch arithmetic, held in one `Run`; the loop that uses them is trainer.py.

`build` is config -> each section's own `build` (optim.OptimConfig, schedule.ScheduleConfig and its resolution) and
the factories of the rest (models.build_model, losses.RecipeLoss, loaders.make_loader), the same
for `train`, `profile` and the tests. With `schedule.resolution` the model takes any patch grid and each epoch's
size (and, with `batch_sizes`, its batch plan) comes from `Run.train_size` / `Run.batch_at`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import timedelta

import torch

from dataset_tools.shards import classes_of
from pipelines import DataError, check_same_classes
from pipelines.registry import engine_info

from . import distributed as dist
from .batching import BatchPlan, batch_plan, batch_plans
from .checkpoint import RunState
from .config import Config, parse_sets, resolve_num_classes
from .device import device_name, resolve_amp
from .evalsets import class_mask
from .loaders import make_loader
from .losses import RecipeLoss
from .models import build_model
from .schedule import WarmupCosine


class StopFlag:
    """`requested`: set by this process's SIGTERM handler. `agreed`: some rank's request, as every rank learnt it at
    the same log point; with several processes only that one may end the run, or the ranks would part ways."""

    requested = False
    agreed = False

    def should_stop(self) -> bool:
        return self.agreed or (dist.world() == 1 and self.requested)


@dataclass
class Run:
    """Everything a run computes with; `state_dict` is what a checkpoint saves of it."""

    cfg: Config  # the config as given (what the run dir records and a resume compares)
    model: torch.nn.Module  # what runs forward: compiled when train.compile, DDP-wrapped with several ranks
    raw_model: torch.nn.Module  # its parameters and state dict (no '_orig_mod.' / 'module.' prefixes)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: WarmupCosine
    loss: RecipeLoss
    train_loader: object
    val_loader: object
    device: torch.device
    amp: str  # the AMP dtype in use (train.amp: auto resolved for this device)
    batch: BatchPlan  # per-process batch and accumulation steps (at aug.img_size)
    ema: object | None = None
    ddp: torch.nn.parallel.DistributedDataParallel | None = None
    stop: StopFlag = field(default_factory=StopFlag)  # train() hands in the one its SIGTERM handler sets
    extra_val: list = field(default_factory=list)  # (name, loader, class mask) of train.extra_val
    resolutions: list[int] | None = None  # schedule.resolution: each epoch's training crop size (None: img_size)
    batches: dict[int, BatchPlan] = field(default_factory=dict)  # schedule.resolution.batch_sizes, by size

    def train_size(self, epoch: int) -> int:
        """The training crop size of `epoch`; evaluation always runs at aug.img_size."""
        if self.resolutions is None:
            return self.cfg.aug.img_size
        return self.resolutions[min(epoch, len(self.resolutions) - 1)]

    def batch_at(self, epoch: int) -> BatchPlan:
        """The per-process batch and accumulation steps of `epoch`: the global batch is the same in every epoch."""
        return self.batches.get(self.train_size(epoch), self.batch)

    @property
    def accum(self) -> int:
        return self.batch.accum

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch: the same at every size, as per-process batch x accumulation is."""
        return self.scheduler.steps_per_epoch

    def state_dict(self) -> dict:
        """The run state a checkpoint saves, in checkpoint.py's layout."""
        return RunState(
            self.raw_model.state_dict(),
            self.optimizer.state_dict(),
            self.scaler.state_dict(),
            self.ema.module.state_dict() if self.ema is not None else None,
        ).to_dict()

    def load_state_dict(self, state: dict) -> None:
        """`state_dict`'s dict, or a whole checkpoint payload (which holds it)."""
        s = RunState.from_dict(state)
        self.raw_model.load_state_dict(s.model)
        self.optimizer.load_state_dict(s.optimizer)
        if s.scaler:  # a bf16 run's is empty: resumed where `auto` is fp16 (a V100), the scaler starts fresh
            self.scaler.load_state_dict(s.scaler)
        if self.ema is not None and s.ema is not None:
            self.ema.module.load_state_dict(s.ema)


STAGE_TIMEOUT = timedelta(hours=12)  # data.stage_to: how long the other processes wait for a node's copy


def stage_data(cfg: Config) -> Config:
    """With data.stage_to, read the splits from node-local copies (dataset_tools.stage: the node's first process
    copies, verifying checksums and skipping what is there, while the others wait; an engine that reads one file
    (the registry's reads_shard_sets, e.g. ffcv) gets a shard set merged into one .beton)."""
    if not cfg.data.stage_to:
        return cfg
    from dataset_tools.beton import BetonError
    from dataset_tools.stage import stage_splits

    splits = {k: getattr(cfg.data, k) for k in ("train", "val") if getattr(cfg.data, k)}
    # A copy of ImageNet-21k takes longer than NCCL's 10-minute limit on a collective: the others wait on a group
    # of their own, made before the copy starts.
    merge = not engine_info(cfg.data.engine).reads_shard_sets
    waiting, failed = dist.long_wait_group(STAGE_TIMEOUT), None
    try:
        paths = stage_splits(splits, cfg.data.stage_to, merge_shards=merge, copy=dist.local_rank() == 0)
    except BetonError as e:
        failed = str(e)  # raised below, once every process knows (an exception kept in a local would hold this
        # frame, and with it the group and its threads, in a reference cycle until exit: an abort there)
    ok = dist.all_ok(failed is None, waiting)  # one node's failed copy ends every process's wait
    dist.release(waiting)
    if not ok:
        raise DataError(failed or "data.stage_to: the copy failed on a node (its first process's log says why)")
    return replace(cfg, data=replace(cfg.data, **paths))


def fresh_compile_caches(sizes: list[int] | None) -> None:
    """Start a run with torch.compile's caches empty and room in them for each size the run trains at.

    Dynamo keeps compiled graphs on the compiled function's code, which every run in a process shares (each
    BatchAugment's fused pass and RandAugment, each Lamb's update, each model's forward): a process that builds several
    runs (ablate, profile --tune) would add each run's graphs to the last's, and past the recompile limit (8 a
    function) dynamo runs the function eagerly, with one line in the log. Within a run, a function compiles one
    static graph per size (sizes are a few multiples of schedule.resolution.step) rather than one dynamic-shape graph:
    two on a CPU for the batch augmentation (its 16-image slices and the rest of the batch), and the model's
    evaluation adds a few."""
    import torch._dynamo

    torch._dynamo.reset()
    if sizes:
        limit = 2 * len(set(sizes)) + 4
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


def build(cfg: Config, device: torch.device) -> Run:
    cfg = resolve_num_classes(cfg)
    torch.manual_seed(cfg.train.seed)  # the same init on every rank (DDP also broadcasts rank 0's)
    plan, batches = batch_plan(cfg, dist.world()), batch_plans(cfg, dist.world())  # bad arithmetic fails first
    amp = resolve_amp(cfg.train.amp, device)
    sizes = cfg.schedule.resolution.build(cfg.aug.img_size, cfg.schedule.epochs)
    fresh_compile_caches(sizes)
    # Progressive resolution: timm's dynamic image size resamples pos_embed (bicubic) for each epoch's patch grid;
    # at aug.img_size it is used as it is, so evaluation and checkpoints are those of a fixed-size model.
    model = build_model(cfg.model, cfg.aug.img_size, **({"dynamic_img_size": True} if sizes else {})).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = cfg.optim.build(model, compile=cfg.train.compile)
    forward = ddp = None
    if dist.world() > 1:
        forward = ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward = forward or model
    forward = torch.compile(forward, dynamic=False if sizes else None) if cfg.train.compile else forward
    train_loader = make_loader(cfg, "train", device, amp=amp, batch_size=plan.per_process)
    samples = train_loader.samples  # this rank's, per epoch (training drops the rest)
    for p in [plan, *batches.values()]:
        if samples // p.per_process < p.accum:
            raise DataError(
                f"{cfg.data.train}: an epoch has {samples // p.per_process} batch(es) of {p.per_process} "
                f"per process, fewer than one optimiser step ({p.accum} micro-batches); lower "
                "data.batch_size (or schedule.resolution.batch_sizes) or train.global_batch"
            )
    if cfg.data.val:
        check_same_classes(cfg.data.train, cfg.data.val)
    val_loader = make_loader(cfg, "val", device, amp=amp, batch_size=plan.per_process) if cfg.data.val else None
    scheduler = cfg.schedule.build(optimizer, max(1, len(train_loader) // plan.accum), lr=cfg.optim.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    ema = None
    if cfg.train.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
    return Run(
        cfg,
        forward,
        model,
        optimizer,
        scaler,
        scheduler,
        RecipeLoss(cfg.loss, cfg.aug.label_smoothing),
        train_loader,
        val_loader,
        device,
        amp,
        plan,
        ema,
        ddp,
        extra_val=_extra_val_loaders(cfg, device, amp, plan.per_process),
        resolutions=sizes,
        batches=batches,
    )


def _extra_val_loaders(cfg: Config, device: torch.device, amp: str, batch: int) -> list:
    """train.extra_val's sets (ImageNet-V2, -A, -R, ...): a loader and a class mask each, checked at start."""
    out = []
    for s in parse_sets(cfg.train.extra_val):
        check_same_classes(cfg.data.train, s.path)
        loader = make_loader(replace(cfg, data=replace(cfg.data, val=s.path)), "val", device, amp=amp, batch_size=batch)
        out.append((s.name, loader, class_mask(s.name, classes_of(s.path), cfg.model.num_classes)))
    return out


def run_facts(run: Run) -> dict:
    """What this process actually runs with, beyond the config: written to the run dir as run.json."""
    cfg, device = run.cfg, run.device
    return {
        "amp": run.amp,
        "amp_config": cfg.train.amp,
        "device": device_name(device),
        "world_size": dist.world(),
        "per_process_batch": run.batch.per_process,
        "accumulation_steps": run.accum,
        "global_batch": cfg.train.global_batch,
        "batch_note": run.batch.note,
        "batch_by_size": {
            size: {"per_process_batch": p.per_process, "accumulation_steps": p.accum, "batch_note": p.note}
            for size, p in run.batches.items()
        }
        or None,
        "cpu": run.train_loader.cpu_share.facts(),  # data.workers and torch's threads as resolved (cores.py)
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

"""`deit3-fast profile`: is a recipe input-bound or compute-bound on this machine, and what would change that.

Four measurements on the real components of a training run (the same `engine.build` as `train`):
  1. the engine alone: JPEG decode + primary crop (FFCV: CPU threads; DALI/nvjpeg: the GPU), uint8 batches;
  2. the device stage alone on one real batch: 3-Augment, jitter, flip, mixup/cutmix, normalisation;
  3. the model step alone on synthetic batches already on the device: forward, backward, LAMB, at the recipe's AMP
     dtype, with the FLOPs counted by torch's FlopCounterMode (matmuls and attention: the convention MFU uses) and
     divided by the device's matmul peak measured here, so MFU means the same on every machine;
  4. the real end-to-end training step: loader -> model -> optimiser.
Verdict: `input-bound` when end-to-end < 95% of model-alone, naming the slowest input stage and what to change.
Warm-up (FFCV's JIT, torch.compile) is excluded from every timing; CUDA timings are bracketed by synchronisation.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace

import torch

from . import engine
from .config import Config

COMPUTE_BOUND_RATIO = 0.95


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn, n: int, images_per_call: int, device: torch.device, warmup: int = 2) -> float:
    """Images per second over `n` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return n * images_per_call / (time.perf_counter() - t)


def _engine_batches(loader):
    """The engine's uint8 batches across epochs for as long as they are asked for (small sets have short epochs)."""
    epoch = 0
    while True:
        yield from loader.engine.batches(epoch)
        epoch += 1


def _loader_batches(loader):
    while True:
        yield from loader  # each pass moves on to the next epoch


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The best of a few square matmuls in `dtype`: the practical peak MFU is measured against."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = dtype if device.type == "cuda" or dtype == torch.float32 else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 4
    best = float("inf")
    for _ in range(3):
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / best / 1e12


def train_flops_per_image(run: engine.Run, x: torch.Tensor, y: torch.Tensor) -> float:
    """Forward + backward FLOPs of one micro-batch, per image (the optimiser's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, engine.autocast(run.device, run.cfg.train.amp):
        run.loss(run.raw_model(x), y).backward()
    run.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(x)


def profile(cfg: Config, device: torch.device, steps: int = 20) -> dict:
    cfg = replace(cfg, data=replace(cfg.data, val=None))
    run = engine.build(cfg, device)
    loader, b = run.train_loader, cfg.data.batch_size
    run.model.train()

    # 1 + 2: the input pipeline, split into its two stages, then whole.
    raw = _engine_batches(loader)
    engine_rate = _rate(lambda: next(raw), steps, b, device)
    images, labels = (t.clone() for t in next(raw))  # FFCV reuses its buffers
    raw.close()  # one pass at a time over an engine
    stage_rate = _rate(lambda: loader.prepare(0, images, labels), steps, b, device)
    whole = _loader_batches(loader)
    loader_rate = _rate(lambda: next(whole), steps, b, device)

    # 3: the model step alone, on one real batch's shapes and targets kept on the device.
    x, y = (t.clone() for t in next(whole))
    flops = train_flops_per_image(run, x, y)
    counter = iter(range(10**9))

    def micro_step(xb, yb):
        i = next(counter)
        engine.train_micro_batch(run, xb, yb, step=i // run.accum, last_micro=(i + 1) % run.accum == 0)

    model_rate = _rate(lambda: micro_step(x, y), steps, b, device, warmup=max(2, run.accum))
    # 4: end to end, as train_one_epoch runs it.
    end_to_end = _rate(lambda: micro_step(*next(whole)), steps, b, device, warmup=max(2, run.accum))
    whole.close()

    peak = matmul_peak_tflops(device, engine.AMP_DTYPES[cfg.train.amp])
    achieved = flops * model_rate / 1e12
    result = {
        "model": cfg.model.name, "img_size": cfg.aug.img_size, "batch_size": b, "amp": cfg.train.amp,
        "engine": cfg.data.engine, "workers": cfg.data.workers, "compile": cfg.train.compile,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "engine_img_per_s": engine_rate, "device_stage_img_per_s": stage_rate, "loader_img_per_s": loader_rate,
        "model_img_per_s": model_rate, "end_to_end_img_per_s": end_to_end,
        "ratio": end_to_end / model_rate, "gflop_per_image": flops / 1e9, "achieved_tflops": achieved,
        "peak_tflops": peak, "mfu": achieved / peak, "steps": steps,
    }
    result.update(verdict(result, cfg))
    return result


def verdict(r: dict, cfg: Config) -> dict:
    if r["ratio"] >= COMPUTE_BOUND_RATIO:
        return {"verdict": "compute-bound", "slowest_stage": "model",
                "advice": f"end-to-end is {r['ratio']:.0%} of the model alone: the input keeps up"}
    stages = {"engine": r["engine_img_per_s"], "device_stage": r["device_stage_img_per_s"]}
    slowest = min(stages, key=stages.get)
    if stages[slowest] >= r["model_img_per_s"]:
        advice = ("each input stage alone is faster than the model, but together they are not: the stages share "
                  "the same cores or device; give the loader its own cores (data.workers), or use a GPU engine")
    elif slowest == "engine" and cfg.data.engine == "ffcv":
        advice = (f"JPEG decode + crop on {cfg.data.workers} CPU workers gives {stages[slowest]:.0f} img/s for a "
                  f"model that takes {r['model_img_per_s']:.0f}: raise data.workers (this machine has "
                  f"{os.cpu_count()} cores), convert with a lower deit3-convert --max-resolution, or decode on "
                  "the GPU with --engine dali")
    elif slowest == "engine":
        advice = (f"the {cfg.data.engine} engine decodes {stages[slowest]:.0f} img/s: on a GPU machine run it with "
                  "--device cuda; otherwise raise data.workers or use --engine ffcv")
    else:
        advice = (f"the device augmentation stage runs at {stages[slowest]:.0f} img/s: set train.compile: true "
                  "(fuses its elementwise passes) or run on a GPU")
    return {"verdict": "input-bound", "slowest_stage": slowest, "advice": advice}


def render(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{r['model']} @ {r['img_size']}, batch {r['batch_size']}, {r['amp']}, {r['engine']} "
                        f"engine, {r['device']}")
    table.add_column("stage")
    table.add_column("img/s", justify="right")
    table.add_column("vs model", justify="right")
    m = r["model_img_per_s"]
    for name, key in (("decode + crop (engine)", "engine_img_per_s"),
                      ("augmentation (device stage)", "device_stage_img_per_s"),
                      ("loader (both)", "loader_img_per_s"), ("model step alone", "model_img_per_s"),
                      ("end to end", "end_to_end_img_per_s")):
        table.add_row(name, f"{r[key]:,.0f}", f"{r[key] / m:.2f}x")
    console = Console()
    console.print(table)
    console.print(f"model: {r['gflop_per_image']:.2f} GFLOP/image (fwd+bwd), {r['achieved_tflops']:.2f} TFLOP/s "
                  f"of a measured {r['peak_tflops']:.2f} TFLOP/s matmul peak: MFU {r['mfu']:.1%}")
    console.print(f"[bold]{r['verdict']}[/bold] (end to end = {r['ratio']:.0%} of model alone; slowest: "
                  f"{r['slowest_stage']}): {r['advice']}")

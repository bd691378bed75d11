"""`deit3-fast profile`: is a recipe input-bound or compute-bound on this machine, and what would change that.

Measurements on the real components of a training run (the same `builder.build` as `train`):
  1. the engine alone: JPEG decode + primary crop (FFCV: CPU threads; DALI/nvjpeg: the GPU), uint8 batches, and
     how many CPU cores it kept busy meanwhile (process CPU time / wall time);
  2. the batch augmentation alone on one real batch: 3-Augment, jitter, flip, mixup/cutmix, normalisation;
  3. the model alone on synthetic batches already on the device, at the recipe's AMP dtype: a micro-batch's forward
     and backward, and the optimiser step (LAMB/AdamW, scaler, EMA), timed apart and combined as a run does them:
     one step per `accum` micro-batches. FLOPs come from torch's FlopCounterMode (matmuls and attention, the
     convention MFU uses); MFU divides them by the matmul rate measured here in the same dtype at the model's own
     largest GEMM (MLP fc1), the best of every probe taken, and by the device's datasheet peak where it is known
     (`mfu_nominal`);
  4. the real end-to-end training step: loader -> forward/backward, with the same optimiser step.
Every timed window starts after warm-up (first batches, compilation, the optimiser's state allocation) and holds
only one kind of call, so a window can never catch a one-time cost or a different share of optimiser steps;
CUDA windows are bracketed by synchronisation. Each rate is timed REPEATS times: the median is reported with its
spread. Numbers that cannot be (end-to-end faster than the model alone, an MFU of 100% or more: `implausible`) are
measured again once, and if they still cannot be, reported as a failed measurement with no verdict. Otherwise the
verdict is `input-bound` when end-to-end < 95% of model-alone, naming the slowest input stage and what to change,
else `compute-bound`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from statistics import median

import torch

from pipelines.nvjpeg_engine import gpu_decoder_kind
from pipelines.registry import engine_info, engine_names

from . import trainer
from .config import Config
from .device import AMP_DTYPES, autocast, device_name

COMPUTE_BOUND_RATIO = 0.95
# End to end above this share of model-alone is a failed measurement (implausible): 5% of timing noise is allowed.
PLAUSIBLE_RATIO = 1.05
WARMUP = 3
# Each rate is timed REPEATS times and reported as the median with its spread (odd: the median is one of the
# measurements); a measuring pass that fails `implausible` is taken again, MEASURE_TRIES passes in all.
REPEATS = 3
MEASURE_TRIES = 2
# Dense bf16/fp16 tensor-core TFLOP/s from the datasheets (no sparsity), by a substring of the device name as torch
# reports it ("NVIDIA H100 80GB HBM3", "NVIDIA H100 NVL"); the longest key found in the name wins, so "H100 NVL" is
# not read as "H100", nor "H200" as "H20" (nominal_tflops).
NOMINAL_TFLOPS = (
    ("H200", 989.0),
    ("H200 NVL", 835.0),
    ("GH200", 989.0),
    ("H100", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H800", 989.0),  # the export H100 SXM: same tensor cores and clocks
    ("H800 PCIe", 756.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A10G", 125.0),
    ("L4", 121.0),
    ("V100", 125.0),
    ("T4", 65.0),
)


# The GPUs of the cores-per-GPU estimate when the GPU is not here: datasheet dense tensor-core TFLOP/s in the AMP dtype
# each trains in (V100 has no bf16), at a stated MFU (a ViT at batch 256 reaches 40-50% on these; 40% is the
# conservative side, which asks fewer cores).
REFERENCE_GPUS = (("V100", "fp16", 125.0), ("A100", "bf16", 312.0), ("H100", "bf16", 989.0))
REFERENCE_MFU = 0.4


def cores_per_gpu(
    gflop_per_image: float, cpu_img_per_s_per_core: float, tflops: float, mfu: float = REFERENCE_MFU
) -> tuple[float, float]:
    """(img/s one GPU trains at `mfu` of `tflops`, CPU cores whose CPU stage keeps up with it)."""
    gpu = tflops * 1e12 * mfu / (gflop_per_image * 1e9)
    return gpu, gpu / cpu_img_per_s_per_core


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_call(fn, n: int, device: torch.device, warmup: int = WARMUP) -> float:
    """Mean seconds per call of `fn` over `n` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / n


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and all its threads so far, at ns resolution: over a window,
    divided by the wall time, the number of cores kept busy."""
    return time.process_time()


def _engine_batches(loader):
    """The engine's uint8 batches across epochs for as long as they are asked for (small sets have short epochs)."""
    epoch = 0
    while True:
        yield from loader.raw_batches(epoch)
        epoch += 1


def _loader_batches(loader):
    while True:
        yield from loader  # each pass moves on to the next epoch


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, m: int = 4096, k: int = 1024, n: int = 4096) -> float:
    """The rate of an (m, k) @ (k, n) matmul in `dtype` on `device`: the best of a few timed repetitions after a
    warm-up. Called with the model's own GEMM shape and AMP dtype, it is what the model's matmuls can reach."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    flop = 2 * m * k * n
    t = time.perf_counter()
    a @ b  # warm-up: kernel selection, first-touch allocation
    once = time.perf_counter() - t
    # About 0.1 s per timed set on a CPU, from the warm-up's time: a count from the FLOPs alone assumed fast kernels,
    # and a CPU without native bf16 matmuls (emulated: ~1 GFLOP/s) took minutes.
    reps = max(1, min(50, int(2e12 / flop) if device.type == "cuda" else int(0.1 / max(once, 1e-6))))
    best = float("inf")
    for _ in range(3):
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t) / reps)
    return flop / best / 1e12


def model_gemm(model: torch.nn.Module, batch: int, device: torch.device) -> tuple[int, int, int]:
    """(m, k, n) of the model's largest GEMM, the MLP's first layer over every token of the batch (rows capped on
    a CPU, where the full-size product would take seconds and runs no faster)."""
    dim = getattr(model, "embed_dim", 1024)
    tokens = getattr(getattr(model, "patch_embed", None), "num_patches", 196) + 1
    rows = batch * tokens
    return (rows if device.type == "cuda" else min(rows, 2048)), dim, 4 * dim


def nominal_tflops(device: torch.device, amp: str) -> float | None:
    """The datasheet's dense tensor-core peak for bf16/fp16 on a known GPU (V100: fp16 only), else None."""
    if device.type != "cuda" or amp not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    if amp == "bf16" and "V100" in name or "T4" in name and amp == "bf16":
        return None
    found = [(len(key), peak) for key, peak in NOMINAL_TFLOPS if key in name]
    return max(found)[1] if found else None


def train_flops_per_image(run: trainer.Run, x: torch.Tensor, y: torch.Tensor) -> float:
    """Forward + backward FLOPs of one micro-batch, per image (the optimiser's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, autocast(run.device, run.amp):
        run.loss(run.raw_model(x), y).backward()
    run.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(x)


def _micro(run: trainer.Run, x: torch.Tensor, y: torch.Tensor) -> None:
    """Forward and backward of one micro-batch, gradients accumulated, no optimiser step."""
    trainer.train_micro_batch(run, x, y, step=0, last_micro=False, accum=run.accum)


def _optimizer_step(run: trainer.Run) -> None:
    """The optimiser step as a run takes it once per `accum` micro-batches (scheduler, scaler, EMA). Gradients are
    kept, so repeated calls time the same amount of work."""
    run.scheduler(0)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.ema is not None:
        run.ema.update(run.raw_model)


@dataclass(frozen=True)
class Measurements:
    """One measuring pass (`measure`): each rate once per repeat, in img/s (the model's and end to end's as whole
    optimiser steps), the matmul probe's TFLOP/s per repeat, and the median times the two step rates come from."""

    engine: tuple[float, ...]
    engine_cpu_cores: float
    device_stage: tuple[float, ...]
    loader: tuple[float, ...]
    model: tuple[float, ...]
    end_to_end: tuple[float, ...]
    micro_batch_ms: float
    end_to_end_micro_batch_ms: float
    optimizer_step_ms: float
    peak_tflops: tuple[float, ...]


def measure(run: trainer.Run, device: torch.device, steps: int, repeats: int) -> Measurements:
    """Every rate `repeats` times, `steps` timed calls each. The model-alone and end-to-end windows alternate, with a
    matmul probe between them, so a load that comes and goes on a shared machine falls on both rates, not one."""
    loader, b, accum = run.train_loader, run.batch.per_process, run.accum

    # 1 + 2: the input pipeline, split into its two stages, then whole.
    raw = _engine_batches(loader)
    for _ in range(WARMUP):
        next(raw)
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    engine = [b / _seconds_per_call(lambda: next(raw), steps, device, warmup=0) for _ in range(repeats)]
    engine_cores = (_cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
    images, labels = (t.clone() for t in next(raw))  # FFCV reuses its buffers
    raw.close()  # one pass at a time over an engine
    stage = [b / _seconds_per_call(lambda: loader.prepare(0, images, labels), steps, device) for _ in range(repeats)]
    whole = _loader_batches(loader)
    loader_rates = [b / _seconds_per_call(lambda: next(whole), steps, device) for _ in range(repeats)]

    # 3 + 4: the model alone on one real batch's shapes and targets kept on the device, then end to end (the loader
    # feeding forward/backward), the same optimiser step in both.
    x, y = (t.clone() for t in next(whole))
    opt_steps = max(2, min(steps, 10))
    gemm = model_gemm(run.raw_model, b, device)
    micro_model, micro_e2e, opt, peaks = [], [], [], []
    for _ in range(repeats):
        micro_model.append(_seconds_per_call(lambda: _micro(run, x, y), steps, device))
        opt.append(_seconds_per_call(lambda: _optimizer_step(run), opt_steps, device))
        peaks.append(matmul_peak_tflops(device, AMP_DTYPES[run.amp], *gemm))
        micro_e2e.append(_seconds_per_call(lambda: _micro(run, *next(whole)), steps, device))
    whole.close()
    run.optimizer.zero_grad(set_to_none=True)

    opt_step = median(opt)

    def rate(micro: float) -> float:  # images per second of whole optimiser steps
        return b * accum / (accum * micro + opt_step)

    return Measurements(
        engine=tuple(engine),
        engine_cpu_cores=engine_cores,
        device_stage=tuple(stage),
        loader=tuple(loader_rates),
        model=tuple(map(rate, micro_model)),
        end_to_end=tuple(map(rate, micro_e2e)),
        micro_batch_ms=median(micro_model) * 1e3,
        end_to_end_micro_batch_ms=median(micro_e2e) * 1e3,
        optimizer_step_ms=opt_step * 1e3,
        peak_tflops=tuple(peaks),
    )


def _impossible_mfu(mfu: float | None, mfu_nominal: float | None) -> list[str]:
    """No model computes faster than the peak of its own matmuls, measured or on the datasheet (MFU < 1)."""
    why = []
    if mfu is not None and mfu >= 1:
        why.append(f"MFU {mfu:.0%} of the measured matmul peak, which cannot be")
    if mfu_nominal is not None and mfu_nominal >= 1:
        why.append(f"MFU {mfu_nominal:.0%} of the datasheet peak, which cannot be")
    return why


def implausible(ratio: float, mfu: float | None, mfu_nominal: float | None = None) -> str | None:
    """Why a measurement cannot be right, else None: the one check behind profile's verdict, --tune's rows and
    doctor's. End to end runs the model alone plus the loader, so it cannot be faster than the model alone by more
    than timing noise (PLAUSIBLE_RATIO); nor can an MFU reach 1 (_impossible_mfu). Both happen when a shared
    machine's load falls on one timed window and not the other."""
    why = [f"end-to-end {ratio:.0%} of model-alone, which cannot be"] if ratio > PLAUSIBLE_RATIO else []
    why += _impossible_mfu(mfu, mfu_nominal)
    if not why:
        return None
    return f"measurement failed ({'; '.join(why)}; the machine is probably shared)"


def _spread(samples: tuple[float, ...]) -> dict:
    mid = median(samples)
    return {"min": min(samples), "max": max(samples), "relative": (max(samples) - min(samples)) / mid if mid else 0.0}


def profile(
    cfg: Config, device: torch.device, steps: int = 20, repeats: int = REPEATS, tries: int = MEASURE_TRIES
) -> dict:
    """The measurements, their medians and spread, and one verdict. A measurement that fails `implausible` is taken
    again, up to `tries` passes in all; the last pass is reported, against the best matmul peak of all of them."""
    cfg = replace(cfg, data=replace(cfg.data, val=None))
    run = trainer.build(cfg, device)
    loader, b, accum = run.train_loader, run.batch.per_process, run.accum
    run.model.train()

    raw = loader.raw_batches(0)
    images, labels = (t.clone() for t in next(raw))
    raw.close()
    first = loader.prepare(0, images, labels)
    x, y = first.images, first.targets
    flops = train_flops_per_image(run, x, y)
    nominal = nominal_tflops(device, run.amp)
    peaks: list[float] = []
    passes = 0
    while True:
        passes += 1
        m = measure(run, device, steps, repeats)
        # A peak is a maximum: the best probe of every pass, so one probe that a burst of load slowed cannot set it.
        peaks += m.peak_tflops
        model_rate, end_to_end = median(m.model), median(m.end_to_end)
        achieved, peak = flops * model_rate / 1e12, max(peaks)
        mfu, mfu_nominal = achieved / peak, (achieved / nominal if nominal else None)
        failed = implausible(end_to_end / model_rate, mfu, mfu_nominal)
        if failed is None or passes >= tries:
            break
    mfu_ok = not _impossible_mfu(mfu, mfu_nominal)  # a ratio-only failure still shows its (possible) MFU
    # The CPU stage (decode + crop on CPU threads: an engine that decodes on the CPU, or any engine run on a CPU):
    # img/s per busy core, and how many such cores a GPU needs, this one (measured) or the reference ones (nominal
    # rate at REFERENCE_MFU).
    engine_rate = median(m.engine)
    on_cpu = engine_info(cfg.data.engine).decodes_on_cpu(device.type)
    per_core = engine_rate / m.engine_cpu_cores if on_cpu and m.engine_cpu_cores > 0.05 else None
    cores = None
    if per_core:
        cores = {
            f"{name} {dt} @ {REFERENCE_MFU:.0%} MFU": cores_per_gpu(flops / 1e9, per_core, tf)[1]
            for name, dt, tf in REFERENCE_GPUS
        }
        if device.type == "cuda":
            cores = {f"this GPU (model alone, {model_rate:,.0f} img/s)": model_rate / per_core, **cores}
    rates = {
        "engine_img_per_s": m.engine,
        "device_stage_img_per_s": m.device_stage,
        "loader_img_per_s": m.loader,
        "model_img_per_s": m.model,
        "end_to_end_img_per_s": m.end_to_end,
    }
    result = {
        "model": cfg.model.name,
        "img_size": cfg.aug.img_size,
        "batch_size": b,
        "accum": accum,
        "amp": run.amp,
        "engine": cfg.data.engine,
        "workers": run.train_loader.cpu_share.workers,  # data.workers: auto resolved
        "torch_threads": run.train_loader.cpu_share.torch_threads,
        "compile": cfg.train.compile,
        "device": device_name(device),
        "jpeg_decoder": gpu_decoder_kind(device),
        **{key: median(samples) for key, samples in rates.items()},
        # Each rate's min and max over its repeats, and (max - min) / median: how far apart the repeats were.
        "spread": {key: _spread(samples) for key, samples in rates.items()},
        "engine_cpu_cores": m.engine_cpu_cores,
        "micro_batch_ms": m.micro_batch_ms,
        "optimizer_step_ms": m.optimizer_step_ms,
        "end_to_end_micro_batch_ms": m.end_to_end_micro_batch_ms,
        "ratio": end_to_end / model_rate,
        "gflop_per_image": flops / 1e9,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "mfu": mfu if mfu_ok else None,  # None: the measurement failed (see measurement_failed)
        "nominal_tflops": nominal,
        "mfu_nominal": mfu_nominal if mfu_ok else None,
        "measurement_failed": failed,
        "passes": passes,
        "repeats": repeats,
        "steps": steps,
        "cpu_stage_img_per_s_per_core": per_core,
        "cores_per_gpu": cores,
    }
    result.update(verdict(result, cfg))
    return result


def verdict(r: dict, cfg: Config) -> dict:
    """input-bound (naming the slowest input stage and what to change), compute-bound, or measurement-failed: no
    verdict from numbers that `implausible` rejected."""
    if r.get("measurement_failed"):
        return {
            "verdict": "measurement-failed",
            "slowest_stage": None,
            "advice": f"{r['measurement_failed']}: no verdict from these numbers; rerun on an idle machine",
        }
    if r["ratio"] >= COMPUTE_BOUND_RATIO:
        return {
            "verdict": "compute-bound",
            "slowest_stage": "model",
            "advice": f"end-to-end is {r['ratio']:.0%} of the model alone: the input keeps up",
        }
    stages = {"engine": r["engine_img_per_s"], "device_stage": r["device_stage_img_per_s"]}
    slowest = min(stages, key=stages.get)
    if stages[slowest] >= r["model_img_per_s"]:
        advice = (
            "each input stage alone is faster than the model, but together they are not: the stages share "
            "the same cores or device; give the loader its own cores (data.workers), or use a GPU engine"
        )
    elif slowest == "engine" and not engine_info(cfg.data.engine).gpu_decode:
        advice = (
            f"JPEG decode + crop on {r['workers']} CPU workers gives {stages[slowest]:.0f} img/s for a "
            f"model that takes {r['model_img_per_s']:.0f}: raise data.workers (this machine has "
            f"{os.cpu_count()} cores), convert with a lower deit3-convert --max-resolution, or decode on "
            f"the GPU with --engine {engine_names(gpu_decode=True)[0]}"
        )
    elif slowest == "engine":
        advice = (
            f"the {cfg.data.engine} engine decodes {stages[slowest]:.0f} img/s: on a GPU machine run it with "
            f"--device cuda; otherwise raise data.workers or use --engine {engine_names(gpu_decode=False)[0]}"
        )
    else:
        advice = (
            f"the batch augmentation runs at {stages[slowest]:.0f} img/s: set train.compile: true "
            "(fuses its elementwise passes) or run on a GPU"
        )
    return {"verdict": "input-bound", "slowest_stage": slowest, "advice": advice}


def as_json(r: dict) -> str:
    """The result as one JSON line, floats (nested ones too) rounded to 4 decimal places."""
    import json

    def rounded(v):
        if isinstance(v, float):
            return round(v, 4)
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        return v

    return json.dumps(rounded(r))


def render(r: dict) -> None:
    from rich.table import Table

    from dataset_tools.console import make_console

    table = Table(
        title=f"{r['model']} @ {r['img_size']}, batch {r['batch_size']}, {r['amp']}, {r['engine']} "
        f"engine, {r['device']}"
    )
    table.add_column("stage")
    table.add_column("img/s", justify="right")
    table.add_column(f"min - max of {r['repeats']}", justify="right")
    table.add_column("spread", justify="right")
    table.add_column("vs model", justify="right")
    m = r["model_img_per_s"]
    for name, key in (
        ("decode + crop (engine)", "engine_img_per_s"),
        ("augmentation (BatchAugment)", "device_stage_img_per_s"),
        ("loader (both)", "loader_img_per_s"),
        ("model step alone", "model_img_per_s"),
        ("end to end", "end_to_end_img_per_s"),
    ):
        sp = r["spread"][key]
        spread = (f"{sp['min']:,.0f} - {sp['max']:,.0f}", f"{sp['relative']:.0%}")
        table.add_row(name, f"{r[key]:,.0f}", *spread, f"{r[key] / m:.2f}x")
    console = make_console()
    console.print(table)
    console.print(
        f"engine: {r['engine_cpu_cores']:.1f} CPU cores busy while decoding ({r['jpeg_decoder']} for "
        f"the nvjpeg engine); optimiser step "
        f"{r['optimizer_step_ms']:.1f} ms once per {r['accum']} micro-batch(es) of "
        f"{r['micro_batch_ms']:.1f} ms"
    )
    mfu = (
        f"MFU {r['mfu']:.1%}"
        + (f" ({r['mfu_nominal']:.1%} of the datasheet's {r['nominal_tflops']:.0f})" if r.get("mfu_nominal") else "")
        if r["mfu"] is not None
        else "MFU not measured (the measurement failed, below)"
    )
    console.print(
        f"model: {r['gflop_per_image']:.2f} GFLOP/image (fwd+bwd), {r['achieved_tflops']:.2f} TFLOP/s "
        f"of a measured {r['peak_tflops']:.2f} TFLOP/s {r['amp']} matmul peak at its GEMM size: {mfu}"
    )
    if r.get("cores_per_gpu"):
        need = ", ".join(f"{k}: {v:.1f}" for k, v in r["cores_per_gpu"].items())
        console.print(
            f"CPU stage: {r['cpu_stage_img_per_s_per_core']:,.0f} img/s per core; cores per GPU to stay "
            f"compute-bound on {r['model']}@{r['img_size']}: {need}"
        )
    if r["measurement_failed"]:
        console.print(f"[bold red]{r['verdict']}[/bold red] after {r['passes']} passes: {r['advice']}")
        return
    console.print(
        f"[bold]{r['verdict']}[/bold] (end to end = {r['ratio']:.0%} of model alone; slowest: "
        f"{r['slowest_stage']}): {r['advice']}"
    )

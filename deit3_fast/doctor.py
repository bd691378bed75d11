"""`deit3-fast doctor`: is this machine ready for a long run, and how fast is it?

One table (or `--json`) of checks, each `ok`, `missing` (an optional part is absent), `broken` (present but does
not work), `skipped` or `info`, with the one-line fix where there is one: versions, CUDA devices and native bf16,
the measured matmul rate in the AMP dtype a run would use, nvJPEG and DALI GPU decoding, an all-reduce across the
local GPUs, CPU cores, and a short loader-vs-model measurement (`profile`) on a generated or given .beton.
Exit status: 1 when something is broken, or with `--require-gpu` when no GPU is usable; else 0.
"""

from __future__ import annotations

import importlib
import io
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipelines.registry import alternatives, engine_info, engine_names, one_of

from .device import native_bf16

OK, MISSING, BROKEN, SKIPPED, INFO = "ok", "missing", "broken", "skipped", "info"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str | None = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def _version(module: str) -> str | None:
    try:
        if module == "nvidia.dali":
            import pipelines.dali_engine  # noqa: F401  DALI imported the one safe way (see there)
        m = importlib.import_module(module)
    except Exception:  # an optional package may fail in many ways at import (missing libs, ABI)
        return None
    if module == "ffcv":  # ffcv 1.0.2 still says 0.0.3rc1 in ffcv.__version__
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("ffcv")
        except PackageNotFoundError:
            pass
    return getattr(m, "__version__", "?")


def versions() -> list[Check]:
    out = [
        Check("python", INFO, f"{platform.python_version()} ({sys.executable})"),
        Check("torch", INFO, torch.__version__),
    ]
    if torch.version.cuda is None:
        out.append(
            Check(
                "CUDA build",
                MISSING,
                "this torch has no CUDA support",
                "pip install torch (the default PyPI wheel is the CUDA build; never the +cpu one)",
            )
        )
    else:
        driver = _driver_version()
        out.append(Check("CUDA", INFO, f"runtime {torch.version.cuda}, driver {driver or 'not found'}"))
    optional = {}
    for info in map(engine_info, engine_names()):  # each engine's own package, from the registry
        if info.package is not None:
            optional[info.package] = (
                f"the {info.name} engine needs it; deit3-convert and the other engines do not",
                info.install,
            )
    optional["submitit"] = ("deit3-fast submit and ablate --submit (Slurm) need it", "pip install submitit")
    for module in ("torchvision", "timm", "numpy", "numba", *optional):
        v = _version(module)
        name = "DALI" if module == "nvidia.dali" else module
        if v is not None:
            out.append(Check(name, INFO, v))
        elif module in optional:
            out.append(Check(name, MISSING, f"not installed ({optional[module][0]})", optional[module][1]))
        else:
            out.append(Check(name, BROKEN, "cannot be imported", "pip install -e ."))
    return out


def _driver_version() -> str | None:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None


def devices() -> list[Check]:
    if not torch.cuda.is_available():
        why = "torch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        return [
            Check(
                "GPU",
                MISSING,
                why,
                "check nvidia-smi, the driver and CUDA_VISIBLE_DEVICES; training runs on the CPU meanwhile",
            )
        ]
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        bf16 = native_bf16(torch.device("cuda", i))
        out.append(
            Check(
                f"cuda:{i}",
                OK,
                f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
                f"{p.multi_processor_count} SMs, native bf16: {'yes' if bf16 else 'no'}",
                None if bf16 else "train.amp: auto runs fp16 with a GradScaler here (no native bf16)",
            )
        )
    return out


def matmul(device: torch.device) -> Check:
    from .device import AMP_DTYPES, resolve_amp
    from .profile import matmul_peak_tflops, nominal_tflops

    amp = resolve_amp("auto", device)
    dtype = AMP_DTYPES[amp]
    try:
        size = 8192 if device.type == "cuda" else 512  # a CPU: a bf16 1024^3 product can take seconds
        rate = matmul_peak_tflops(device, dtype, size, size, size)
    except Exception as e:  # a broken CUDA install fails here first
        return Check(
            "matmul",
            BROKEN,
            f"{amp} {size}x{size} matmul failed: {_first_line(e)}",
            "check the driver/CUDA versions against torch's build (versions above)",
        )
    nominal = nominal_tflops(device, amp)
    detail = f"{rate:.1f} TFLOP/s {amp} ({size}^3)" + (
        f", {rate / nominal:.0%} of the datasheet's {nominal:.0f}" if nominal else ""
    )
    return Check("matmul", OK, detail)


def _test_jpeg() -> tuple[bytes, torch.Tensor]:
    """A small baseline JPEG of a smooth image, and its pixels as libjpeg-turbo decodes them on the CPU."""
    import numpy as np
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    yy, xx = np.mgrid[0:96, 0:128]
    rgb = np.stack([xx * 2, yy * 2, (xx + yy)], -1).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    cpu = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return data, cpu


def nvjpeg(device: torch.device) -> Check:
    if device.type != "cuda":
        return Check("nvJPEG decode", SKIPPED, "no GPU: the nvjpeg engine decodes on CPU threads")
    from torchvision.io import ImageReadMode, decode_jpeg

    data, cpu = _test_jpeg()
    try:
        gpu = decode_jpeg(
            [torch.frombuffer(bytearray(data), dtype=torch.uint8)], mode=ImageReadMode.RGB, device=device
        )[0].cpu()
    except Exception as e:
        return Check(
            "nvJPEG decode",
            BROKEN,
            f"torchvision decode_jpeg on {device} failed: {_first_line(e)}",
            f"use data.engine: {one_of(alternatives('nvjpeg', host_augment=False))}; check that torchvision matches "
            "torch (same CUDA build)",
        )
    diff = (gpu.float() - cpu.float()).abs().mean().item()
    if gpu.shape != cpu.shape or diff > 3:
        return Check(
            "nvJPEG decode",
            BROKEN,
            f"GPU decode differs from the CPU's (mean |diff| {diff:.2f})",
            f"use data.engine: {one_of(alternatives('nvjpeg', host_augment=False))}",
        )
    from pipelines.nvjpeg_engine import gpu_decoder_kind

    return Check(
        "nvJPEG decode",
        OK,
        f"torchvision decode_jpeg on the GPU matches the CPU's (mean |diff| "
        f"{diff:.2f}); decoder: {gpu_decoder_kind(device)} (by compute capability)",
    )


def dali(device: torch.device) -> Check:
    info = engine_info("dali")
    other = one_of(alternatives(info.name, gpu_decode=True))  # what decodes on the GPU without DALI
    if _version(info.package) is None:
        return Check("DALI mixed decode", MISSING, "DALI is not installed", info.install)
    if device.type != "cuda":
        return Check("DALI mixed decode", SKIPPED, "no GPU: DALI runs its CPU operators")
    import numpy as np

    from pipelines.dali_engine import fn, pipeline_def, types  # DALI imported the one safe way

    data, cpu = _test_jpeg()

    @pipeline_def(batch_size=1, num_threads=1, device_id=device.index or 0)
    def pipe():
        enc = fn.external_source(source=lambda: [np.frombuffer(data, np.uint8)], batch=True)
        return fn.decoders.image(enc, device="mixed", output_type=types.RGB)

    try:
        p = pipe()
        p.build()
        (out,) = p.run()
        img = torch.from_numpy(out.as_cpu().as_array()[0]).permute(2, 0, 1)
    except Exception as e:
        return Check(
            "DALI mixed decode",
            BROKEN,
            f"failed: {_first_line(e)}",
            "install the DALI wheel for this CUDA major version (nvidia-dali-cuda120 or -cuda130), or use "
            f"data.engine: {other}",
        )
    diff = (img.float() - cpu.float()).abs().mean().item()
    status = OK if img.shape == cpu.shape and diff <= 3 else BROKEN
    return Check(
        "DALI mixed decode",
        status,
        f"decodes on the GPU (mean |diff| vs CPU {diff:.2f})",
        None if status == OK else f"use data.engine: {other}",
    )


def _all_reduce_worker(rank: int, world: int, init: str, result: str) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    t = torch.full((1 << 20,), float(rank + 1), device="cuda")
    dist.all_reduce(t)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(t)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 5
    if rank == 0:
        Path(result).write_text(f"{t[0].item()} {seconds}")
    dist.destroy_process_group()


def all_reduce() -> Check:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        return Check("all-reduce", SKIPPED, f"{n} local GPU(s): nothing to reduce across")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result")
        try:
            mp.spawn(_all_reduce_worker, args=(n, f"file://{tmp}/store", result), nprocs=n, join=True)
            value, seconds = map(float, Path(result).read_text().split())
        except Exception as e:
            return Check(
                "all-reduce",
                BROKEN,
                f"NCCL all-reduce over {n} GPUs failed: {_first_line(e)}",
                "check NCCL (NCCL_DEBUG=INFO), the GPU topology (nvidia-smi topo -m) and NCCL_P2P_DISABLE",
            )
    # After the first reduce every element is sum(1..n); each of the 5 timed reduces multiplies it by n.
    expected = n * (n + 1) / 2 * n**5
    if abs(value - expected) > 1e-3 * expected:
        return Check(
            "all-reduce",
            BROKEN,
            f"NCCL all-reduce over {n} GPUs gave {value}, expected {expected}",
            "check NCCL (NCCL_DEBUG=INFO)",
        )
    gbps = 2 * (n - 1) / n * 4 * (1 << 20) / seconds / 1e9
    return Check("all-reduce", OK, f"NCCL over {n} GPUs: correct, {gbps:.0f} GB/s bus bandwidth on 4 MiB")


def cpu() -> Check:
    usable = len(os.sched_getaffinity(0))
    return Check("CPU cores", INFO, f"{usable} usable of {os.cpu_count()}; torch threads {torch.get_num_threads()}")


def throughput(device: torch.device, data_train: str | None, engine: str | None, steps: int) -> Check:
    """A short `profile` of ViT-S@224 at batch 128 (tiny model and images on a CPU) on `data_train` or a generated
    .beton: whether the loader keeps up with the model here."""
    from .config import load_config
    from .profile import profile

    engine = engine or _default_engine()
    with tempfile.TemporaryDirectory(prefix="deit3_doctor_") as tmp:
        if data_train is None:
            data_train = _generated_beton(Path(tmp))
        workers = len(os.sched_getaffinity(0))
        if device.type == "cuda":
            recipe, sets = "vit_s_in1k", ["data.batch_size=128", "train.global_batch=128"]
        else:
            recipe, sets = "quickstart", ["data.batch_size=16", "train.global_batch=16", "model.num_classes=1000"]
        sets += [
            f"data.train={data_train}",
            "data.val=null",
            f"data.engine={engine}",
            f"data.workers={workers}",
            "data.repeats=1",
        ]
        try:
            r = profile(load_config(recipe, sets), device, steps=steps)
        except Exception as e:
            return Check(
                "loader vs model",
                BROKEN,
                f"{recipe} on {engine}: {_first_line(e)}",
                "run deit3-fast profile with the same settings for the full error",
            )
    mfu = f"MFU {r['mfu']:.0%}" if r["mfu"] is not None else "MFU not measured"
    detail = (
        f"{r['model']}@{r['img_size']} batch {r['batch_size']} {r['amp']}, {engine} engine, {workers} "
        f"workers: loader {r['loader_img_per_s']:,.0f} img/s, model alone {r['model_img_per_s']:,.0f}, end "
        f"to end {r['end_to_end_img_per_s']:,.0f} ({r['ratio']:.0%}), {mfu}: "
        + (r["measurement_failed"] if r["measurement_failed"] else r["verdict"])
    )
    if r.get("cpu_stage_img_per_s_per_core"):
        detail += f"; CPU stage {r['cpu_stage_img_per_s_per_core']:,.0f} img/s per core at {r['img_size']} px"
        this = next((v for k, v in (r.get("cores_per_gpu") or {}).items() if k.startswith("this GPU")), None)
        if this is not None:
            detail += f", {this:.1f} cores per GPU keep this model fed"
    # profile's verdict, from profile's plausibility check: a failed measurement is no verdict (info, not ok), and
    # not a broken machine either (a shared one).
    return Check(
        "loader vs model",
        OK if r["verdict"] == "compute-bound" else INFO,
        detail,
        None if r["verdict"] == "compute-bound" else r["advice"],
    )


def _default_engine() -> str:
    """The engine a run uses by default, where its package imports here; else the first that needs no optional
    package, which works on every install."""
    from pipelines.config import DataConfig

    default = engine_info(DataConfig().engine)
    if default.package is None or _version(default.package) is not None:
        return default.name
    return engine_names(package=None)[0]


def _generated_beton(tmp: Path) -> str:
    from dataset_tools.convert import convert
    from dataset_tools.synthetic import make_imagefolder

    make_imagefolder(tmp / "src", num_classes=8, per_class=48, seed=0, min_side=160, max_side=320)
    convert(str(tmp / "src"), str(tmp / "train.beton"), workers=len(os.sched_getaffinity(0)), show_progress=False)
    return str(tmp / "train.beton")


def run_doctor(
    data_train: str | None = None, engine: str | None = None, steps: int = 10, skip_throughput: bool = False
) -> dict:
    from .device import default_device

    device = default_device()
    checks = versions() + devices() + [matmul(device), nvjpeg(device), dali(device), all_reduce(), cpu()]
    if skip_throughput:
        checks.append(Check("loader vs model", SKIPPED, "--no-throughput"))
    else:
        checks.append(throughput(device, data_train, engine, steps))
    from pipelines.nvjpeg_engine import gpu_decoder_kind

    return {
        "device": str(device),
        "gpu": device.type == "cuda",
        "jpeg_decoder": gpu_decoder_kind(device),
        "checks": [asdict(c) for c in checks],
        "broken": [c.name for c in checks if c.status == BROKEN],
    }


def render(report: dict) -> None:
    from rich.table import Table

    from dataset_tools.console import make_console

    colours = {OK: "green", MISSING: "yellow", BROKEN: "bold red", SKIPPED: "dim", INFO: ""}
    table = Table(title="deit3-fast doctor")
    for col in ("check", "status", "detail", "fix"):
        table.add_column(col, overflow="fold")
    for c in report["checks"]:
        style = colours[c["status"]]
        table.add_row(c["name"], f"[{style}]{c['status']}[/]" if style else c["status"], c["detail"], c["fix"] or "")
    make_console().print(table)


def exit_code(report: dict, require_gpu: bool) -> int:
    return 1 if report["broken"] or (require_gpu and not report["gpu"]) else 0

"""`deit3-fast zoo`: the official model-zoo table's columns, measured here — parameters, GFLOPs, inference
throughput and peak memory for every DeiT III model at its resolutions (the table's, and those the recipes
pre-train at: B and L at 192, H at 160 and 128) — next to the official figures (`configs/reference/model-zoo.csv`:
one V100-32GB, batch 256, mixed precision).

GFLOPs are counted as the official table counts them (fvcore): multiply-adds of every matrix product (the linear
layers, the patch embedding, and the two attention products) plus 5 per LayerNorm input element. The official
figures are that count truncated to one decimal (all eight rows); the parameter counts are rounded, and the ViT-S
row at 384 repeats the 224 count (it lacks the larger position embedding: +0.146 M).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch

from .config import CONFIG_DIR, ConfigError

ZOO_CSV = CONFIG_DIR / "reference" / "model-zoo.csv"
MODELS = {
    "vit_s": "deit3_small",
    "vit_m": "deit3_medium",
    "vit_b": "deit3_base",
    "vit_l": "deit3_large",
    "vit_h": "deit3_huge",
}


def official_rows(path: Path = ZOO_CSV) -> list[dict]:
    """The IN-1k rows of the official table (the IN-21k rows are the same models: same counts and timings)."""
    with open(path) as f:
        return [r for r in csv.DictReader(f) if r["pretraining"] == "in1k"]


def recipe_resolutions() -> list[tuple[str, int]]:
    """(model, resolution) of every shipped recipe: pre-training (B and L at 192, H at 160 and 128) and
    fine-tuning (224, 384)."""
    from .archs import resolve_name
    from .config import load_config

    found = set()
    for path in sorted(CONFIG_DIR.glob("vit_*.yaml")):
        cfg = load_config(str(path))
        found.add((resolve_name(cfg.model.name)[0], cfg.aug.img_size))
    return sorted(found)


def _float(v: str) -> float | None:
    return float(v) if v not in ("", None) else None


def count(name: str, img_size: int) -> tuple[float, float]:
    """(parameters in millions, GFLOPs as multiply-adds) of one image through the model, on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from .models import create_model

    with torch.device("meta"):
        model = create_model(name, num_classes=1000, img_size=img_size).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    norm_elems = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: norm_elems.append(i[0].numel()))
        for m in model.modules()
        if isinstance(m, torch.nn.LayerNorm)
    ]
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        model(torch.empty(1, 3, img_size, img_size, device="meta"))
    for h in hooks:
        h.remove()
    macs = flops.get_total_flops() / 2 + 5 * sum(norm_elems)  # torch counts a multiply-add as 2 FLOPs
    return params, macs / 1e9


def timing(name: str, img_size: int, batch: int, device: torch.device, amp: str, steps: int) -> tuple[float, float]:
    """(inference img/s, peak memory MiB) at `batch` under autocast, as the official table measures: forward only,
    after warm-up; peak memory from the allocator on a GPU, not measured on a CPU (None)."""
    from .device import autocast, max_mem_mb, reset_peak_memory
    from .models import create_model

    model = create_model(name, num_classes=1000, img_size=img_size).to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, img_size, img_size, device=device).to(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(device, amp):
        model(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        reset_peak_memory(device)
        t = time.perf_counter()
        for _ in range(steps):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        secs = time.perf_counter() - t
    peak = max_mem_mb(device) if device.type == "cuda" else None
    return batch * steps / secs, peak


def zoo(
    device: torch.device | None = None,
    timings: bool = True,
    batch: int | None = None,
    steps: int = 10,
    models: list[str] | None = None,
) -> dict:
    """The table's rows; `models` (our names, e.g. deit3_base) keeps those models' rows only."""
    from .device import default_device, device_name, resolve_amp

    unknown = sorted(set(models or ()) - set(MODELS.values()))
    if unknown:
        raise ConfigError(f"zoo --models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS.values())}")

    device = device or default_device()
    amp = resolve_amp("auto", device)
    batch = batch or (256 if device.type == "cuda" else 8)
    official = {(MODELS[r["model"]], int(r["resolution"])): r for r in official_rows()}
    order = {name: i for i, name in enumerate(MODELS.values())}
    wanted = sorted(set(official) | set(recipe_resolutions()), key=lambda m: (order[m[0]], m[1]))
    wanted = [m for m in wanted if not models or m[0] in models]
    rows = []
    for name, res in wanted:
        r = official.get((name, res), {})
        params, gflops = count(name, res)
        row = {
            "model": name,
            "resolution": res,
            "params_M": round(params, 2),
            "gflops": round(gflops, 2),
            "official_params_M": _float(r.get("params_M")),
            "official_gflops": _float(r.get("gflops")),
            "official_img_s_v100": _float(r.get("throughput_img_s")),
            "official_peak_mb_v100": _float(r.get("peak_mem_mb")),
            "official_acc1_in1k": _float(r.get("acc1_in1k")),
            "official_acc1_v2": _float(r.get("acc1_v2")),
        }
        if timings:
            img_s, peak = timing(name, res, batch, device, amp, steps if device.type == "cuda" else 1)
            row.update({"img_s": round(img_s, 1), "peak_mb": round(peak) if peak is not None else None})
        rows.append(row)
    return {
        "device": device_name(device),
        "timing_device": device.type if timings else None,
        "batch": batch,
        "amp": amp,
        "rows": rows,
    }


def render(result: dict) -> None:
    from rich.table import Table

    from dataset_tools.console import make_console

    timed = result["timing_device"] is not None
    where = (
        "CPU timings, not comparable with the V100 figures" if result["timing_device"] == "cpu" else result["device"]
    )
    t = Table(
        title="DeiT III model zoo: counted here"
        + (f"; timed on {where}, batch {result['batch']}, {result['amp']}" if timed else ""),
        title_justify="left",
    )
    for col in (
        ["model", "res", "params M (official)", "GFLOPs (official)"]
        + (["img/s here", "peak MB here"] if timed else [])
        + ["img/s V100", "peak MB V100", "IN-1k", "V2"]
    ):
        t.add_column(col, justify="left" if col == "model" else "right")
    fmt = lambda v, f="{:g}": "—" if v is None else f.format(v)  # noqa: E731
    for r in result["rows"]:
        t.add_row(
            r["model"],
            str(r["resolution"]),
            f"{r['params_M']:.2f} ({fmt(r['official_params_M'])})",
            f"{r['gflops']:.2f} ({fmt(r['official_gflops'])})",
            *([fmt(r["img_s"], "{:,.0f}"), fmt(r["peak_mb"], "{:,}")] if timed else []),
            fmt(r["official_img_s_v100"], "{:,.0f}"),
            fmt(r["official_peak_mb_v100"], "{:,.0f}"),
            fmt(r["official_acc1_in1k"]),
            fmt(r["official_acc1_v2"]),
        )
    make_console().print(t)

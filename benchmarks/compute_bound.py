"""Issue 7's table: per model @ resolution, model-alone img/s and MFU, end-to-end img/s per engine, and the ratio;
plus the official-stack baseline for ViT-S@224 on the same machine (timm Lamb + fp16 + the torchvision/PIL
3-Augment loader with all CPU cores), whose end-to-end img/s is BENCHMARKS.md's headline comparison.

Each of our rows is `deit3_fast.profile.profile` (the numbers `deit3-fast profile` prints) on a .beton converted from
the shared ImageNet sample replicated by hard links (max side 256, q90); the official loader decodes the original
JPEGs. Model-alone is measured on synthetic batches already on the device; end-to-end runs the real loader.

    python benchmarks/compute_bound.py                       # GPU: the four rows, every engine, batch 256
    python benchmarks/compute_bound.py --rows deit3_small@224 --engines ffcv,dali --workers 4
    python benchmarks/compute_bound.py --device cpu --rows deit3_nano@32 --batch 16 --steps 3 --copies 1   # smoke
    python benchmarks/compute_bound.py --data-train .gpu-check/data/imagenet.beton --engines nvjpeg --no-official \
        --json rows.json                                    # a GPU machine without ffcv (scripts/gpu-check.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import replicate, unpack_imagenet_sample  # noqa: E402

DEFAULT_ROWS = "deit3_small@224,deit3_base@192,deit3_large@192,deit3_huge@160"
RECIPE = {
    "deit3_small": "vit_s_in1k",
    "deit3_base": "vit_b_in1k",
    "deit3_large": "vit_l_in1k",
    "deit3_huge": "vit_h_in1k",
}


def official_end_to_end(root: Path, device: torch.device, batch: int, workers: int, steps: int) -> float:
    """The reference code's training step: official 3-Augment DataLoader -> timm Mixup -> fp16 autocast ViT-S ->
    BCE -> GradScaler + timm Lamb (timm's `fusedlamb` falls back to its own Lamb without apex)."""
    from official_pipeline import official_train_transform
    from timm.data import Mixup
    from timm.optim import Lamb
    from torchvision import datasets

    from deit3_fast.models import create_model

    data = datasets.ImageFolder(str(root), transform=official_train_transform(224))
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=True,
    )
    model = create_model("deit3_small", drop_path=0.05).to(device)
    opt = Lamb(model.parameters(), lr=4e-3, weight_decay=0.05, max_grad_norm=1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=1000)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def batches():
        while True:
            yield from loader

    it, done, t0 = batches(), 0, None
    for i in range(steps + 2):
        if i == 2:  # after worker start-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x, y = mix(x, y)
        with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16):
            loss = loss_fn(model(x), y.gt(0).float())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        done += len(x) if i >= 2 else 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return done / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=DEFAULT_ROWS, help="model@resolution, comma-separated")
    p.add_argument("--engines", default=None, help="default: every registered engine on CUDA, ffcv on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--copies", type=int, default=20, help="hard-linked copies of the 1000-image sample")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "fp32"], help="fp32: a CPU's smoke test")
    p.add_argument("--no-official", action="store_true")
    p.add_argument(
        "--data-train",
        help="an existing .beton instead of converting the ImageNet sample (no ffcv "
        "needed; the official baseline needs the sample's originals: --no-official)",
    )
    p.add_argument("--json", help="also write every row's full profile as JSON here")
    args = p.parse_args()
    device = torch.device(args.device)
    from dataset_tools.beton import Beton
    from deit3_fast.config import load_config
    from deit3_fast.profile import as_json, profile
    from pipelines.registry import engine_info, engine_names

    # Every installed fast engine on CUDA (the reference engine is the per-sample PIL yardstick, not a candidate).
    fast = [n for n in engine_names(host_augment=False) if engine_info(n).installed]
    engines = (args.engines or (",".join(fast) if device.type == "cuda" else "ffcv")).split(",")

    rows, official, profiles = [], None, []
    with tempfile.TemporaryDirectory(prefix="bench_compute_") as tmp:
        tmp = Path(tmp)
        if args.data_train:
            train = Path(args.data_train)
            n = len(Beton(str(train)))
        else:
            from dataset_tools.convert import convert

            n = replicate(unpack_imagenet_sample(tmp / "x"), tmp / "src", args.copies)
            train = tmp / "train.beton"
            convert(
                str(tmp / "src"),
                str(train),
                max_resolution=256,
                jpeg_quality=90,
                workers=args.workers,
                show_progress=False,
            )
        for spec in args.rows.split(","):
            name, res = spec.split("@")
            row = {"model": name, "res": int(res), "engines": {}}
            for eng in engines:
                sets = [
                    f"data.train={train}",
                    "data.val=null",
                    f"data.engine={eng}",
                    f"data.workers={args.workers}",
                    f"data.batch_size={args.batch}",
                    f"train.global_batch={args.batch}",
                    "data.repeats=1",
                    f"model.name={name}",
                    f"aug.img_size={res}",
                    f"train.amp={args.amp}",
                    f"train.compile={'false' if args.no_compile or device.type == 'cpu' else 'true'}",
                ]
                if name not in RECIPE:
                    sets.append("model.num_classes=1000")
                r = profile(load_config(RECIPE.get(name, "vit_s_in1k"), sets), device, steps=args.steps)
                print(as_json(r), flush=True)
                profiles.append(r)
                row.setdefault("model_img_per_s", r["model_img_per_s"])
                row.setdefault("mfu", r["mfu"])  # None where the measurement failed (profile.implausible)
                if r["measurement_failed"]:
                    row.setdefault("measurement_failed", {})[eng] = r["measurement_failed"]
                row["engines"][eng] = r["end_to_end_img_per_s"]
                row.setdefault("engine_alone", {})[eng] = (r["engine_img_per_s"], r["engine_cpu_cores"])
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next row's model starts from a clean allocator
        if not args.no_official:
            official = official_end_to_end(tmp / "src", device, args.batch, args.workers, args.steps)
    print(f"\n{n} images, batch {args.batch}, {args.workers} CPU workers, {device}, torch {torch.__version__}\n")
    print("| model @ res | model-alone img/s | MFU | end-to-end img/s per engine | ratio (best) |")
    print("|---|---|---|---|---|")
    for r in rows:
        per = ", ".join(f"{e} {v:,.0f}" for e, v in r["engines"].items())
        best = max(r["engines"].values())
        print(
            f"| {r['model']} @ {r['res']} | {r['model_img_per_s']:,.0f} | "
            f"{'failed' if r['mfu'] is None else format(r['mfu'], '.1%')} | {per} | "
            f"{best / r['model_img_per_s']:.2f} |"
        )
    print("\n| model @ res | engine alone img/s (CPU cores busy) |")
    print("|---|---|")
    for r in rows:
        print(
            f"| {r['model']} @ {r['res']} | "
            + ", ".join(f"{e} {v:,.0f} ({c:.1f})" for e, (v, c) in r["engine_alone"].items())
            + " |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "rows": rows,
                    "profiles": profiles,
                    "official": official,
                    "images": n,
                    "device": str(device),
                    "torch": torch.__version__,
                },
                indent=1,
            )
        )
    if official is not None:
        ours = next((max(r["engines"].values()) for r in rows if r["model"] == "deit3_small" and r["res"] == 224), None)
        line = f"official stack, ViT-S@224: {official:,.0f} img/s end to end"
        if ours:
            line += f"; deit3-fast {ours:,.0f} img/s = {ours / official:.2f}x"
        print(line)


if __name__ == "__main__":
    main()

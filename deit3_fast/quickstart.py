"""The embedded default job behind `make quickstart`: everything from a generated ImageFolder, on the CPU.

generate a 10-class ImageFolder -> deit3-convert train/val -> inspect -> train a tiny DeiT III ViT with the recipe
(configs/quickstart.yaml) -> evaluate the best checkpoint. A few minutes on 2 cores.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from dataset_tools.console import make_console
from dataset_tools.convert import convert
from dataset_tools.report import print_summary
from dataset_tools.inspect_beton import inspect_beton, print_inspection
from dataset_tools.shards import REPORT
from dataset_tools.synthetic import make_imagefolder


def run_quickstart(args) -> int:
    console = make_console()
    started = time.perf_counter()
    data = os.path.join(args.out, "data")
    for split, per_class, seed in (("train", args.train_per_class, 0), ("val", args.val_per_class, 1)):
        folder = os.path.join(data, split)
        if not os.path.isdir(folder):
            console.print(f"[bold]generating[/] {folder}: {args.classes} classes x {per_class} images")
            make_imagefolder(folder, args.classes, per_class, seed=seed)
    outputs: dict = {}
    for split in ("train", "val"):
        out = os.path.join(args.out, f"{split}.beton")
        console.rule(f"deit3-convert {split}")
        report = convert(
            os.path.join(data, split),
            out,
            max_resolution=128,
            workers=args.workers,
            classes_file=outputs.get("train", {}).get("report"),
            console=console,
        )
        print_summary(report, console)
        outputs[split] = {"beton": out, "report": out + REPORT}
    console.rule("deit3-convert --inspect")
    for split in ("train", "val"):
        info = inspect_beton(outputs[split]["beton"])
        print_inspection(info, console)
        if info["decode_failures"]:
            return 2
    console.rule("deit3-fast train --cfg quickstart")
    import torch

    from . import rundir
    from .config import load_config
    from .trainer import train

    sets = [
        f"data.train={outputs['train']['beton']}",
        f"data.val={outputs['val']['beton']}",
        f"model.num_classes={args.classes}",
    ]
    if args.epochs:
        sets.append(f"schedule.epochs={args.epochs}")
    cfg = load_config("quickstart", sets)
    run_dir = os.path.join(args.out, "run")
    # A second quickstart continues its run, or finds it finished: a run dir is never trained over.
    train(cfg, run_dir, torch.device("cpu"), resume="auto")
    history = rundir.read_metrics(Path(run_dir))
    best = max(h["val_acc1"] for h in history)
    console.print(
        f"[green]quickstart done[/] in {time.perf_counter() - started:.0f} s: {len(history)} epochs, "
        f"val top-1 {history[-1]['val_acc1']:.1f}% (best {best:.1f}%, chance {100 / args.classes:.0f}%); "
        f"run dir {run_dir} (metrics.jsonl, curves.png, checkpoints)"
    )
    return 0

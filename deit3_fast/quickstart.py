"""The embedded default job behind `make quickstart`: everything from a generated ImageFolder, on the CPU.

Today it exercises the data path that exists (generate -> deit3-convert -> inspect); the trainer issue extends
it to train and evaluate a tiny ViT on these files.
"""
from __future__ import annotations

import os
import time

from rich.console import Console

from dataset_tools.convert import convert, print_summary
from dataset_tools.inspect_beton import inspect_beton, print_inspection
from dataset_tools.synthetic import make_imagefolder


def run_quickstart(args) -> int:
    console = Console()
    started = time.perf_counter()
    data = os.path.join(args.out, "data")
    for split, per_class, seed in (("train", args.train_per_class, 0), ("val", args.val_per_class, 1)):
        folder = os.path.join(data, split)
        if not os.path.isdir(folder):
            console.print(f"[bold]generating[/] {folder}: {args.classes} classes x {per_class} images")
            make_imagefolder(folder, args.classes, per_class, seed=seed)
    outputs = {}
    for split in ("train", "val"):
        out = os.path.join(args.out, f"{split}.beton")
        console.rule(f"deit3-convert {split}")
        report = convert(os.path.join(data, split), out, max_resolution=128, workers=args.workers,
                         classes_file=outputs.get("train", {}).get("report"), console=console)
        print_summary(report, console)
        outputs[split] = {"beton": out, "report": out + ".json"}
    console.rule("deit3-convert --inspect")
    for split in ("train", "val"):
        info = inspect_beton(outputs[split]["beton"])
        print_inspection(info, console)
        if info["decode_failures"]:
            return 2
    console.print(f"[green]quickstart done[/] in {time.perf_counter() - started:.0f} s: "
                  f"{outputs['train']['beton']}, {outputs['val']['beton']}")
    return 0

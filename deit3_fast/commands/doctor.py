"""`deit3-fast doctor`: is this machine ready, and how fast is it (doctor.py runs the checks)."""

from __future__ import annotations

import json
import sys

from pipelines.registry import ENGINES

NAME = "doctor"
HELP = "is this machine ready, and how fast is it? (versions, GPUs, decoders, throughput)"
DESCRIPTION = (
    "Checks what a long run needs on this node and measures it: versions (python, torch, CUDA, driver, "
    "torchvision, timm, numpy, ffcv, DALI), GPUs and native bf16, matmul TFLOP/s in the AMP dtype, nvJPEG "
    "and DALI GPU decoding, an NCCL all-reduce across the local GPUs, CPU cores, and a short "
    "loader-vs-model profile. Each item is ok, missing, broken, skipped or info, with a one-line fix. Exit "
    "1 when something is broken."
)


def add_arguments(d) -> None:
    d.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    d.add_argument("--require-gpu", action="store_true", help="exit 1 when no CUDA device is usable")
    d.add_argument("--data-train", help="a .beton for the throughput check (default: a generated one)")
    d.add_argument("--engine", choices=ENGINES, help="engine for the throughput check")
    d.add_argument("--steps", type=int, default=10, help="timed batches in the throughput check (10)")
    d.add_argument("--no-throughput", action="store_true", help="skip the loader-vs-model measurement")


def run(args) -> int:
    from ..doctor import exit_code, render, run_doctor

    report = run_doctor(args.data_train, args.engine, max(1, args.steps), args.no_throughput)
    if args.json:
        print(json.dumps(report))
    else:
        render(report)
        if args.require_gpu and not report["gpu"]:
            print("deit3-fast doctor: no usable GPU (--require-gpu)", file=sys.stderr)
    return exit_code(report, args.require_gpu)

"""The `deit3-fast` argument parser: every sub-command and its options, with their help. The handlers that run
them are in cli.py."""
from __future__ import annotations

import argparse

from pipelines.registry import ENGINES

from . import __version__
from .submit import add_slurm_args


def _add_cfg_args(p: argparse.ArgumentParser, data_train: bool = True, cfg_required: bool = True) -> None:
    p.add_argument("--cfg", required=cfg_required, help="recipe name in configs/ (e.g. vit_s_in1k) or a YAML path")
    if data_train:
        p.add_argument("--data-train", help="training .beton (overrides data.train)")
    p.add_argument("--data-val", help="validation .beton (overrides data.val)")
    p.add_argument("--engine", choices=ENGINES, help="loader engine (overrides data.engine)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--overrides", metavar="FILE",
                   help="a YAML of config overrides (as profile --tune writes), applied before any --set")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (e.g. --set optim.lr=1e-3)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deit3-fast", description="DeiT III training at GPU speed.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train (or resume) a recipe", description="Train a recipe. The run dir gets "
                       "config.yaml, metrics.jsonl, checkpoint-last.pt, checkpoint-best.pt and curves.png.")
    _add_cfg_args(t)
    t.add_argument("--out", help="run dir (default: runs/<config name>)")
    t.add_argument("--epochs", type=int, help="overrides schedule.epochs")
    t.add_argument("--resume", metavar="DIR|FILE|auto", help="continue from a checkpoint; auto: the run dir's last")
    t.add_argument("--force", action="store_true", help="resume even if the config differs from the checkpoint's")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit")
    t.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")

    e = sub.add_parser("eval", help="top-1/top-5 of a checkpoint on a validation .beton (prints JSON)",
                       description="Evaluate a checkpoint. Give a recipe (--cfg), a model name (--model: ours, "
                       "timm's such as deit3_base_patch16_384, whose suffix sets the resolution, or the official "
                       "deit_base_patch16_LS), or both (--model then overrides the recipe's model).")
    _add_cfg_args(e, data_train=False, cfg_required=False)
    e.add_argument("--model", help="model name (overrides model.name; a timm name's resolution sets aug.img_size)")
    e.add_argument("--checkpoint", required=True, help="checkpoint-*.pt of a run, an official .pth or a timm file")
    e.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a run checkpoint")
    e.add_argument("--val", action="append", default=[], metavar="NAME=PATH",
                   help="a named validation set (repeatable): in1k, v2, a / imagenet-a and r / imagenet-r (scored over "
                        "their 200 classes), or any name; prints a table and JSON")
    e.add_argument("--real", metavar="REAL_JSON",
                   help="also score the IN-1k validation set (in1k, or --data-val) with ReaL's labels (real.json)")
    e.add_argument("--save-predictions", metavar="FILE",
                   help="write one JSON line per sample: set, index, source file, label, top-5")

    s = sub.add_parser("submit", help="train on Slurm through submitit (checkpoint + requeue on preemption)",
                       description="Submit a training job to Slurm with submitit: one task per GPU, rendezvous "
                       "from Slurm's environment, the run dir as job folder. On the time limit or preemption the "
                       "job requeues itself and resumes from its last checkpoint. --local runs it through "
                       "submitit's local executor on this host.")
    _add_cfg_args(s)
    add_slurm_args(s)
    s.add_argument("--out", help="run dir and job folder (default: runs/<config name>)")
    s.add_argument("--epochs", type=int, help="overrides schedule.epochs")
    s.add_argument("--local", action="store_true", help="run through submitit's local executor on this host")
    s.add_argument("--dry-run", action="store_true", help="print the sbatch parameters and the command, submit nothing")

    q = sub.add_parser("quickstart", help="the embedded default job: convert, train and evaluate on CPU (minutes)",
                       description="Generates a small 10-class ImageFolder, converts train/val with deit3-convert, "
                       "inspects both, trains a tiny DeiT III ViT with the recipe (configs/quickstart.yaml) and "
                       "evaluates it.")
    q.add_argument("--out", default="runs/quickstart", help="where data and outputs go (runs/quickstart)")
    q.add_argument("--classes", type=int, default=10)
    q.add_argument("--train-per-class", type=int, default=60)
    q.add_argument("--val-per-class", type=int, default=20)
    q.add_argument("--workers", type=int, default=None)
    q.add_argument("--epochs", type=int, default=None, help="overrides the quickstart recipe's epochs")

    f = sub.add_parser("profile", help="input- or compute-bound? loader, model and end-to-end throughput, MFU",
                       description="Measures the loader alone (decode + crop, then the batch augmentation), "
                       "the model step alone on synthetic batches already on the device (img/s, TFLOP/s, MFU "
                       "against this device's measured matmul peak) and the real end-to-end step; prints a table "
                       "and a verdict naming the slowest stage and what to change.")
    _add_cfg_args(f)
    f.add_argument("--steps", type=int, default=20, help="timed batches per measurement (20)")
    f.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    f.add_argument("--tune", action="store_true",
                   help="try engines, data.workers, data.os_cache and train.compile; write the fastest "
                        "compute-bound setting (else the fastest) as an override YAML for --overrides")
    f.add_argument("--budget-s", type=float, default=300.0, help="with --tune: time to spend (300 s)")
    f.add_argument("--tune-out", default="tuned.yaml", help="with --tune: the override file (tuned.yaml)")

    d = sub.add_parser("doctor", help="is this machine ready, and how fast is it? (versions, GPUs, decoders, "
                       "throughput)", description="Checks what a long run needs on this node and measures it: "
                       "versions (python, torch, CUDA, driver, torchvision, timm, numpy, ffcv, DALI), GPUs and native "
                       "bf16, matmul TFLOP/s in the AMP dtype, nvJPEG and DALI GPU decoding, an NCCL all-reduce "
                       "across the local GPUs, CPU cores, and a short loader-vs-model profile. Each item is ok, "
                       "missing, broken, skipped or info, with a one-line fix. Exit 1 when something is broken.")
    d.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    d.add_argument("--require-gpu", action="store_true", help="exit 1 when no CUDA device is usable")
    d.add_argument("--data-train", help="a .beton for the throughput check (default: a generated one)")
    d.add_argument("--engine", choices=ENGINES, help="engine for the throughput check")
    d.add_argument("--steps", type=int, default=10, help="timed batches in the throughput check (10)")
    d.add_argument("--no-throughput", action="store_true", help="skip the loader-vs-model measurement")

    v = sub.add_parser("preview", help="save a grid of augmented training samples as a PNG",
                       description="Runs the real training loader on --data-train and saves one batch as the model "
                       "sees it (after crop, flip, RandAugment, 3-Augment, colour jitter and, unless --no-mix, "
                       "mixup/cutmix), each sample captioned with its 3-Augment branch, its RandAugment ops and "
                       "magnitudes, and its positive classes.")
    v.add_argument("--cfg", required=True, help="recipe name (configs/) or YAML path")
    v.add_argument("--data-train", help="the .beton to preview (default: the config's data.train)")
    v.add_argument("--out", default="preview.png")
    v.add_argument("--n", type=int, default=32, help="samples in the grid (even; 32)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--no-mix", action="store_true", help="show the samples before mixup/cutmix")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")

    z = sub.add_parser("zoo", help="the model-zoo table on this machine: params, GFLOPs, img/s, peak memory",
                       description="For every DeiT III model at its resolutions: parameters and GFLOPs (multiply-adds, "
                       "the paper's convention), checked against the official table, then inference throughput and "
                       "peak memory (batch 256 with AMP on a GPU) next to the official V100 figures. On a CPU the "
                       "counts are exact and the timings are CPU timings (batch 8).")
    z.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    z.add_argument("--no-timing", action="store_true", help="counts only (seconds on any machine)")
    z.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    z.add_argument("--batch", type=int, help="timing batch (256 on a GPU, 8 on a CPU)")
    z.add_argument("--steps", type=int, default=10, help="timed batches per model on a GPU (10)")
    z.add_argument("--models", nargs="+", metavar="MODEL", help="only these models' rows (e.g. deit3_small)")

    c = sub.add_parser("compare", help="runs against each other and the official curve: table, JSON, plot",
                       description="An epoch-aligned table of validation top-1 for each run dir (ablation variants "
                       "too) and the official curve of the recipe they follow (or --reference NAME), with each run's "
                       "gap; --out writes the plot.")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR")
    c.add_argument("--reference", help="official curve to compare with (a recipe name; none for no curve)")
    c.add_argument("--json", action="store_true", help="print every row as JSON instead of the table")
    c.add_argument("--out", help="write the plot here (PNG)")

    x = sub.add_parser("export", help="write model.safetensors + config.json that timm.create_model loads",
                       description="From a run checkpoint (or its EMA), an official DeiT III .pth or a timm file, "
                       "write OUT_DIR/model.safetensors and OUT_DIR/config.json (timm's pretrained-config form); "
                       "prints the timm.create_model call that loads them.")
    x.add_argument("checkpoint", metavar="CHECKPOINT")
    x.add_argument("out", metavar="OUT_DIR")
    x.add_argument("--ema", action="store_true", help="export the EMA weights of a run checkpoint")
    x.add_argument("--model", help="model name, where the checkpoint does not say (an official .pth does)")

    st = sub.add_parser("stage", help="copy a shard set or .beton to node-local disk, verified and resumable",
                        description="Copies SRC (a shard folder, its manifest.json, or a .beton) into the folder "
                        "DEST, each file atomically and checked against the manifest's sha256 as it is copied; files "
                        "already staged are skipped, the manifest goes last. data.stage_to does the same at job "
                        "start, once per node.")
    st.add_argument("src", metavar="SRC")
    st.add_argument("dest", metavar="DEST")
    st.add_argument("--merge", action="store_true",
                    help="write a shard set into one DEST/merged.beton (for the ffcv engine, which reads one file)")
    st.add_argument("--quiet", action="store_true", help="no progress bar")

    a = sub.add_parser("ablate", help="run a grid of recipe variants on short schedules and tabulate them",
                       description="Runs every variant of a grid file (a base config, override sets and/or a "
                       "product over config keys) one after another, or each as a submitit job with --submit; skips "
                       "finished variants and resumes an interrupted one; writes results.csv, results.md and "
                       "curves.png to --out. The grid format is in deit3_fast/ablate/__init__.py and the README.")
    a.add_argument("--grid", required=True, help="grid YAML path, or a name in configs/ablations/ (cifar10_grid)")
    a.add_argument("--out", help="run dirs and results (default: runs/ablate/<grid name>)")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every variant, after the grid's own sets (repeatable)")
    a.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    a.add_argument("--dry-run", action="store_true", help="list the variants (with --submit: the jobs) and exit")
    a.add_argument("--collect", action="store_true", help="only write the results from the run dirs; run nothing")
    a.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    g = a.add_argument_group("Slurm through submitit (one job per unfinished variant)")
    g.add_argument("--submit", action="store_true", help="submit the variants instead of running them here")
    g.add_argument("--local", action="store_true", help="with --submit: submitit's local executor, one job at a time")
    g.add_argument("--resubmit", action="store_true", help="with --submit: also variants that already have a job")
    add_slurm_args(g)
    return p

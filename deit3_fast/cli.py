"""`deit3-fast` command line: train, eval, submit, profile, doctor, ablate, preview, quickstart. Each sub-command's
handler is here (its options are declared in parser.py); input errors are one line and exit code 2.

Imports: what every command needs (the config, the ablation grid, the Slurm description, the process group) is
imported here; the trainer and what it pulls in (timm, the data engines, numba) inside the commands that run it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from dataset_tools.errors import UserError

from . import ablate
from . import distributed as dist
from .archs import resolve_name
from .batching import batch_plan, batch_plans
from .config import ConfigError, load_config, resolve_num_classes, to_dict
from .parser import build_parser
from .submit import describe, describe_job, slurm_options


def _flatten(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v)}")  # JSON is YAML: lists, true/false, null survive
    return out


def _overrides(args) -> list[str]:
    sets = []
    if getattr(args, "overrides", None):
        import yaml

        try:
            tree = yaml.safe_load(Path(args.overrides).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"--overrides {args.overrides}: unreadable ({str(e).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"--overrides {args.overrides}: expected a mapping of config sections")
        sets += _flatten(tree)
    model = getattr(args, "model", None)
    if model:  # first, so that an explicit --set still wins
        sets.append(f"model.name={model}")
        try:
            implied = resolve_name(model)[1]
        except ValueError:
            implied = None  # the config check names the valid models
        if implied:
            sets.append(f"aug.img_size={implied}")
    sets += list(args.set)
    for flag, key in (("data_train", "data.train"), ("data_val", "data.val"), ("engine", "data.engine"),
                      ("epochs", "schedule.epochs")):
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{key}={value}")
    return sets


def _device(name: str | None):
    """This process's device: torchrun's (one process per GPU) or --device / the default."""
    from .device import pick_device

    return dist.init_from_env(name) or pick_device(name)


def _train(args) -> int:
    from .trainer import train

    cfg = load_config(args.cfg, _overrides(args))
    if args.dry_run:
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    out = args.out or str(Path("runs") / Path(args.cfg).stem)
    device = _device(args.device)
    history = train(cfg, out, device, resume=args.resume, force=args.force, quiet=args.quiet, handle_sigterm=True)
    last = history[-1] if history else {}
    if dist.is_main():
        print(json.dumps({"out": out, "epochs_run": len(history), "val_acc1": last.get("val_acc1"),
                          "val_acc5": last.get("val_acc5"), "world_size": dist.world()}))
    return 0


def _eval(args) -> int:
    from .evalsets import EvalSet, evaluate_checkpoint, load_real, parse_sets, real_set, render, save_predictions

    if not args.cfg and not args.model:
        raise ConfigError("eval needs --cfg RECIPE or --model NAME (or both)")
    cfg = resolve_num_classes(load_config(args.cfg, _overrides(args)))
    sets = parse_sets(args.val)
    if cfg.data.val and (not sets or args.data_val):
        if any(s.name == "val" for s in sets):
            raise ConfigError("validation set 'val' is --data-val's name: give the other set another name")
        sets.insert(0, EvalSet("val", cfg.data.val))
    if not sets:
        raise ConfigError("nothing to evaluate: give --data-val PATH or --val NAME=PATH (repeatable)")
    real = load_real(args.real) if args.real else None
    if args.save_predictions:
        from dataset_tools.atomic import check_writable

        problem = check_writable(args.save_predictions)
        if problem:
            raise ConfigError(f"--save-predictions: cannot write {args.save_predictions}: {problem}")
    real_set(sets, real)  # before a device or a model is set up
    results, predictions = evaluate_checkpoint(cfg, args.checkpoint, sets, _device(args.device), ema=args.ema,
                                               real=real, keep=bool(args.real or args.save_predictions))
    if not dist.is_main():
        return 0
    if args.save_predictions:
        save_predictions(args.save_predictions, predictions)
    if len(results) == 1 and "val" in results:  # the plain form: one line, as before named sets existed
        print(json.dumps(results["val"]))
        return 0
    render(results)
    print(json.dumps({"sets": results}))
    return 0


def _submit(args) -> int:
    from .submit import TrainJob, slurm_executor

    sets = _overrides(args)
    cfg = load_config(args.cfg, sets)  # a bad config fails here, not hours later on the cluster
    world = 1 if args.local else args.nodes * args.gpus_per_node
    plan, per_size = batch_plan(cfg, world), batch_plans(cfg, world)
    out = args.out or str(Path("runs") / Path(args.cfg).stem)
    desc = describe_job(args.cfg, sets, out, **slurm_options(args))
    if args.dry_run:
        desc["global_batch"] = (f"{cfg.train.global_batch} = {plan.per_process} per process x {world} processes x "
                                f"{plan.accum} accumulation steps")
        for size, p in sorted(per_size.items()):
            desc[f"global_batch_at_{size}px"] = f"{p.per_process} per process x {world} x {p.accum}"
        print(describe(desc))
        return 0
    job = slurm_executor(desc).submit(TrainJob(args.cfg, sets, out, args.device))
    print(json.dumps({"job_id": job.job_id, "out": out, "logs": desc["folder"]}))
    if args.local:
        job.result()  # the local executor's job runs on this host: wait for it
    return 0


def _profile(args) -> int:
    from .device import pick_device
    from .profile import profile, render

    if args.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {args.steps}")
    cfg = load_config(args.cfg, _overrides(args))
    if args.tune:
        from .tune import tune, write_overrides

        if args.budget_s <= 0:
            raise ConfigError(f"--budget-s must be positive, got {args.budget_s}")
        log = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
        tuned = tune(cfg, pick_device(args.device), budget_s=args.budget_s, steps=args.steps, log=log)
        write_overrides(tuned, args.tune_out)
        if args.json:
            print(json.dumps(tuned))
        else:
            print(f"best: {tuned['overrides']} -> {args.tune_out} (use --overrides {args.tune_out}); "
                  f"{len(tuned['tried'])} settings in {tuned['seconds']:.0f} s of {args.budget_s:.0f}")
        return 0
    result = profile(cfg, pick_device(args.device), steps=args.steps)
    if args.json:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    else:
        render(result)
    return 0


def _doctor(args) -> int:
    from .doctor import exit_code, render, run_doctor

    report = run_doctor(args.data_train, args.engine, max(1, args.steps), args.no_throughput)
    if args.json:
        print(json.dumps(report))
    else:
        render(report)
        if args.require_gpu and not report["gpu"]:
            print("deit3-fast doctor: no usable GPU (--require-gpu)", file=sys.stderr)
    return exit_code(report, args.require_gpu)


def _image_out(path: str | None, flag: str = "--out") -> None:
    """A plot or picture path whose format is known by its suffix, checked before the work that fills it."""
    if path and Path(path).suffix.lower() not in (".png", ".jpg", ".jpeg", ".pdf", ".svg", ".webp"):
        raise ConfigError(f"{flag} {path}: name an image file (.png, .jpg, .pdf, .svg)")


def _preview(args) -> int:
    from pipelines.preview import make_preview

    from .components import make_loader

    _image_out(args.out)
    sets = [*args.set, f"data.batch_size={args.n}", "data.repeats=1", f"data.seed={args.seed}", "train.amp=fp32"]
    if args.data_train:
        sets.append(f"data.train={args.data_train}")
    if args.no_mix:
        sets += ["aug.mixup=0", "aug.cutmix=0"]
    cfg = load_config(args.cfg, sets)
    import torch

    loader = make_loader(cfg, "train", torch.device("cpu"), auto_compile=False)
    if len(loader) == 0:  # training batches are whole: n above the set's size makes none
        raise ConfigError(f"--n {args.n}: more than the {loader.samples} samples of "
                          f"{cfg.data.train}; ask for fewer")
    info = make_preview(loader, cfg.aug.mean, cfg.aug.std, args.out)
    ops = f", RandAugment ops {info['randaug']}" if "randaug" in info else ""
    print(f"wrote {info['path']}: {info['samples']} samples, branches {info['branches']}{ops}")
    return 0


def _zoo(args) -> int:
    from .device import pick_device
    from .zoo import render, zoo

    result = zoo(pick_device(args.device), timings=not args.no_timing, batch=args.batch, steps=max(1, args.steps),
                 models=args.models)
    if args.json:
        print(json.dumps(result))
    else:
        render(result)
    return 0


def _compare(args) -> int:
    from .compare import compare, plot, render

    _image_out(args.out)
    result = compare(args.runs, args.reference)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "shown"}))
    else:
        render(result)
    if args.out and not plot(result, args.out):
        print(f"compare: no run has finished an epoch yet: no plot written to {args.out}", file=sys.stderr)
    return 0


def _export(args) -> int:
    from .export import export

    print(json.dumps(export(args.checkpoint, args.out, model=args.model, ema=args.ema)))
    return 0


def _stage(args) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from dataset_tools.beton import BetonError
    from dataset_tools.stage import stage
    from pipelines import DataError

    with Progress(TextColumn("[bold]staging[/]"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  disable=args.quiet, transient=True) as progress:
        task = progress.add_task("stage", total=None)
        try:
            where = stage(args.src, args.dest, progress=lambda n: progress.advance(task, n), merge_shards=args.merge)
        except BetonError as e:
            raise DataError(str(e)) from None
        except OSError as e:
            raise DataError(f"staging into {args.dest} failed: {e.strerror or e}") from None
    print(json.dumps({"staged": str(where), "use": f"data.train: {where}"}))
    return 0


def _quickstart(args) -> int:
    from .quickstart import run_quickstart

    return run_quickstart(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .trainer import Preempted

    commands = {"train": _train, "eval": _eval, "preview": _preview, "submit": _submit, "profile": _profile,
                "ablate": ablate.run_grid, "doctor": _doctor, "quickstart": _quickstart, "stage": _stage,
                "zoo": _zoo, "export": _export, "compare": _compare}
    try:
        return commands[args.command](args)
    except UserError as e:
        print(f"deit3-fast: {e.prefix}: {e}", file=sys.stderr)
        return e.exit_code
    except Preempted as e:  # a scheduler's SIGTERM: the position is saved, and stopping was asked for
        print(f"deit3-fast: {e}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("deit3-fast: interrupted; the last completed epoch's checkpoint is kept", file=sys.stderr)
        return 130
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())

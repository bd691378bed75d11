"""`deit3-fast submit`: a training job on Slurm through submitit (submit.py describes and submits it)."""

from __future__ import annotations

import json
from pathlib import Path

from ..batching import batch_plan, batch_plans
from ..config import load_config
from ..submit import add_slurm_args, describe, describe_job, slurm_options
from ._common import add_cfg_args
from ._common import overrides as _overrides

NAME = "submit"
HELP = "train on Slurm through submitit (checkpoint + requeue on preemption)"
DESCRIPTION = (
    "Submit a training job to Slurm with submitit: one task per GPU, rendezvous from Slurm's environment, "
    "the run dir as job folder. On the time limit or preemption the job requeues itself and resumes from "
    "its last checkpoint. --local runs it through submitit's local executor on this host."
)


def add_arguments(s) -> None:
    add_cfg_args(s)
    add_slurm_args(s)
    s.add_argument("--out", help="run dir and job folder (default: runs/<config name>)")
    s.add_argument("--epochs", type=int, help="overrides schedule.epochs")
    s.add_argument("--local", action="store_true", help="run through submitit's local executor on this host")
    s.add_argument("--dry-run", action="store_true", help="print the sbatch parameters and the command, submit nothing")


def run(args) -> int:
    from ..submit import TrainJob, slurm_executor

    sets = _overrides(args)
    cfg = load_config(args.cfg, sets)  # a bad config fails here, not hours later on the cluster
    world = 1 if args.local else args.nodes * args.gpus_per_node
    plan, per_size = batch_plan(cfg, world), batch_plans(cfg, world)
    out = args.out or str(Path("runs") / Path(args.cfg).stem)
    desc = describe_job(args.cfg, sets, out, **slurm_options(args))
    if args.dry_run:
        desc["global_batch"] = (
            f"{cfg.train.global_batch} = {plan.per_process} per process x {world} processes x "
            f"{plan.accum} accumulation steps"
        )
        for size, p in sorted(per_size.items()):
            desc[f"global_batch_at_{size}px"] = f"{p.per_process} per process x {world} x {p.accum}"
        print(describe(desc))
        return 0
    job = slurm_executor(desc).submit(TrainJob(args.cfg, sets, out, args.device))
    print(json.dumps({"job_id": job.job_id, "out": out, "logs": desc["folder"]}))
    if args.local:
        job.result()  # the local executor's job runs on this host: wait for it
    return 0

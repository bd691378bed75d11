"""Slurm through submitit: `deit3-fast submit`. One task per GPU, rendezvous from Slurm's environment, the run dir as
the job folder, and preemption-safe: on the time-limit or preemption signal submitit calls `TrainJob.checkpoint`,
which requeues the same job; the requeued job resumes from the run dir's last checkpoint (written atomically at
every epoch end), so at most the interrupted epoch is recomputed, with the same data and the same result.
"""

from __future__ import annotations

import json
from pathlib import Path


def submitit():
    """submitit, imported when a job is submitted or run: the rest of the CLI (train, eval, doctor) works where it
    is not installed, as on a bare GPU machine."""
    try:
        import submitit
    except ImportError as e:
        from .config import ConfigError

        raise ConfigError(
            f"Slurm jobs need submitit ({e}): pip install submitit (a dependency of deit3-fast: "
            "pip install -e . installs it)"
        ) from None
    return submitit


class TrainJob:
    """What each Slurm task (or the local executor) runs; a picklable description, not a live run."""

    def __init__(self, cfg: str, sets: list[str], out: str, device: str | None = None):
        self.cfg, self.sets, self.out, self.device = cfg, list(sets), str(out), device

    def __call__(self) -> list[dict]:
        from . import distributed as dist
        from .config import load_config
        from .device import pick_device
        from .trainer import train  # torch: in the job, not where it is submitted

        # Slurm's variables -> MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK: then it is torchrun's code path.
        submitit().helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        cfg = load_config(self.cfg, self.sets)
        device = dist.init_from_env(self.device) or pick_device(self.device)
        try:
            return train(cfg, self.out, device, resume="auto", quiet=True)
        finally:
            dist.shutdown()

    def checkpoint(self, *args, **kwargs):
        # Nothing to save here: the last completed epoch is already on disk. Requeue the same job; it resumes.
        return submitit().helpers.DelayedSubmission(TrainJob(self.cfg, self.sets, self.out, self.device))


def slurm_parameters(
    nodes: int,
    gpus_per_node: int,
    timeout_min: int,
    partition: str | None,
    account: str | None,
    constraint: str | None,
    name: str,
    cpus_per_task: int,
) -> dict:
    params = {
        "name": name,
        "nodes": nodes,
        "tasks_per_node": gpus_per_node,
        "gpus_per_node": gpus_per_node,
        "cpus_per_task": cpus_per_task,
        "timeout_min": timeout_min,
        "slurm_signal_delay_s": 120,
    }
    for key, value in (("slurm_partition", partition), ("slurm_account", account), ("slurm_constraint", constraint)):
        if value:
            params[key] = value
    return params


def _at_least_1(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def add_slurm_args(p) -> None:
    """The sbatch side of `submit` and `ablate --submit`."""
    p.add_argument("--nodes", type=_at_least_1, default=1, help="nodes per job (1)")
    p.add_argument("--gpus-per-node", type=_at_least_1, default=8, help="GPUs per node, one task each (8)")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--constraint", help="Slurm node constraint (e.g. a GPU type)")
    p.add_argument(
        "--timeout-min",
        type=_at_least_1,
        default=2800,
        help="time limit per job in minutes; at it the job requeues and resumes from its checkpoint (2800)",
    )
    p.add_argument("--cpus-per-task", type=_at_least_1, default=10, help="CPU cores per task (per GPU) (10)")


def slurm_options(args) -> dict:
    """`describe_job`'s options from the parsed `add_slurm_args` arguments (and `--local`)."""
    return {
        "nodes": args.nodes,
        "gpus_per_node": args.gpus_per_node,
        "timeout_min": args.timeout_min,
        "partition": args.partition,
        "account": args.account,
        "constraint": args.constraint,
        "cpus_per_task": args.cpus_per_task,
        "local": args.local,
    }


def describe_job(
    cfg: str,
    sets: list[str],
    out: str,
    *,
    nodes: int = 1,
    gpus_per_node: int = 8,
    timeout_min: int = 2800,
    partition: str | None = None,
    account: str | None = None,
    constraint: str | None = None,
    cpus_per_task: int = 10,
    local: bool = False,
) -> dict:
    """What a training job is: its executor, job folder, sbatch parameters, the equivalent command, world size."""
    name = f"deit3-{Path(cfg).stem}"
    params = slurm_parameters(nodes, gpus_per_node, timeout_min, partition, account, constraint, name, cpus_per_task)
    if local:  # submitit's local executor: one task on this host, same checkpoint/requeue protocol
        params = {"name": name, "timeout_min": timeout_min, "tasks_per_node": 1, "nodes": 1}
    return {
        "executor": "local" if local else "slurm",
        "folder": str(Path(out) / "submitit"),
        "parameters": params,
        "command": [
            "deit3-fast",
            "train",
            "--cfg",
            cfg,
            "--out",
            str(out),
            "--resume",
            "auto",
            *[x for s in sets for x in ("--set", s)],
        ],
        "world_size": 1 if local else nodes * gpus_per_node,
    }


def slurm_executor(description: dict):
    """The submitit executor a job description asks for (Slurm, or the local one), with its parameters set."""
    executor = submitit().AutoExecutor(
        folder=description["folder"], cluster="local" if description["executor"] == "local" else None
    )
    executor.update_parameters(**description["parameters"])
    return executor


def submit(cfg: str, sets: list[str], out: str, device: str | None = None, **job):
    """Submit a training job (`describe_job`'s options); returns the submitit job."""
    return slurm_executor(describe_job(cfg, sets, out, **job)).submit(TrainJob(cfg, sets, out, device))


def describe(description: dict) -> str:
    return json.dumps(description, indent=1)

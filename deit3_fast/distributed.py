"""torch.distributed from the environment torchrun (or Slurm via submitit) sets: one process per device.

`init_from_env()` starts the process group when WORLD_SIZE > 1 (NCCL with CUDA, gloo on CPU) and picks this
process's device; everything else asks `rank()`, `world()`, `is_main()`; `shutdown()` leaves the group before exit.
Only the main process logs and writes.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_type: str | None = None) -> torch.device | None:
    """Join the process group described by RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; return this process's
    device, or None when not launched as several processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return join_group(device_type)


def join_group(device_type: str | None = None) -> torch.device:
    """Start this process's membership of the group the environment describes (any world size, 1 included)."""
    use_cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        # Before the group exists: NCCL binds each rank to the current device, and without this every rank's
        # communicator (and CUDA context) would start on GPU 0. `device_id` lets NCCL connect eagerly to it.
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if use_cuda:
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


def shutdown() -> None:
    """Leave the process group. Without this, gloo's worker threads can outlive the interpreter at exit and abort
    the process (SIGABRT, "terminate called without an active exception") after the work has succeeded."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (a list of one where there is no group)."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def all_ok(ok: bool, group=None) -> bool:
    """Whether `ok` holds on every rank: a barrier that carries a verdict, so one rank's failure ends the others'
    wait with an error instead of a timeout."""
    if world() == 1:
        return ok
    t = torch.tensor([int(ok)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def release(group) -> None:
    if group is not None:
        dist.destroy_process_group(group)


def long_wait_group(timeout: timedelta):
    """A gloo group whose collectives wait up to `timeout`, beyond the default group's limit (NCCL's is 10 minutes):
    for one process per node copying a data set while the others wait. Every rank makes it before that wait begins
    (making a group is itself collective). None without a process group."""
    return dist.new_group(backend="gloo", timeout=timeout) if world() > 1 else None


def local_rank() -> int:
    """This process's index on its node (torchrun's and submitit's LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0"))

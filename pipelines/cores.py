"""How a process's cores are shared between the loader's threads and torch's: `data.workers: auto` resolved, and
torch's intra-op thread count chosen, in this one place (`cpu_share`; `build_loader` applies it).

A training process runs two pools of busy threads at once: the loader's (`data.workers`: FFCV's numba threads,
DALI's, the nvjpeg engine's CPU pool, the reference engine's processes) and torch's intra-op threads (on a CPU device
the batch augmentation and the training step; on a GPU, little but the Python thread that launches the kernels).
Two pools that together ask for more cores than there are share them badly: each waits (spinning) for its peers
while the other pool holds the cores. On 2 busy cores the quickstart trained ~7x slower with 2 workers, where FFCV
also gave torch 2 threads, than with 1 (issue 28). So each gets its share: on a GPU the loader gets every core but
the one of the main thread; on a CPU the loader a quarter (decoding a batch costs far less than training on it),
torch the rest.

torch's count follows the cores only, never data.workers: a reduction split over another number of threads sums in
another order, and FFCV's `torch.set_num_threads(workers)` made the trained weights differ with data.workers.
OMP_NUM_THREADS, where set (torchrun sets 1 for several processes), is torch's count as given.

No torch at import: the config schema imports AUTO from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

AUTO = "auto"

_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def cgroup_cpu_limit() -> int | None:
    """The container's CPU quota in whole cores (docker --cpus, a Kubernetes limit), rounded down so that the threads
    fit in it (at least 1); None where there is none or it cannot be read."""
    try:
        quota, period = _CGROUP_V2.read_text().split()[:2]
        if quota == "max":
            return None
        q, p = int(quota), int(period)
    except (OSError, ValueError):
        try:
            q, p = (int(f.read_text()) for f in _CGROUP_V1)
        except (OSError, ValueError):
            return None
    return max(1, q // p) if q > 0 and p > 0 else None


def local_processes() -> int:
    """Training processes on this node (torchrun's and submitit's LOCAL_WORLD_SIZE; 1 without)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def usable_cores() -> int:
    """The cores this process may use: its affinity mask, within the cgroup's quota, each divided among the node's
    processes where they share it."""
    affinity = len(os.sched_getaffinity(0))
    local = local_processes()
    machine = os.cpu_count() or affinity
    # torchrun's processes inherit one mask (typically the whole machine) and share it; a Slurm task bound with
    # --cpus-per-task has cores of its own. A mask wider than this process's part of the machine is taken as shared.
    cores = affinity // local if affinity * local > machine else affinity
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, limit // local)  # one quota for every process in the container
    return max(1, cores)


def auto_workers(cores: int, device_type: str) -> int:
    """`data.workers: auto` for a process with `cores`."""
    if device_type == "cuda":
        return max(1, cores - 1)  # the device stage runs on the GPU; the main thread, which drives it, keeps one
    return max(1, cores // 4)


def _omp_threads() -> int | None:
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return n if n >= 1 else None


@dataclass(frozen=True)
class CpuShare:
    """What `data.workers` and torch's threads resolved to for this process (a run records it in run.json)."""

    cores: int  # this process's (usable_cores)
    workers: int  # the loader's: data.workers, or auto's count
    torch_threads: int
    workers_setting: int | str  # data.workers as configured (an int or "auto")
    device_type: str = "cpu"
    processes: int = 1  # on this node, sharing its cores
    loader_uses_workers: bool = True  # False: the engine decodes on the GPU and data.workers sizes nothing
    from_omp: bool = False  # torch_threads came from OMP_NUM_THREADS

    def facts(self) -> dict:
        """What run.json records (rundir.describe_facts shows it)."""
        return {
            "cores": self.cores,
            "processes": self.processes,
            "data_workers": self.workers,
            "data_workers_config": self.workers_setting,
            "torch_threads": self.torch_threads,
        }

    def warning(self) -> str | None:
        """One line where the loader's and torch's threads together ask for more than the cores (2 is the least
        that both can have), naming the numbers and the fix; None where they fit."""
        loader = self.workers if self.loader_uses_workers else 0
        if loader + self.torch_threads <= max(self.cores, 2):
            return None
        per = " per process" if self.processes > 1 else ""
        room = max(0, self.cores - self.torch_threads)
        auto = auto_workers(self.cores, self.device_type)
        fix = f"set data.workers to at most {room} (auto gives {auto} here)" if room else ""
        if self.from_omp:
            fix = (fix + ", or lower" if fix else "lower") + f" OMP_NUM_THREADS ({self.torch_threads})"
        return (
            f"data.workers {self.workers} + torch threads {self.torch_threads} = {loader + self.torch_threads} busy "
            f"threads on {self.cores} cores{per}: the loader and the training step compete for them and both slow "
            f"down (several times over on a busy machine); {fix}"
        )


def cpu_share(
    workers: int | str, device_type: str, *, loader_uses_workers: bool = True, cores: int | None = None
) -> CpuShare:
    """data.workers (an int, or "auto") resolved for a process on `device_type` ("cpu" | "cuda"), with torch's
    intra-op thread count: what the cores leave after auto's workers, whatever data.workers says."""
    cores = usable_cores() if cores is None else cores
    auto = auto_workers(cores, device_type)
    omp = _omp_threads()
    return CpuShare(
        cores=cores,
        workers=auto if workers == AUTO else int(workers),
        torch_threads=omp if omp is not None else max(1, cores - auto),
        workers_setting=workers,
        device_type=device_type,
        processes=local_processes(),
        loader_uses_workers=loader_uses_workers,
        from_omp=omp is not None,
    )


def apply(share: CpuShare) -> None:
    """Give torch its share of the cores (process-wide: the intra-op pool, and MKL's)."""
    import torch

    if torch.get_num_threads() != share.torch_threads:
        torch.set_num_threads(share.torch_threads)

"""data.workers: auto and torch's threads (pipelines/cores.py): resolved from the cores this process may use, the
warning where the loader and torch ask for more, and a loader that really runs with the resolved numbers."""

import os

import pytest
import torch

from pipelines import cores
from pipelines.cores import cpu_share

from ..conftest import plain_loader


@pytest.fixture
def machine(monkeypatch):
    """A machine of `n` cores (affinity and os.cpu_count), no cgroup quota, one process per node, no OMP_NUM_THREADS;
    torch's thread count is given back afterwards (it is process-wide)."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(cores, "cgroup_cpu_limit", lambda: None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def cores_(n: int, machine: int | None = None) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))
        monkeypatch.setattr(os, "cpu_count", lambda: machine or n)

    yield cores_
    torch.set_num_threads(threads)


def test_auto_gives_the_loader_and_torch_their_shares(machine):
    machine(16)
    cpu = cpu_share("auto", "cpu")
    assert (cpu.cores, cpu.workers, cpu.torch_threads) == (16, 4, 12)  # training on the CPU needs the most
    gpu = cpu_share("auto", "cuda")
    assert (gpu.workers, gpu.torch_threads) == (15, 1)  # the GPU trains: every core but the main thread's decodes
    machine(2)
    assert (cpu_share("auto", "cpu").workers, cpu_share("auto", "cpu").torch_threads) == (1, 1)
    assert cpu_share("auto", "cpu").warning() is None


def test_torch_threads_do_not_follow_an_explicit_worker_count(machine):
    """An int is used as given; torch's share is the same for every worker count (results do not depend on it)."""
    machine(8)
    shares = [cpu_share(w, "cpu") for w in (0, 1, 2, 6)]
    assert [s.workers for s in shares] == [0, 1, 2, 6]
    assert {s.torch_threads for s in shares} == {6}


def test_processes_on_a_node_split_a_shared_mask(machine, monkeypatch):
    """torchrun's 8 processes inherit the whole machine's mask: each gets an eighth. Slurm tasks bound to cores of
    their own (8 x 10 of 96) keep theirs. A container's quota is split among its processes."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    machine(96)
    assert cores.usable_cores() == 12
    assert cpu_share("auto", "cuda").workers == 11
    machine(10, machine=96)
    assert cores.usable_cores() == 10
    machine(96)
    monkeypatch.setattr(cores, "cgroup_cpu_limit", lambda: 32)
    assert cores.usable_cores() == 4


def test_cgroup_quota_is_read_in_whole_cores(tmp_path, monkeypatch):
    v2 = tmp_path / "cpu.max"
    monkeypatch.setattr(cores, "_CGROUP_V2", v2)
    monkeypatch.setattr(cores, "_CGROUP_V1", (tmp_path / "none", tmp_path / "none"))
    assert cores.cgroup_cpu_limit() is None  # no cgroup file: no quota
    v2.write_text("max 100000\n")
    assert cores.cgroup_cpu_limit() is None
    v2.write_text("250000 100000\n")  # docker --cpus 2.5: two threads fit in it
    assert cores.cgroup_cpu_limit() == 2
    v2.write_text("50000 100000\n")
    assert cores.cgroup_cpu_limit() == 1


def test_oversubscription_is_one_warning_naming_the_numbers_and_the_fix(machine, monkeypatch):
    machine(2)
    w = cpu_share(2, "cpu").warning()  # the quickstart's former setting on 2 cores (issue 28)
    assert w is not None and "\n" not in w
    assert "data.workers 2 + torch threads 1 = 3 busy threads on 2 cores" in w
    assert "set data.workers to at most 1 (auto gives 1 here)" in w
    assert cpu_share(1, "cpu").warning() is None
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    omp = cpu_share("auto", "cpu")
    assert omp.torch_threads == 4 and "lower OMP_NUM_THREADS (4)" in omp.warning()
    monkeypatch.delenv("OMP_NUM_THREADS")
    # An engine that decodes on the GPU does not run data.workers threads there: nothing to warn about.
    assert cpu_share(8, "cuda", loader_uses_workers=False).warning() is None


@pytest.mark.slow
def test_a_loader_runs_with_the_resolved_numbers(data, machine):
    """build_loader hands auto's count to the engine and sets torch's threads, and FFCV (which sets torch's threads
    to its worker count when a loader is made and at every epoch) no longer changes them."""
    import numba

    machine(8)
    torch.set_num_threads(1)
    loader = plain_loader(
        "train",
        **{
            "data.train": data / "train.beton",
            "model.num_classes": 4,
            "aug.img_size": 32,
            "data.repeats": 1,
            "data.batch_size": 8,
        },
    )
    share = loader.cpu_share
    assert (share.workers, share.torch_threads, share.workers_setting) == (2, 6, "auto")
    assert loader.engine.loader.num_workers == min(2, numba.config.NUMBA_NUM_THREADS)
    assert torch.get_num_threads() == 6
    for _ in loader:
        assert torch.get_num_threads() == 6
    assert torch.get_num_threads() == 6

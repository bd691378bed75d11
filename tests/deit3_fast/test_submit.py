"""Slurm via submitit, exercised through submitit's local executor: a job completes; a preempted job checkpoints,
requeues itself and resumes to the same final state as an uninterrupted run."""

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from deit3_fast.checkpoint import load
from deit3_fast.config import load_config
from deit3_fast.trainer import train
from deit3_fast.submit import submit

from ..conftest import REPO, make_splits

pytestmark = pytest.mark.slow  # ~1.5 min: submitit jobs start fresh Python processes


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = make_splits(
        tmp_path_factory.mktemp("submit_data"), {"train": (4, 24, 0), "val": (4, 4, 1)}, min_side=32, max_side=64
    )
    return [
        f"data.train={d / 'train.beton'}",
        f"data.val={d / 'val.beton'}",
        "model.num_classes=4",
        "data.workers=1",
        "schedule.epochs=5",
        "schedule.warmup_epochs=1",
        "data.batch_size=16",
        "train.global_batch=16",
    ]


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "deit3_fast", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def test_dry_run_prints_sbatch_parameters_and_the_batch_arithmetic():
    r = cli(
        "submit",
        "--cfg",
        "vit_l_in1k",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--partition",
        "p1",
        "--account",
        "a1",
        "--constraint",
        "volta32gb",
        "--timeout-min",
        "600",
        "--dry-run",
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    p = d["parameters"]
    assert (p["nodes"], p["tasks_per_node"], p["gpus_per_node"], p["timeout_min"]) == (4, 8, 8, 600)
    assert (p["slurm_partition"], p["slurm_account"], p["slurm_constraint"]) == ("p1", "a1", "volta32gb")
    assert d["world_size"] == 32 and d["global_batch"].startswith("2048 = 64 per process x 32 processes x 1")
    assert d["command"][:4] == ["deit3-fast", "train", "--cfg", "vit_l_in1k"] and "auto" in d["command"]
    ramp = cli(
        "submit",
        "--cfg",
        "vit_l_in1k",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--dry-run",
        "--set",
        "schedule.resolution={start: 128, start_epoch: 0, end_epoch: 10, step: 32, batch_sizes: {192: 32}}",
    )
    assert ramp.returncode == 0, ramp.stderr
    assert json.loads(ramp.stdout)["global_batch_at_192px"] == "32 per process x 32 x 2"
    bad = cli("submit", "--cfg", "vit_l_in1k", "--nodes", "3", "--gpus-per-node", "8", "--dry-run")
    assert bad.returncode == 2 and "cannot be split over 24 processes" in bad.stderr and "16 or 32" in bad.stderr


def test_local_job_completes(sets, tmp_path):
    r = cli(
        "submit",
        "--cfg",
        "quickstart",
        "--local",
        "--out",
        tmp_path,
        *[x for s in sets for x in ("--set", s)],
        "--set",
        "schedule.epochs=2",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["job_id"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert load(tmp_path / "checkpoint-last.pt")["epoch"] == 1


def test_preempted_job_requeues_and_resumes_to_the_same_state(sets, tmp_path):
    job = submit("quickstart", sets, str(tmp_path / "job"), local=True, timeout_min=10)
    deadline = time.time() + 300
    while not (tmp_path / "job" / "checkpoint-last.pt").exists():
        assert time.time() < deadline and job.state not in ("DONE", "FAILED"), job.state
        time.sleep(0.1)
    # What Slurm does before a time limit or preemption: the usr signal to the task process.
    tasks = psutil.Process(job._process.pid).children(recursive=True)
    assert tasks
    for t in tasks:
        t.send_signal(signal.SIGUSR2)
    history = job.result()
    assert history[0]["epoch"] >= 1  # the requeued process started from a checkpoint, not from scratch
    log = "".join(p.read_text() for p in (tmp_path / "job" / "submitit").glob("*_log.*"))
    assert "Calling checkpoint method" in log and "Requeued job" in log
    rows = [json.loads(x)["epoch"] for x in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2, 3, 4]  # each epoch once: the interrupted one was redone, not duplicated
    train(load_config("quickstart", sets), tmp_path / "straight", torch.device("cpu"), quiet=True)
    a, b = load(tmp_path / "job" / "checkpoint-last.pt"), load(tmp_path / "straight" / "checkpoint-last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_a_requeue_signal_during_a_checkpoint_write_is_handled_after_it(tmp_path, monkeypatch):
    """submitit's handler for the scheduler's SIGUSR2 requeues the job and calls sys.exit wherever the main thread
    is. Inside torch.save that exit became torch's 'unexpected pos' error and the job failed instead of requeuing:
    the handler now runs once the checkpoint is written whole, and is the handler again afterwards."""
    import os

    from deit3_fast import checkpoint as ckpt

    real_save = torch.save

    def save_signalled_half_way(obj, f):
        os.kill(os.getpid(), signal.SIGUSR2)
        real_save(obj, f)

    def requeue(signum, frame):
        raise SystemExit(144)  # what submitit's handler ends with (LOCAL_REQUEUE_RETURN_CODE)

    monkeypatch.setattr(torch, "save", save_signalled_half_way)
    state = ckpt.RunState({"w": torch.ones(3)}, {}, {}).to_dict()
    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        with pytest.raises(SystemExit):
            ckpt.save_run(tmp_path / "c.pt", state, ckpt.Position(epoch=4), {})
        assert signal.getsignal(signal.SIGUSR2) is requeue
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert load(tmp_path / "c.pt")["epoch"] == 4

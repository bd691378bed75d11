"""torchrun with gloo on CPU: 2 processes x batch B train like 1 process x batch 2B; evaluation counts are exact."""

import json
import os
import subprocess
import sys

import pytest
import torch

from deit3_fast.checkpoint import load

from ..conftest import REPO, make_splits

pytestmark = pytest.mark.slow  # ~1.5 min: four multi-process runs

# Augmentation off and square images with scale/ratio 1 crops: every sample is the same whatever rank or batch slot
# it lands in, so only the batch split differs between the two runs.
DETERMINISTIC = [
    "aug.three_augment=false",
    "aug.color_jitter=0",
    "aug.hflip=0",
    "aug.mixup=0",
    "aug.cutmix=0",
    "aug.rrc_scale=[1,1]",
    "aug.rrc_ratio=[1,1]",
    "model.drop_path=0",
    "model.num_classes=4",
    "data.workers=1",
    "schedule.epochs=2",
    "schedule.warmup_epochs=1",
    "train.global_batch=16",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # val: 15 samples, not divisible by the world size
    return make_splits(
        tmp_path_factory.mktemp("ddp"), {"train": (4, 12, 0), "val": (3, 5, 1)}, min_side=48, max_side=48
    )


def run(args, nproc):
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    r = subprocess.run(
        [*launcher, "-m", "deit3_fast", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def train_args(data):
    return [
        "train",
        "--cfg",
        "quickstart",
        "--data-train",
        data / "train.beton",
        "--data-val",
        data / "val.beton",
        "--device",
        "cpu",
        "--quiet",
        *[x for s in DETERMINISTIC for x in ("--set", s)],
    ]


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """The reference: 1 process x batch 16."""
    out = tmp_path_factory.mktemp("one")
    run([*train_args(data), "--set", "data.batch_size=16", "--out", out], nproc=1)
    return out


@pytest.mark.parametrize("per_process", [8, 4], ids=["no-accumulation", "accumulation-2"])
def test_two_processes_train_like_one_with_twice_the_batch(data, one_process, tmp_path, per_process):
    """Global batch 16 = 2 processes x 8, or 2 x 4 x 2 accumulation steps (gradients all-reduced once per step,
    under DDP no_sync for the first micro-batch) == 1 process x 16."""
    two = run([*train_args(data), "--set", f"data.batch_size={per_process}", "--out", tmp_path / "two"], nproc=2)
    summaries = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and json.loads(summaries[0])["world_size"] == 2  # only rank 0 reports
    a, b = load(one_process / "checkpoint-last.pt"), load(tmp_path / "two" / "checkpoint-last.pt")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    rows = [
        [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one_process, tmp_path / "two")
    ]
    for ra, rb in zip(*rows):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
        assert ra["val_acc1"] == pytest.approx(rb["val_acc1"])  # distributed eval: the same 15 samples, once each
    assert not (tmp_path / "two" / ".checkpoint-last.pt.partial-0").exists()


def test_distributed_eval_counts_every_sample_once(data, one_process):
    sets = [x for s in DETERMINISTIC + ["data.batch_size=4"] for x in ("--set", s)]
    r = run(
        [
            "eval",
            "--cfg",
            "quickstart",
            "--data-val",
            data / "val.beton",
            "--device",
            "cpu",
            "--checkpoint",
            one_process / "checkpoint-last.pt",
            *sets,
        ],
        nproc=2,
    )
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1 and results[0]["n"] == 15
    single = run(
        [
            "eval",
            "--cfg",
            "quickstart",
            "--data-val",
            data / "val.beton",
            "--device",
            "cpu",
            "--checkpoint",
            one_process / "checkpoint-last.pt",
            *sets,
        ],
        nproc=1,
    )
    assert json.loads(single.stdout.strip().splitlines()[-1]) == results[0]


def test_cli_leaves_the_process_group_on_every_exit(tmp_path):
    """gloo threads alive at interpreter exit abort the process (SIGABRT) after a successful run: `main` must leave
    the group whether the command succeeds or fails."""
    from deit3_fast.cli import main

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert (
        main(
            [
                "eval",
                "--cfg",
                "quickstart",
                "--data-val",
                str(tmp_path / "missing.beton"),
                "--device",
                "cpu",
                "--checkpoint",
                str(tmp_path / "missing.pt"),
            ]
        )
        == 2
    )
    assert not torch.distributed.is_initialized()


def test_nccl_rank_binds_its_device_before_the_group_exists(monkeypatch):
    """NCCL binds a rank to the current device when the group starts: set_device first, and device_id so NCCL
    connects to that device (else every rank's communicator starts on GPU 0)."""
    from deit3_fast import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(
        torch.distributed,
        "init_process_group",
        lambda backend, **kw: calls.append(("init", backend, kw.get("device_id"))),
    )
    assert distributed.init_from_env() == torch.device("cuda", 3)
    assert calls == [("set_device", torch.device("cuda", 3)), ("init", "nccl", torch.device("cuda", 3))]


def test_torchrun_splits_a_small_global_batch_over_the_processes(data, tmp_path):
    """The quickstart (batch 32, global 32) under torchrun with 2 processes: 16 per process, said in one line."""
    r = run(
        [
            "train",
            "--cfg",
            "quickstart",
            "--data-train",
            data / "train.beton",
            "--data-val",
            data / "val.beton",
            "--device",
            "cpu",
            "--out",
            tmp_path,
            "--set",
            "model.num_classes=4",
            "--set",
            "schedule.epochs=1",
            "--set",
            "data.workers=1",
        ],
        nproc=2,
    )
    assert "train.global_batch 32 over 2 processes: data.batch_size 32 -> 16 per process" in r.stdout
    facts = json.loads((tmp_path / "run.json").read_text())
    assert (facts["per_process_batch"], facts["world_size"], facts["accumulation_steps"]) == (16, 2, 1)


# ---- resume across ranks and world sizes (torch.multiprocessing + gloo, in-process training) ------------------

RESUME_SETS = [
    "model.num_classes=4",
    "data.batch_size=4",
    "train.global_batch=16",
    "schedule.epochs=3",
    "schedule.warmup_epochs=1",
    "model.drop_path=0.2",
    "train.log_every=2",
    "data.workers=1",
]


def _rank_main(rank, world, init, out, sets, resume, sigterm_at):
    """One rank of a gloo run: train (or resume) with SIGTERM sent to this process at its `sigterm_at`-th loss."""
    import os
    import signal

    from deit3_fast import trainer
    from deit3_fast.config import load_config
    from deit3_fast.losses import RecipeLoss

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        if sigterm_at is not None and rank == 0:
            real, calls = RecipeLoss.__call__, []

            def loss_that_signals(self, x, y):
                calls.append(1)
                if len(calls) == sigterm_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                return real(self, x, y)

            RecipeLoss.__call__ = loss_that_signals
        try:
            trainer.train(
                load_config("quickstart", sets),
                out,
                torch.device("cpu"),
                resume=resume,
                quiet=True,
                handle_sigterm=True,
            )
        except trainer.Preempted:
            pass
    finally:
        torch.distributed.destroy_process_group()


def spawn_run(world, out, data, tmp_path, resume=None, sigterm_at=None):
    import uuid

    import torch.multiprocessing as mp

    sets = [f"data.train={data / 'train.beton'}", f"data.val={data / 'val.beton'}", *RESUME_SETS]
    init = tmp_path / f"init-{uuid.uuid4().hex}"
    mp.spawn(_rank_main, args=(world, str(init), str(out), sets, resume, sigterm_at), nprocs=world, join=True)


def _same_training(a_dir, b_dir):
    a, b = load(a_dir / "checkpoint-last.pt"), load(b_dir / "checkpoint-last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, st in a["optimizer"]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[moment], b["optimizer"]["state"][k][moment]), (k, moment)
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a_dir, b_dir)]
    assert [r["epoch"] for r in rows[0]] == [r["epoch"] for r in rows[1]] == [0, 1, 2]
    for ra, rb in zip(*rows):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-6)
        assert ra["val_acc1"] == rb["val_acc1"]


def test_sigterm_mid_epoch_on_two_processes_resumes_exactly(data, tmp_path):
    """Drop-path on, 2 ranks, SIGTERM to rank 0 in the middle of epoch 1: the resumed run ends bit-identical to the
    uninterrupted one. Each rank's drop-path masks are keyed by (seed, rank, epoch, micro-batch), so nothing is
    restored from rank 0's RNG state onto the others."""
    spawn_run(2, tmp_path / "full", data, tmp_path)
    spawn_run(2, tmp_path / "split", data, tmp_path, sigterm_at=8)  # 6 micro-batches per epoch and rank
    state = load(tmp_path / "split" / "checkpoint-last.pt")
    assert state["epoch"] == 0 and state["resume_at"]["step"] in (1, 2)
    spawn_run(2, tmp_path / "split", data, tmp_path, resume="auto")
    _same_training(tmp_path / "full", tmp_path / "split")


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_number_of_processes(data, tmp_path, before, after):
    """A mid-epoch checkpoint from 2 processes continues on 1 (and the reverse) and trains to the end."""
    spawn_run(before, tmp_path / "run", data, tmp_path, sigterm_at=8 if before == 2 else 16)
    assert load(tmp_path / "run" / "checkpoint-last.pt")["resume_at"] is not None
    spawn_run(after, tmp_path / "run", data, tmp_path, resume="auto")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert all(r["train_loss"] == r["train_loss"] and 0 < r["train_loss"] < 10 for r in rows)
    assert load(tmp_path / "run" / "checkpoint-last.pt")["epoch"] == 2


STAGE_SCRIPT = """
import os, sys, time
from datetime import timedelta

import torch.distributed as tdist

tdist.init_process_group("gloo", timeout=timedelta(seconds=2))  # stands in for NCCL's 10-minute limit
import dataset_tools.stage as stage
from deit3_fast import builder
from deit3_fast.config import load_config
from pipelines import DataError

real = stage.stage_splits


def slow(*args, copy, **kw):
    if copy:
        time.sleep(5)  # the node's copy takes longer than the group's limit
        if sys.argv[3] == "fail":
            raise stage.BetonError("data.stage_to: staging data.train into /local failed: No space left on device")
    return real(*args, copy=copy, **kw)


stage.stage_splits = slow
cfg = load_config("quickstart", [f"data.train={sys.argv[1]}", "data.val=null", f"data.stage_to={sys.argv[2]}",
                                 "model.num_classes=4"])


def gloo_threads():
    return sum(open(f"/proc/self/task/{t}/comm").read().startswith(("gloo", "pt_gloo"))
               for t in os.listdir("/proc/self/task"))


before = gloo_threads()
try:
    result = builder.stage_data(cfg).data.train
except DataError as e:
    result = f"DataError: {e}"
left = gloo_threads() - before  # the long wait's group is gone, and its threads with it
with open(f"{sys.argv[2]}-rank{os.environ['RANK']}.txt", "w") as f:  # the ranks' stdout interleaves
    f.write(f"{result}\\n{left} gloo threads left")
tdist.destroy_process_group()
"""


@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_staging_outlasts_the_process_groups_time_limit(data, tmp_path, outcome):
    """data.stage_to with 2 processes: the second waits for the first's copy past the default group's limit (here
    2 s for NCCL's 10 minutes) on a group of its own, and both read the staged copy; when the copy fails, both stop
    with an error at once (not at the long wait's end)."""
    script = tmp_path / "stage_two.py"
    script.write_text(STAGE_SCRIPT)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            script,
            data / "train.beton",
            tmp_path / "node",
            outcome,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    seen = [(tmp_path / f"node-rank{i}.txt").read_text().splitlines() for i in (0, 1)]
    # No gloo threads are left behind: a group kept alive to the interpreter's exit aborted the process there.
    assert [s[1] for s in seen] == ["0 gloo threads left"] * 2
    if outcome == "ok":
        assert [s[0] for s in seen] == [str(tmp_path / "node" / "train" / "train.beton")] * 2
    else:
        assert [s[0] for s in seen] == [
            "DataError: data.stage_to: staging data.train into /local failed: No space left on device",
            "DataError: data.stage_to: the copy failed on a node (its first process's log says why)",
        ]

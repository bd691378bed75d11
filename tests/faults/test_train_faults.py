"""Faults while training, injected for real: SIGKILL in the middle of a checkpoint write, SIGTERM mid-run, a run that
really diverges (learning rate 1e30), a resume with a changed config, an allocation larger than memory at start, and
a batch larger than the training set. Each ends in a documented state: the last good checkpoint loads, a re-run or
`--resume auto` continues, and the message is one line.

Covered elsewhere (not repeated here):
  tests/deit3_fast/test_train.py::test_sigterm_mid_epoch_checkpoints_and_resumes_exactly
      SIGTERM at an exact step, resumed bit-identical (in-process)
  tests/deit3_fast/test_train.py::test_nan_loss_stops_and_keeps_last_good_checkpoint
      NaN multiplied into the loss
  tests/deit3_fast/test_train.py::test_resume_with_changed_config_is_refused_unless_forced
      the API's ConfigMismatch
"""

import json
import resource
import signal
import subprocess
import time

import pytest
import torch

from deit3_fast import cli
from deit3_fast.checkpoint import load

from ..conftest import REPO
from .conftest import TRAIN


def tiny(data, out, *extra, epochs=3, batch=8, global_batch=16) -> list[str]:
    sets = {
        "model.num_classes": 4,
        "data.batch_size": batch,
        "train.global_batch": global_batch,
        "schedule.warmup_epochs": 1,
        "data.workers": 1,
        "train.log_every": 1,
    }
    return [
        "--cfg",
        "quickstart",
        "--data-train",
        str(data / "train.beton"),
        "--data-val",
        str(data / "val.beton"),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--quiet",
        *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
        *extra,
    ]


def start_train(args, **kw) -> subprocess.Popen:
    return subprocess.Popen([*TRAIN, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run_train(args, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*TRAIN, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)


def wait_for(cond, proc, timeout=240, poll=0.002) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before the fault could be injected: {proc.communicate()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting to inject the fault")
        time.sleep(poll)


def epochs_logged(run) -> list[int]:
    return [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def partials(run) -> list[str]:
    return sorted(p.name for p in run.iterdir() if ".partial-" in p.name)


def one_line(stderr: str, prefix: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.slow
def test_sigkill_during_checkpoint_write(data, tmp_path):
    """A ViT-S checkpoint (~260 MB with LAMB's state) takes long enough to write that the run can be SIGKILLed while
    its temp file exists: the previous checkpoint still loads, the half-written temp file is never taken for a
    checkpoint, `--resume auto` finishes the run, and the stale temp file is swept by the next save."""
    run = tmp_path / "run"
    args = tiny(data, run, "--set", "model.name=deit3_small")
    proc = start_train(args)
    last = run / "checkpoint-last.pt"
    partial = run / f".checkpoint-last.pt.partial-{proc.pid}"
    wait_for(last.exists, proc)  # epoch 0 is saved...
    wait_for(lambda: partial.exists() and partial.stat().st_size > 0, proc)  # ...epoch 1's save is under way
    proc.kill()
    proc.communicate(timeout=60)
    state = load(last)  # the previous checkpoint, whole
    assert state["epoch"] == 0 and state.get("resume_at") is None
    assert partials(run) == [partial.name]  # SIGKILL cannot clean up; nothing reads it
    r = run_train([*args, "--resume", "auto"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["epochs_run"] == 2
    assert load(last)["epoch"] == 2
    assert partials(run) == []  # swept by the resumed run's first save
    assert epochs_logged(run) == [0, 1, 2]  # epoch 1 was redone, and is logged once


@pytest.mark.slow
def test_sigterm_checkpoints_then_exits_0_and_resume_finishes(data, tmp_path):
    """SIGTERM from outside (a scheduler, `kill`) once the first epoch is saved: one line naming the position and
    `--resume auto`, exit 0, a checkpoint of that position; the resumed run completes every epoch once."""
    run = tmp_path / "run"
    args = tiny(data, run, epochs=8, global_batch=8)  # 6 steps per epoch
    proc = start_train(args)
    wait_for((run / "checkpoint-last.pt").exists, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    line = one_line(err, "deit3-fast: SIGTERM")
    assert "epoch" in line and "step" in line and "--resume auto" in line
    state = load(run / "checkpoint-last.pt")
    # The epoch the run was in when it stopped, counted from 1 as the message counts: the one after the checkpoint's
    # last whole epoch (0-based there), or that epoch itself when the SIGTERM came in its last step.
    stopped_in = state["epoch"] + (2 if state.get("resume_at") else 1)
    assert f"epoch {stopped_in}" in line
    assert partials(run) == []
    r = run_train([*args, "--resume", "auto"])
    assert r.returncode == 0, r.stderr
    assert epochs_logged(run) == list(range(8))
    assert load(run / "checkpoint-last.pt")["epoch"] == 7


def _bytes(run) -> dict:
    return {p.name: p.read_bytes() for p in sorted(run.glob("checkpoint-*.pt"))}


@pytest.mark.slow
def test_changed_config_refused_then_divergence_keeps_last_good_checkpoint(data, tmp_path, capsys):
    """Epoch 0 trains normally. Resuming with other settings is refused, naming each differing key; forced with a
    learning rate of 1e30 the run really diverges: exit 3, one line, and the checkpoints of epoch 0 are untouched."""
    run = tmp_path / "run"
    assert cli.main(["train", *tiny(data, run, epochs=1)]) == 0
    capsys.readouterr()
    good = _bytes(run)
    assert set(good) == {"checkpoint-last.pt", "checkpoint-best.pt"}

    changed = tiny(data, run, "--resume", "auto", "--set", "optim.lr=1e30", "--set", "model.drop_path=0.3", epochs=3)
    assert cli.main(["train", *changed]) == 2
    line = one_line(capsys.readouterr().err, "deit3-fast: error: ")
    assert "different config (model.drop_path, optim.lr)" in line and "--force" in line
    assert "schedule.epochs" not in line  # changing the length of a run is allowed
    assert _bytes(run) == good and epochs_logged(run) == [0]

    assert cli.main(["train", *changed, "--force"]) == 3
    line = one_line(capsys.readouterr().err, "deit3-fast: stopped: loss is ")
    # 0-based epoch 1; its first step (at lr 1e30) makes the second step's loss NaN
    assert "at epoch 2, step 2/3" in line and "last good checkpoint is kept" in line
    assert _bytes(run) == good and epochs_logged(run) == [0] and partials(run) == []
    assert load(run / "checkpoint-last.pt")["epoch"] == 0


def test_out_of_memory_at_start(data, tmp_path):
    """A batch of 48 ViT-S images of 16384 px (36 GiB of pixels, a million tokens each) under a 16 GiB address-space
    limit (as a container's memory limit): the first allocation fails; the message suggests a smaller
    data.batch_size with accumulation. Exit 2, no checkpoint."""

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))

    run = tmp_path / "run"
    r = run_train(
        tiny(
            data,
            run,
            "--set",
            "model.name=deit3_small",
            "--set",
            "aug.img_size=16384",
            "--set",
            "schedule.warmup_epochs=0",  # warm-up 1 of 1 epoch would add its warning line
            epochs=1,
            batch=48,
            global_batch=48,
        ),
        preexec_fn=limit_memory,
    )
    assert r.returncode == 2, r.stderr
    line = one_line(r.stderr, "deit3-fast: error: out of memory")
    assert "data.batch_size" in line and "accumulation" in line and "train.global_batch" in line
    assert "--set data.batch_size=24" in line
    assert not any(run.glob("checkpoint*"))


def test_batch_larger_than_the_training_set(data, tmp_path, capsys):
    """48 training images and a batch of 64 (whole batches only): not a single step; one clear line, not a traceback
    from the empty loader."""
    rc = cli.main(["train", *tiny(data, tmp_path / "run", epochs=1, batch=64, global_batch=64)])
    line = one_line(capsys.readouterr().err, "deit3-fast: error: ")
    assert rc == 2 and "data.batch_size" in line


@pytest.mark.slow
def test_resume_from_a_corrupt_checkpoint(data, tmp_path, capsys):
    """A checkpoint-last.pt cut short (a copy interrupted, a full disk outside our atomic writer): one line naming the
    file, exit 2; the run dir is left as it was."""
    run = tmp_path / "run"
    assert cli.main(["train", *tiny(data, run, epochs=1)]) == 0
    capsys.readouterr()
    last = run / "checkpoint-last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = _bytes(run)
    rc = cli.main(["train", *tiny(data, run, "--resume", "auto", epochs=2)])
    line = one_line(capsys.readouterr().err, "deit3-fast: error: ")
    assert rc == 2 and str(last) in line
    assert _bytes(run) == before and epochs_logged(run) == [0]
    assert torch.load(run / "checkpoint-best.pt", weights_only=True)["epoch"] == 0

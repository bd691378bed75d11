"""TensorBoard and W&B: the per-epoch numbers reach them; a missing package is one clear error before training."""

import sys
import types

import pytest
import torch

from deit3_fast.config import ConfigError, load_config
from deit3_fast.losses import RecipeLoss
from deit3_fast.trainer import train


def _cfg(data, **extra):
    sets = {
        "data.train": data / "train.beton",
        "data.val": data / "val.beton",
        "model.num_classes": 4,
        "data.batch_size": 8,
        "train.global_batch": 16,
        "schedule.epochs": 2,
        "schedule.warmup_epochs": 1,
        "data.workers": 1,
        **extra,
    }
    return load_config("quickstart", [f"{k}={v}" for k, v in sets.items()])


@pytest.mark.slow
def test_tensorboard_and_wandb_receive_every_epoch(data, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    calls = []
    fake = types.ModuleType("wandb")

    class Run:
        def log(self, scalars, step):
            calls.append(("log", step, dict(scalars)))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    rows = train(
        _cfg(data, **{"train.tensorboard": "true", "train.wandb_project": "deit3"}),
        tmp_path / "run",
        torch.device("cpu"),
        quiet=True,
    )
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("val_acc1")] == [
        (1, pytest.approx(rows[0]["val_acc1"])),
        (2, pytest.approx(rows[1]["val_acc1"])),
    ]
    assert {"train_loss", "lr", "img_per_s"} <= set(acc.Tags()["scalars"])
    init = calls[0][1]
    assert calls[0][0] == "init" and init["project"] == "deit3" and init["resume"] == "allow"
    assert init["config"]["model"]["num_classes"] == 4
    assert [c[1] for c in calls if c[0] == "log"] == [1, 2] and calls[-1] == ("finish",)
    assert calls[1][2]["val_acc1"] == pytest.approx(rows[0]["val_acc1"])


@pytest.mark.slow
def test_a_preempted_run_closes_its_loggers(data, tmp_path, monkeypatch):
    """SIGTERM mid-run raises Preempted out of the loop: the W&B run is still finished (and TensorBoard flushed)."""
    import os
    import signal

    from deit3_fast import trainer

    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: types.SimpleNamespace(
        log=lambda scalars, step: calls.append(("log", step)), finish=lambda: calls.append(("finish",))
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    real, losses = RecipeLoss.__call__, []

    def loss_that_signals(self, x, y):
        losses.append(1)
        if len(losses) == 8:  # epoch 1's second micro-batch
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, x, y)

    monkeypatch.setattr(RecipeLoss, "__call__", loss_that_signals)
    with pytest.raises(trainer.Preempted):
        train(
            _cfg(data, **{"train.wandb_project": "deit3", "schedule.epochs": 3}),
            tmp_path / "run",
            torch.device("cpu"),
            quiet=True,
            handle_sigterm=True,
        )
    assert calls == [("log", 1), ("finish",)]


@pytest.mark.slow
def test_the_wandb_run_is_continued_on_resume_and_new_for_a_fresh_run(data, tmp_path, monkeypatch):
    ids = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: (
        ids.append(kw["id"]) or types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = _cfg(data, **{"train.wandb_project": "deit3", "schedule.epochs": 2})
    train(cfg, tmp_path / "run", torch.device("cpu"), quiet=True, stop_after_epoch=0)
    train(cfg, tmp_path / "run", torch.device("cpu"), quiet=True, resume="auto")  # continues: same W&B run
    for p in [*(tmp_path / "run").glob("checkpoint-*.pt"), tmp_path / "run" / "metrics.jsonl"]:
        p.unlink()  # the run removed, its wandb-id.txt left: training there starts again, as a new W&B run
    train(cfg, tmp_path / "run", torch.device("cpu"), quiet=True)
    assert ids[0] == ids[1] != ids[2] and len(ids[2]) == 16


@pytest.mark.parametrize(
    "key, value, package",
    [("train.tensorboard", "true", "torch.utils.tensorboard"), ("train.wandb_project", "p", "wandb")],
)
@pytest.mark.slow
def test_a_missing_logger_package_is_one_clear_error_before_training(data, tmp_path, monkeypatch, key, value, package):
    """Refused before the run dir is touched: the files of the run it continues stay as they were."""
    train(_cfg(data), tmp_path / "run", torch.device("cpu"), quiet=True, stop_after_epoch=0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    with pytest.raises(ConfigError, match=f"needs the {package.split('.')[-1]} package: pip install"):
        train(_cfg(data, **{key: value}), tmp_path / "run", torch.device("cpu"), quiet=True, resume="auto")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before
    with pytest.raises(ConfigError, match="needs the"):
        train(_cfg(data, **{key: value}), tmp_path / "new", torch.device("cpu"), quiet=True)
    assert not (tmp_path / "new").exists()

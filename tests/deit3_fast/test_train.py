"""The trainer end to end on CPU: exact resume, divergence, config checks, run-dir contents, CLI train/eval."""

import json
import math
import subprocess
import sys

import pytest
import torch

from deit3_fast import rundir, trainer
from deit3_fast.checkpoint import load
from deit3_fast.config import load_config
from deit3_fast.losses import RecipeLoss
from deit3_fast.trainer import ConfigMismatch, TrainingDiverged, train

from ..conftest import REPO


def tiny_cfg(data, **sets):
    base = {
        "data.train": data / "train.beton",
        "data.val": data / "val.beton",
        "model.num_classes": 4,
        "data.batch_size": 8,
        "train.global_batch": 16,
        "schedule.epochs": 3,
        "schedule.warmup_epochs": 1,
        "model.drop_path": 0.1,
        "train.log_every": 2,
        "data.workers": 1,
    }
    base.update(sets)
    return load_config("quickstart", [f"{k}={v}" for k, v in base.items()])


def assert_same_state(a, b, where="checkpoint"):
    """Two checkpoint payloads hold the same state to the bit: every tensor, number and string, recursively (model,
    optimiser moments and step counts and learning rates, grad scaler, EMA, epoch, best accuracy, position, config)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (where, set(a) ^ set(b))
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, (where, a, b)


def assert_same_as_uninterrupted(full_dir, full_rows, split_dir):
    """The interrupted-and-resumed run in `split_dir` ends where the uninterrupted one did: every piece of state in
    the last and best checkpoints, and the same metrics rows (timings aside)."""
    for name in ("checkpoint-last.pt", "checkpoint-best.pt"):
        assert_same_state(load(full_dir / name), load(split_dir / name), name)
    strip = ("train_seconds", "img_per_s", "data_wait_frac", "max_mem_mb")
    rows = [json.loads(x) for x in (split_dir / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k not in strip} for r in rows] == [
        {k: v for k, v in r.items() if k not in strip} for r in full_rows
    ]


@pytest.mark.slow
@pytest.mark.parametrize("sets", [{}, {"train.ema_decay": 0.9, "train.amp": "fp16"}], ids=["plain", "ema-fp16"])
def test_resume_is_bit_identical(data, tmp_path, sets):
    """3 epochs in one go == 2 epochs, stop, resume for the last: every piece of state and the metrics."""
    cpu = torch.device("cpu")
    full = train(tiny_cfg(data, **sets), tmp_path / "full", cpu, quiet=True)
    part = train(tiny_cfg(data, **sets), tmp_path / "split", cpu, quiet=True, stop_after_epoch=1)
    assert [r["epoch"] for r in part] == [0, 1]
    rest = train(tiny_cfg(data, **sets), tmp_path / "split", cpu, quiet=True, resume="auto")
    assert [r["epoch"] for r in rest] == [2]
    assert_same_as_uninterrupted(tmp_path / "full", full, tmp_path / "split")


@pytest.mark.slow
def test_results_do_not_depend_on_data_workers(data, tmp_path, monkeypatch):
    """The same run with 1 and with 2 loader workers trains the same weights to the bit (so a run resumes with
    another data.workers exactly), on a machine of 4 cores: torch's thread count (which decides how its reductions
    split) is the cores' share, the same for both, as run.json records; FFCV set it to data.workers."""
    import os

    from pipelines import cores

    threads = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setattr(cores, "cgroup_cpu_limit", lambda: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    try:
        runs = {
            w: train(tiny_cfg(data, **{"data.workers": w}), tmp_path / str(w), torch.device("cpu"), quiet=True)
            for w in (1, 2)
        }
    finally:
        torch.set_num_threads(threads)
    one, two = (load(tmp_path / str(w) / "checkpoint-last.pt") for w in (1, 2))
    for part in ("model", "optimizer"):
        assert_same_state(one[part], two[part], part)
    assert [r["train_loss"] for r in runs[1]] == [r["train_loss"] for r in runs[2]]
    facts = {w: json.loads((tmp_path / str(w) / "run.json").read_text())["cpu"] for w in (1, 2)}
    assert facts[1] == {**facts[2], "data_workers": 1, "data_workers_config": 1}
    assert facts[2]["data_workers"] == 2 and facts[2]["torch_threads"] == 3
    line = rundir.describe_facts(json.loads((tmp_path / "2" / "run.json").read_text()))
    assert line.endswith("; loader workers 2 + torch threads 3 on 4 cores")  # the run's first line


def sigterm_at_loss(monkeypatch, n: int) -> list:
    """Send this process SIGTERM at the n-th loss computed from now on (what a scheduler does mid-step); the list
    that returns counts the loss calls."""
    import os
    import signal

    calls, real = [], RecipeLoss.__call__

    def loss_that_signals(self, x, y):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, x, y)

    monkeypatch.setattr(RecipeLoss, "__call__", loss_that_signals)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("sets", [{}, {"train.ema_decay": 0.9, "train.amp": "fp16"}], ids=["plain", "ema-fp16"])
def test_sigterm_mid_epoch_checkpoints_and_resumes_exactly(data, tmp_path, monkeypatch, sets):
    """A real SIGTERM in the middle of epoch 1 (sent by the 9th loss call: epoch 1, step 1 of 3): the run stops at
    the step boundary, the checkpoint records that position, and the resumed run ends bit-identical to one never
    interrupted: every piece of state (with an EMA and fp16's grad scaler too) and every metrics row."""
    import signal

    cpu = torch.device("cpu")
    full = train(tiny_cfg(data, **sets), tmp_path / "full", cpu, quiet=True)
    calls = sigterm_at_loss(monkeypatch, 9)
    with pytest.raises(trainer.Preempted, match="epoch 2, step 2/3") as stopped:
        train(tiny_cfg(data, **sets), tmp_path / "split", cpu, quiet=True, handle_sigterm=True)
    assert len(calls) == 10  # the step's second micro-batch ran: no half-accumulated gradients are lost
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    state = load(stopped.value.checkpoint)
    assert state["epoch"] == 0 and state["resume_at"]["step"] == 2
    monkeypatch.undo()
    rest = train(tiny_cfg(data, **sets), tmp_path / "split", cpu, quiet=True, resume="auto")
    assert [r["epoch"] for r in rest] == [1, 2]
    assert_same_as_uninterrupted(tmp_path / "full", full, tmp_path / "split")


@pytest.mark.slow
def test_run_dir_contents(data, tmp_path):
    train(tiny_cfg(data, **{"schedule.epochs": 2}), tmp_path, torch.device("cpu"), quiet=True)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "checkpoint-last.pt", "checkpoint-best.pt", "curves.png"} <= names
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in ("epoch", "lr", "train_loss", "val_acc1", "val_acc5", "img_per_s", "data_wait_frac", "max_mem_mb"):
        assert all(key in r for r in rows), key
    assert 0 <= rows[-1]["data_wait_frac"] <= 1 and rows[-1]["val_acc1"] is not None
    assert load_config(str(tmp_path / "config.yaml")) == tiny_cfg(data, **{"schedule.epochs": 2})


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch):
    train(tiny_cfg(data, **{"schedule.epochs": 3}), tmp_path, torch.device("cpu"), quiet=True, stop_after_epoch=0)
    good = load(tmp_path / "checkpoint-last.pt")
    real = RecipeLoss.__call__
    monkeypatch.setattr(RecipeLoss, "__call__", lambda self, x, y: real(self, x, y) * math.nan)
    with pytest.raises(TrainingDiverged, match="loss is nan at epoch 2, step 1/3"):
        train(tiny_cfg(data, **{"schedule.epochs": 3}), tmp_path, torch.device("cpu"), quiet=True, resume="auto")
    kept = load(tmp_path / "checkpoint-last.pt")
    assert kept["epoch"] == 0
    for k in good["model"]:
        assert torch.equal(good["model"][k], kept["model"][k])


@pytest.mark.slow
def test_resume_with_changed_config_is_refused_unless_forced(data, tmp_path):
    train(tiny_cfg(data), tmp_path, torch.device("cpu"), quiet=True, stop_after_epoch=0)
    with pytest.raises(ConfigMismatch, match="optim.lr"):
        train(tiny_cfg(data, **{"optim.lr": 1e-3}), tmp_path, torch.device("cpu"), quiet=True, resume="auto")
    rows = train(
        tiny_cfg(data, **{"optim.lr": 1e-3}),
        tmp_path,
        torch.device("cpu"),
        quiet=True,
        resume="auto",
        force=True,
        stop_after_epoch=1,
    )
    assert [r["epoch"] for r in rows] == [1]


@pytest.mark.slow
def test_a_checkpoint_from_before_a_config_key_existed_resumes(data, tmp_path):
    """A checkpoint written before schedule.resolution existed (its config has no such section) is the same config
    at that key's default, so it resumes without --force; a real difference is still refused."""
    train(tiny_cfg(data), tmp_path, torch.device("cpu"), quiet=True, stop_after_epoch=0)
    path = tmp_path / "checkpoint-last.pt"
    payload = load(path)
    del payload["config"]["schedule"]["resolution"]
    # ... and before checkpoints carried a format version (runs in flight have such files): read as version 1.
    del payload["format"], payload["version"]
    torch.save(payload, path)
    with pytest.raises(ConfigMismatch, match=r"\(optim.lr\)"):
        train(tiny_cfg(data, **{"optim.lr": 1e-3}), tmp_path, torch.device("cpu"), quiet=True, resume="auto")
    rows = train(tiny_cfg(data), tmp_path, torch.device("cpu"), quiet=True, resume="auto", stop_after_epoch=1)
    assert [r["epoch"] for r in rows] == [1]


def test_global_batch_must_divide(data, tmp_path):
    from deit3_fast.config import ConfigError

    with pytest.raises(ConfigError, match="global_batch"):
        train(tiny_cfg(data, **{"train.global_batch": 12}), tmp_path, torch.device("cpu"), quiet=True)


def cli(*args, timeout=600, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "deit3_fast", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
@pytest.mark.parametrize("layer_scale", ["1e-4", "null"], ids=["layerscale", "no-layerscale"])
def test_cli_train_then_eval(data, tmp_path, layer_scale, capsys):
    """eval rebuilds the model the config describes: also without LayerScale (the ablation's variant). Both commands
    through the CLI's main in this process (test_cli_dry_run_and_one_line_errors starts a whole one)."""
    from deit3_fast.cli import main

    common = [
        "--cfg",
        "quickstart",
        "--data-val",
        data / "val.beton",
        "--set",
        "model.num_classes=4",
        "--set",
        "data.workers=1",
        "--set",
        f"model.layer_scale_init={layer_scale}",
    ]
    code = main(
        list(
            map(
                str,
                [
                    "train",
                    *common,
                    "--data-train",
                    data / "train.beton",
                    "--out",
                    tmp_path,
                    "--epochs",
                    "2",
                    "--quiet",
                    "--set",
                    "data.batch_size=8",
                    "--set",
                    "train.global_batch=8",
                ],
            )
        )
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["epochs_run"] == 2
    code = main(list(map(str, ["eval", *common, "--checkpoint", tmp_path / "checkpoint-last.pt"])))
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["n"] == 16 and result["acc1"] == pytest.approx(summary["val_acc1"])
    assert set(result) == {"acc1", "acc5", "n"}


def test_cli_dry_run_and_one_line_errors(tmp_path, capsys):
    r = cli("train", "--cfg", "vit_h_in1k.yaml", "--dry-run", "--epochs", "3", cwd=tmp_path)  # from any directory
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["model"]["name"] == "deit3_huge" and cfg["schedule"]["epochs"] == 3 and cfg["aug"]["img_size"] == 160
    r = cli("train", "--cfg", "vit_s_in1k", "--set", "optim.lrr=1", "--out", tmp_path / "run")  # a whole process
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "deit3-fast: error: unknown config key 'optim.lrr' (did you mean 'lr'?)"
    ], r.stderr
    from deit3_fast.cli import (
        main,  # the rest in this process: the same main, without a second start-up
    )

    for args, fragment in [
        (["--cfg", "vit_s_in1k", "--set", "data.batch_size=big"], "data.batch_size"),
        (["--cfg", "no_such_recipe"], "not found"),
        (["--cfg", "vit_s_in1k", "--data-train", tmp_path / "absent.beton"], "absent.beton"),
    ]:
        assert main(["train", *map(str, args), "--out", str(tmp_path / "run")]) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and fragment in err, err


@pytest.mark.slow
def test_refused_inputs_are_one_line_and_leave_no_run_dir(data, tmp_path, capsys):
    """Inputs a fault hunt found passing as tracebacks: each is one line, exit 2, and no run dir is left."""
    from deit3_fast import __version__
    from deit3_fast.cli import main

    common = [
        "--cfg",
        "quickstart",
        "--data-train",
        str(data / "train.beton"),
        "--data-val",
        str(data / "val.beton"),
        "--set",
        "model.num_classes=4",
        "--set",
        "data.workers=1",
        "--device",
        "cpu",
    ]
    weights = tmp_path / "weights.pt"
    from deit3_fast.models import create_model

    q = load_config("quickstart")
    model = create_model(q.model.name, num_classes=4, img_size=q.aug.img_size)
    torch.save({"model": model.state_dict()}, weights)  # as an official .pth: weights only, no config or position
    newer = tmp_path / "newer.pt"  # as a later deit3-fast with another checkpoint layout would write it
    torch.save({"format": "deit3-fast-checkpoint", "version": 2, "model": model.state_dict()}, newer)
    (tmp_path / "src").mkdir()
    for args, fragment in [
        (["--set", "aug.auto_augment=rand-t3a"], "does not implement"),  # timm ops BatchAugment lacks
        (["--set", "data.batch_size=15", "--set", "train.global_batch=15"], "15 images per process is odd"),
        (["--resume", str(weights)], "not a checkpoint of a deit3-fast run"),
        (
            ["--resume", str(newer)],
            (
                f"{newer} is a deit3-fast checkpoint of format version 2, and deit3-fast "
                f"{__version__} reads version 1; a newer deit3-fast wrote it: upgrade"
            ),
        ),
    ]:
        assert main(["train", *common, *args, "--out", str(tmp_path / "run")]) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and fragment in err, err
        assert not (tmp_path / "run").exists()
    assert (
        main(
            [
                "eval",
                "--cfg",
                "quickstart",
                "--set",
                "model.num_classes=4",
                "--device",
                "cpu",
                "--checkpoint",
                str(weights),
                "--val",
                f"x={tmp_path / 'src'}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--val x: " in err and "not a .beton or a shard set" in err, err
    with pytest.raises(SystemExit) as stop:
        main(["submit", "--cfg", "quickstart", "--nodes", "0", "--dry-run"])
    assert stop.value.code == 2 and "--nodes: must be a whole number of at least 1" in capsys.readouterr().err


def test_more_refused_inputs_are_one_line(data, tmp_path, capsys):
    """The rest of the fault hunt's cases, each refused before its work with one line naming the fix."""
    from dataset_tools.convert import main as convert_main
    from deit3_fast.cli import main

    binary = tmp_path / "train.beton"
    binary.write_bytes(bytes(range(256)) * 4)
    (tmp_path / "a_dir").mkdir()
    train_ = [
        "train",
        "--cfg",
        "quickstart",
        "--data-train",
        str(data / "train.beton"),
        "--data-val",
        str(data / "val.beton"),
        "--set",
        "model.num_classes=4",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "r"),
    ]
    preview = [
        "preview",
        "--cfg",
        "quickstart",
        "--data-train",
        str(data / "train.beton"),
        "--set",
        "model.num_classes=4",
    ]
    cases = [
        (main, [*train_, "--set", "aug.auto_augment=rand-n20-tweights"], "use n"),  # crashed at the first batch
        (main, [*train_, "--overrides", str(binary)], "--overrides"),
        (main, [*train_, "--epochs", "0"], "schedule.epochs: must be at least 1"),
        (main, ["compare", str(tmp_path), "--out", str(tmp_path / "p.txt")], "name an image file"),
        (main, [*preview, "--out", str(tmp_path / "p.txt")], "name an image file"),
        (main, [*preview, "--n", "1000", "--out", str(tmp_path / "p.png")], "--n 1000: more than the"),
        (main, ["export", str(tmp_path / "missing.pt"), str(tmp_path / "e")], "no such checkpoint file"),
        (main, ["export", str(binary), str(binary)], "exists and is not a folder"),
        (
            main,
            [
                "eval",
                "--cfg",
                "quickstart",
                "--data-val",
                str(data / "val.beton"),
                "--checkpoint",
                str(binary),
                "--save-predictions",
                str(tmp_path / "a_dir"),
            ],
            "--save-predictions: cannot write",
        ),
        (convert_main, [str(tmp_path / "a_dir"), str(tmp_path / "o.beton"), "--classes", str(binary)], "not text"),
    ]
    for entry, args, fragment in cases:
        assert entry(args) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and fragment in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "train.beton"]


def test_a_damaged_metrics_file_is_read_or_named(tmp_path, capsys):
    """A row cut short by a crash mid-append is the epoch redone on resume: dropped. Any other bad line is named."""
    from deit3_fast import cli, rundir

    rows = [{"epoch": 0, "val_acc1": 10.0}, {"epoch": 1, "val_acc1": 20.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 2, "val')
    assert rundir.read_metrics(tmp_path) == rows
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n[1, 2]\n" + json.dumps(rows[1]) + "\n")
    assert cli.main(["compare", str(tmp_path), "--json"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "metrics.jsonl: line 2 is not a metrics row" in err, err


@pytest.mark.parametrize(
    "name, model, size, lr, drop_path, batch",
    [
        ("vit_s_in1k", "deit3_small", 224, 4e-3, 0.05, 256),
        ("vit_b_in1k", "deit3_base", 192, 3e-3, 0.2, 256),
        ("vit_l_in1k", "deit3_large", 192, 3e-3, 0.45, 64),
        ("vit_h_in1k", "deit3_huge", 160, 3e-3, 0.6, 64),
    ],
)
def test_in1k_recipes_are_exact(name, model, size, lr, drop_path, batch):
    c = load_config(name)
    assert (c.model.name, c.aug.img_size, c.optim.lr, c.model.drop_path, c.data.batch_size) == (
        model,
        size,
        lr,
        drop_path,
        batch,
    )
    assert (c.optim.name, c.optim.weight_decay, c.loss, c.train.global_batch, c.schedule.epochs) == (
        "lamb",
        0.05,
        "bce",
        2048,
        800,
    )
    assert (c.schedule.warmup_epochs, c.schedule.warmup_lr, c.schedule.min_lr) == (5, 1e-6, 1e-5)
    assert (c.aug.mixup, c.aug.cutmix, c.aug.label_smoothing, c.aug.color_jitter) == (0.8, 1.0, 0.0, 0.3)
    assert c.aug.three_augment and c.aug.crop == "rrc" and c.aug.eval_crop_ratio == 1.0 and c.data.repeats == 3
    assert c.model.layer_scale_init == 1e-4


@pytest.mark.slow
def test_ema_weights_are_kept_and_evaluable(data, tmp_path, capsys):
    train(tiny_cfg(data, **{"train.ema_decay": 0.9, "schedule.epochs": 1}), tmp_path, torch.device("cpu"), quiet=True)
    ck = load(tmp_path / "checkpoint-last.pt")
    assert ck["ema"] is not None
    assert any(not torch.equal(ck["ema"][k], ck["model"][k]) for k in ck["model"])
    from deit3_fast.cli import main  # eval --ema in this process: the command, not a start-up, is tested

    capsys.readouterr()
    code = main(
        [
            "eval",
            "--cfg",
            "quickstart",
            "--data-val",
            str(data / "val.beton"),
            "--set",
            "model.num_classes=4",
            "--set",
            "data.workers=1",
            "--checkpoint",
            str(tmp_path / "checkpoint-last.pt"),
            "--ema",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["n"] == 16


@pytest.mark.slow
def test_compiled_model_trains_and_saves_plain_keys(data, tmp_path):
    rows = train(
        tiny_cfg(data, **{"train.compile": "true", "schedule.epochs": 1}), tmp_path, torch.device("cpu"), quiet=True
    )
    assert math.isfinite(rows[0]["train_loss"])
    assert not any(k.startswith("_orig_mod.") for k in load(tmp_path / "checkpoint-last.pt")["model"])


@pytest.mark.parametrize(
    "size, model, res, drop_path, epochs",
    [
        ("s", "deit3_small", 224, 0.05, 240),
        ("b", "deit3_base", 224, 0.1, 240),
        ("l", "deit3_large", 224, 0.3, 240),
        ("h", "deit3_huge", 128, 0.5, 90),
    ],
)
def test_in21k_recipes_are_exact(size, model, res, drop_path, epochs):
    c = load_config(f"vit_{size}_in21k")
    assert (c.model.name, c.aug.img_size, c.model.drop_path, c.schedule.epochs) == (model, res, drop_path, epochs)
    assert (c.optim.name, c.optim.lr, c.optim.weight_decay, c.loss, c.aug.label_smoothing) == (
        "lamb",
        1e-3,
        0.02,
        "ce",
        0.1,
    )
    assert (c.aug.mixup, c.aug.cutmix, c.aug.crop, c.aug.three_augment, c.data.repeats) == (0.0, 1.0, "src", True, 1)
    ft = load_config(f"vit_{size}_in21k_ft_in1k")
    assert ft.model.drop_path == {"s": 0.05, "b": 0.15, "l": 0.4, "h": 0.45}[size]
    assert (ft.optim.name, ft.optim.lr, ft.optim.weight_decay, ft.schedule.epochs, ft.aug.img_size) == (
        "lamb",
        3e-4,
        0.02,
        50,
        224,
    )
    assert (ft.aug.mixup, ft.aug.cutmix, ft.aug.crop, ft.aug.label_smoothing, ft.data.repeats, ft.loss) == (
        0.0,
        1.0,
        "src",
        0.1,
        1,
        "ce",
    )


@pytest.mark.slow
def test_fp16_with_grad_scaler_trains(data, tmp_path):
    rows = train(
        tiny_cfg(data, **{"train.amp": "fp16", "schedule.epochs": 1}), tmp_path, torch.device("cpu"), quiet=True
    )
    assert math.isfinite(rows[0]["train_loss"])
    assert load(tmp_path / "checkpoint-last.pt")["scaler"]  # the scaler's state is saved for resume
    # A bf16 run's checkpoint (an empty scaler state) resumes where train.amp auto means fp16 (a V100): the scaler
    # starts fresh; the fp16 checkpoint's scale is kept.
    bf16 = trainer.build(tiny_cfg(data, **{"train.amp": "bf16"}), torch.device("cpu")).state_dict()
    fp16 = trainer.build(tiny_cfg(data, **{"train.amp": "fp16"}), torch.device("cpu"))
    fp16.load_state_dict(bf16)
    assert fp16.scaler.is_enabled() and fp16.scaler.get_scale() == 2.0**16
    fp16.load_state_dict(load(tmp_path / "checkpoint-last.pt"))
    assert fp16.scaler.get_scale() == load(tmp_path / "checkpoint-last.pt")["scaler"]["scale"]


def test_an_fp16_step_reads_nothing_back(data, monkeypatch):
    """train.amp fp16 (what auto gives on a V100 or T4): the trainer's step through its GradScaler (forward, backward,
    LAMB, scale update, EMA) reads no tensor back on the host. torch's fallback for an optimiser that does not
    unscale itself reads the inf flag before every step: on a GPU, a wait for the whole backward pass."""
    from .test_optim import _forbid_host_reads

    run = trainer.build(tiny_cfg(data, **{"train.amp": "fp16", "train.ema_decay": 0.9}), torch.device("cpu"))
    it = iter(run.train_loader)
    batches = [next(it) for _ in range(run.accum)]
    it.close()
    before = [p.detach().clone() for p in run.raw_model.parameters()]
    with monkeypatch.context() as m:
        _forbid_host_reads(m)
        for micro, (x, y) in enumerate(batches):
            trainer.train_micro_batch(run, x, y, step=0, last_micro=micro == run.accum - 1, accum=run.accum)
    # The step was taken (no overflow at the first scale on this model), so it went through Lamb's own unscaling.
    assert [int(g["step"]) for g in run.optimizer.param_groups] == [1, 1] and run.scaler.get_scale() == 2.0**16
    assert all(not torch.equal(a, b) for a, b in zip(before, run.raw_model.parameters()) if a.ndim > 1)


@pytest.mark.parametrize(
    "name, model, res, drop_path",
    [
        ("vit_b_in1k_ft224", "deit3_base", 224, 0.2),
        ("vit_l_in1k_ft224", "deit3_large", 224, 0.45),
        ("vit_h_in1k_ft224", "deit3_huge", 224, 0.55),
        ("vit_s_in1k_ft384", "deit3_small", 384, 0.0),
        ("vit_b_in1k_ft384", "deit3_base", 384, 0.15),
        ("vit_l_in1k_ft384", "deit3_large", 384, 0.4),
    ],
)
def test_in1k_finetuning_recipes_are_exact(name, model, res, drop_path):
    c = load_config(name)
    assert (c.model.name, c.aug.img_size, c.model.drop_path) == (model, res, drop_path)
    assert (c.optim.name, c.optim.lr, c.optim.weight_decay, c.schedule.epochs, c.schedule.warmup_epochs) == (
        "adamw",
        1e-5,
        0.1,
        20,
        5,
    )
    assert (c.loss, c.aug.label_smoothing, c.aug.auto_augment, c.data.repeats, c.train.global_batch) == (
        "ce",
        0.1,
        "rand-m9-mstd0.5-inc1",
        1,
        512,
    )
    assert not c.aug.three_augment and c.aug.color_jitter == 0.0 and c.model.checkpoint


def test_image_size_needs_one_patch_and_the_grid_is_floored(data):
    """As the official code and timm: any size of at least one patch; 30 px with patch 4 is a 7 x 7 grid."""
    from deit3_fast.config import ConfigError

    with pytest.raises(ConfigError, match="aug.img_size 3 is smaller than deit3_nano's patch size 4"):
        trainer.build(tiny_cfg(data, **{"aug.img_size": 3}), torch.device("cpu"))
    run = trainer.build(tiny_cfg(data, **{"aug.img_size": 30}), torch.device("cpu"))
    assert run.raw_model.patch_embed.grid_size == (7, 7)
    x, y = next(iter(run.train_loader))
    assert x.shape[-2:] == (30, 30)
    assert run.model(x).shape == (8, 4)


def test_amp_auto_is_bf16_where_native_else_fp16_with_a_scaler(monkeypatch):
    """V100 (sm_70) has no native bf16: auto gives fp16 + GradScaler there, bf16 on A100/H100 and on CPUs; an
    explicit bf16 on a V100 is one warning naming the fix."""
    from deit3_fast.device import resolve_amp

    cfg = load_config("vit_s_in1k")
    assert cfg.train.amp == "auto"
    assert resolve_amp(cfg.train.amp, torch.device("cpu")) == "bf16"
    for capability, name, expected in (
        ((7, 0), "Tesla V100-SXM2-32GB", "fp16"),
        ((8, 0), "NVIDIA A100", "bf16"),
        ((9, 0), "NVIDIA H100 80GB HBM3", "bf16"),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        cuda = torch.device("cuda", 0)
        assert resolve_amp(cfg.train.amp, cuda) == expected
    with pytest.warns(UserWarning, match="no native bf16.*train.amp: auto or fp16"):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
        assert resolve_amp("bf16", torch.device("cuda", 0)) == "bf16"


@pytest.mark.slow
def test_run_dir_records_what_the_run_really_uses(data, tmp_path, capsys):
    """run.json: the AMP dtype auto resolved to, the per-process batch and accumulation, the device; the console
    says the same in one line. config.yaml keeps the config as given (what a resume compares)."""
    train(tiny_cfg(data, **{"train.amp": "auto", "schedule.epochs": 1}), tmp_path, torch.device("cpu"))
    facts = json.loads((tmp_path / "run.json").read_text())
    assert (facts["amp"], facts["amp_config"], facts["per_process_batch"], facts["accumulation_steps"]) == (
        "bf16",
        "auto",
        8,
        2,
    )
    assert facts["device"].startswith("cpu") and facts["world_size"] == 1
    assert "amp auto -> bf16, global batch 16 = 8 per process x 1 x 2 accumulation" in capsys.readouterr().out
    assert load_config(str(tmp_path / "config.yaml")).train.amp == "auto"


@pytest.mark.slow
def test_peak_memory_is_reset_at_the_start_of_each_run(data, tmp_path, monkeypatch):
    """ablate runs several variants in one process: each run's max_mem_mb is its own (CUDA's counter is reset at
    its start; the reset call is what a CPU test can see)."""
    calls = []
    monkeypatch.setattr(trainer, "reset_peak_memory", lambda device: calls.append(device))
    train(tiny_cfg(data, **{"schedule.epochs": 1}), tmp_path / "a", torch.device("cpu"), quiet=True)
    train(tiny_cfg(data, **{"schedule.epochs": 1}), tmp_path / "b", torch.device("cpu"), quiet=True)
    assert calls == [torch.device("cpu")] * 2


# ---- what the training step really runs with ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded_run(data, tmp_path_factory):
    """Two epochs of the tiny run (3 steps of 2 micro-batches each) through the real `train`, recording in every
    training forward (grad enabled: evaluation's forwards are left out) whether the model is in training mode, the
    global RNG's seed and each DropPath's per-sample keep mask, and at every `optimizer.step` the learning rate the
    step is taken with. Drop-path 0.5: 4 DropPaths x 8 samples = 32 coin flips per micro-batch."""
    from timm.layers import DropPath

    cfg = tiny_cfg(data, **{"schedule.epochs": 2, "model.drop_path": 0.5})
    forwards, masks, lrs = [], [], []
    real_build = trainer.build

    def recording_build(cfg, device):
        run = real_build(cfg, device)

        def before_forward(module, args):
            if torch.is_grad_enabled():
                forwards.append((module.training, torch.initial_seed()))
                masks.append([])

        def after_drop_path(module, args, out):
            if torch.is_grad_enabled():
                masks[-1].append((out.flatten(1).abs().sum(1) != 0).tolist())

        run.raw_model.register_forward_pre_hook(before_forward)
        for m in run.raw_model.modules():
            if isinstance(m, DropPath):
                m.register_forward_hook(after_drop_path)
        run.optimizer.register_step_pre_hook(lambda opt, a, kw: lrs.append([g["lr"] for g in opt.param_groups]))
        return run

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "build", recording_build)
        train(cfg, tmp_path_factory.mktemp("recorded"), torch.device("cpu"), quiet=True)
    return cfg, forwards, masks, lrs


def test_every_training_forward_runs_in_training_mode(recorded_run):
    """Stochastic depth is on only in training mode: every training forward, also those after an evaluation (which
    puts the model in eval mode), runs with model.train()."""
    _, forwards, _, _ = recorded_run
    assert len(forwards) == 2 * 6
    assert all(training for training, _ in forwards), forwards


def test_drop_path_is_seeded_per_micro_batch_with_its_key(recorded_run):
    """Each micro-batch's drop-path draws come from the global RNG seeded with its own key (seed, rank, epoch,
    micro-batch): the seeds are those keys, and the masks differ between micro-batches and between epochs."""
    import numpy as np

    from pipelines import keys

    cfg, forwards, masks, _ = recorded_run
    expected = [
        keys.seed_of(keys.combine(keys.epoch_key(cfg.train.seed, 0, epoch), np.uint64(micro)))
        for epoch in range(2)
        for micro in range(6)
    ]
    assert [seed for _, seed in forwards] == expected
    assert all(len(m) == 4 for m in masks)  # deit3_nano: 2 blocks x 2 DropPaths
    flat = [tuple(b for mask in m for b in mask) for m in masks]
    assert len(set(flat)) == len(flat), "two micro-batches drew the same drop-path masks"
    kept = sum(map(sum, flat)) / (len(flat) * len(flat[0]))
    assert 0.25 < kept < 0.75, kept  # drop-path 0.5 really drops


def test_each_step_uses_its_own_scheduled_learning_rate(recorded_run):
    """The lr `optimizer.step` uses at step k is the schedule's value at step k: the first step takes the warm-up's
    start (schedule.warmup_lr), not the next step's value; every param group the same (no lr_scale here)."""
    from deit3_fast.schedule import lr_at

    cfg, _, _, lrs = recorded_run
    s = cfg.schedule
    assert len(lrs) == 2 * 3
    assert lrs[0] == [s.warmup_lr] * len(lrs[0])
    for k, used in enumerate(lrs):
        want = lr_at(
            k / 3,
            lr=cfg.optim.lr,
            epochs=s.epochs,
            warmup_epochs=s.warmup_epochs,
            warmup_lr=s.warmup_lr,
            min_lr=s.min_lr,
        )
        assert used == pytest.approx([want] * len(used), rel=1e-12), k


def test_the_ema_moves_by_the_configured_decay(data):
    """One real optimiser step of the built run: the EMA (a copy of the model at build) moves by (1 - decay) of the
    way towards the stepped weights, with train.ema_decay's decay (not timm's default 0.9999)."""
    run = trainer.build(tiny_cfg(data, **{"train.ema_decay": 0.7}), torch.device("cpu"))
    before = {k: v.clone() for k, v in run.raw_model.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in run.ema.module.state_dict().items())
    x, y = next(iter(run.train_loader))
    trainer.train_micro_batch(run, x, y, step=10, last_micro=True, accum=1)
    after, ema = run.raw_model.state_dict(), run.ema.module.state_dict()
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert moved
    for k in moved:
        assert torch.allclose(ema[k], before[k] + 0.3 * (after[k] - before[k]), atol=1e-7), k


def test_epochs_count_from_1_where_a_user_reads_them_and_curves_follow_every_epoch(data, tmp_path, capsys, monkeypatch):
    """One convention: the console's epoch lines and the progress bar say `epoch 1/2`, `epoch 2/2` (the SIGTERM and
    divergence messages too: their tests); metrics.jsonl's `epoch` is the 0-based index. curves.png is redrawn after
    every epoch (a stopped or long run has it), each time from the whole metrics.jsonl."""
    from rich.progress import Progress

    tasks, plotted = [], []
    real_add, real_plot = Progress.add_task, trainer.rundir.plot_curves
    monkeypatch.setattr(Progress, "add_task", lambda self, name, **kw: tasks.append(name) or real_add(self, name, **kw))

    def plot(runs, png, **kw):
        plotted.append([r["epoch"] for rows in runs.values() for r in rows])
        return real_plot(runs, png, **kw)

    monkeypatch.setattr(trainer.rundir, "plot_curves", plot)
    train(tiny_cfg(data, **{"schedule.epochs": 2}), tmp_path, torch.device("cpu"))
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")] == ["1/2", "2/2"]
    assert [t for t in tasks if t.startswith("epoch")] == ["epoch 1/2", "epoch 2/2"]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert plotted == [[0], [0, 1]] and (tmp_path / "curves.png").exists()


def test_curves_draw_top1_and_top5_in_different_colours(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from deit3_fast import rundir

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    rows = [
        {"epoch": e, "train_loss": 1.0 / (e + 1), "lr": 1e-3, "val_acc1": 10.0 * e, "val_acc5": 20.0 * e}
        for e in range(3)
    ]
    assert rundir.plot_curves({"run": rows}, tmp_path / "curves.png")
    colours = {line.get_label(): line.get_color() for line in figures[0].axes[0].get_lines()}
    assert colours["top-1"] != colours["top-5"], colours
    # Redrawn after every epoch: a write cut short (killed, disk full) leaves the previous plot, not half a file.
    from matplotlib.figure import Figure

    def cut_short(self, f, **kw):
        f = f if hasattr(f, "write") else open(f, "wb")
        f.write(b"half a png")
        raise OSError("no space left on device")

    before = (tmp_path / "curves.png").read_bytes()
    monkeypatch.setattr(Figure, "savefig", cut_short)
    with pytest.raises(OSError):
        rundir.plot_curves({"run": rows}, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_a_head_far_wider_than_the_data_and_a_warmup_past_the_end_are_warned(data, tmp_path, capsys):
    """10 outputs on 4-class data (`val 0.00/...` over classes that never occur) and a warm-up as long as the run (the
    lr never reaches optim.lr): one `warning:` line each on stderr, naming the fix, also with --quiet."""
    from deit3_fast.config import config_warnings

    assert config_warnings(tiny_cfg(data)) == []  # 4 outputs on 4 classes, warm-up 1 of 3 epochs
    cfg = tiny_cfg(data, **{"model.num_classes": 10, "schedule.epochs": 1, "schedule.warmup_epochs": 1})
    train(cfg, tmp_path, torch.device("cpu"), quiet=True)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, warnings
    assert "schedule.warmup_epochs 1 >= schedule.epochs 1" in warnings[0] and "ablate scales it" in warnings[0]
    assert "model.num_classes 10, but" in warnings[1] and "4 classes" in warnings[1]
    assert "model.num_classes: auto" in warnings[1]


def _tiny_cli_train(data, out, *extra):
    """`deit3-fast train` of deit3_nano at 16 px on the tiny set, 1 epoch unless --epochs says otherwise."""
    return [
        "train",
        "--cfg",
        "quickstart",
        "--data-train",
        str(data / "train.beton"),
        "--data-val",
        str(data / "val.beton"),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
        *[
            x
            for s in ("model.num_classes=4", "aug.img_size=16", "data.workers=1", "data.batch_size=16")
            for x in ("--set", s)
        ],
        *[x for s in ("train.global_batch=16", "schedule.warmup_epochs=0") for x in ("--set", s)],
        *extra,
    ]


@pytest.mark.slow
def test_a_run_dir_is_never_trained_over_and_a_resume_says_what_it_does(data, tmp_path, capsys):
    """Training into a run dir that holds a run is refused (one line, nothing touched); --resume auto on the
    finished run says so (and reports its numbers, not epochs_run 0 and val_acc1 null); extending it with --epochs
    says where it continues."""
    from deit3_fast.cli import main

    run = tmp_path / "run"
    assert main(_tiny_cli_train(data, run, "--epochs", "1")) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(_tiny_cli_train(data, run, "--epochs", "1", "--set", "optim.lr=1e-2")) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"deit3-fast: error: {run} holds a run (1 epochs in metrics.jsonl): continue it with --resume auto, or "
        "train into a new --out"
    ]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files
    assert main(_tiny_cli_train(data, run, "--epochs", "1", "--resume", "auto")) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith(f"{run} is finished: 1/1 epochs (checkpoint-last.pt); nothing to train")
    summary = json.loads(out[-1])
    assert summary["finished"] is True and summary["val_acc1"] == first["val_acc1"] is not None
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files
    assert main(_tiny_cli_train(data, run, "--epochs", "2", "--resume", "auto")) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == f"resuming {run} from epoch 2/2, step 0/3 (checkpoint-last.pt)"
    assert json.loads(out[-1])["epochs_run"] == 1 and len(rundir.read_metrics(run)) == 2


@pytest.mark.slow
def test_a_run_records_absolute_paths_and_evaluates_from_anywhere_with_its_own_config(
    data, tmp_path, monkeypatch, capsys
):
    """Data given relative to where training started: config.yaml holds them absolute (and as given, in a comment),
    and `eval RUN_DIR` from another directory scores the run's best checkpoint on its validation set with the
    config the checkpoint carries, no --cfg; --save-predictions rows carry class names and probabilities."""
    from deit3_fast.cli import main

    run = tmp_path / "run"
    monkeypatch.chdir(data)
    args = _tiny_cli_train(data, run, "--epochs", "1")
    args[args.index(str(data / "train.beton"))] = "train.beton"
    args[args.index(str(data / "val.beton"))] = "val.beton"
    assert main(args) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    text = (run / "config.yaml").read_text()
    assert f"As given, relative to {data} (where training started):\n#   data.train: train.beton\n" in text
    assert load_config(str(run / "config.yaml")).data.val == str(data / "val.beton")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "run", "--device", "cpu", "--set", "data.workers=1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 16 and result["acc1"] == pytest.approx(trained["val_acc1"])
    assert main(["eval", "--checkpoint", "run/checkpoint-best.pt", "--save-predictions", "p.jsonl"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    classes = json.loads((data / "val.beton.json").read_text())["classes"]
    assert len(rows) == 16 and len(classes) == 4
    for r in rows:
        assert r["label_name"] == classes[r["label"]] and r["top5_names"] == [classes[c] for c in r["top5"]]
        assert r["top5_prob"] == sorted(r["top5_prob"], reverse=True) and sum(r["top5_prob"]) == pytest.approx(1, 1e-4)


@pytest.mark.slow
def test_a_second_quickstart_finds_its_run_finished(tmp_path, capsys):
    """`make quickstart` twice: the second one works (it continues its run dir, here finished) and trains nothing."""
    from deit3_fast.cli import main

    args = ["quickstart", "--out", str(tmp_path), "--classes", "2", "--train-per-class", "16", "--val-per-class", "2"]
    args += ["--workers", "1", "--epochs", "1"]
    assert main(args) == 0
    rows = rundir.read_metrics(tmp_path / "run")
    capsys.readouterr()
    assert main(args) == 0
    assert f"{tmp_path / 'run'} is finished: 1/1 epochs" in capsys.readouterr().out
    assert rundir.read_metrics(tmp_path / "run") == rows

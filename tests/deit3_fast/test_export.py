"""`deit3-fast export`: what it writes loads in timm with pretrained=True and gives the same logits."""

import json
import os
import subprocess
import sys

import pytest
import torch

from deit3_fast.models import create_model, load_checkpoint

from ..conftest import REPO
from .test_models import _official_checkpoint


def _timm_logits(out, num_classes, x):
    import timm

    cfg = json.loads((out / "config.json").read_text())
    overlay = {"file": str(out / "model.safetensors")}
    if num_classes != 1000:
        overlay["num_classes"] = num_classes
    m = timm.create_model(
        cfg["architecture"],
        pretrained=True,
        num_classes=num_classes,
        pretrained_cfg_overlay=overlay,
        **cfg["model_args"],
    ).eval()
    with torch.no_grad():
        return m(x)


def _export(*args):
    return subprocess.run(
        [sys.executable, "-m", "deit3_fast", "export", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_an_official_checkpoint_exports_to_timm_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    src = create_model("deit3_small", num_classes=1000, img_size=224).eval()
    for b in src.blocks:  # LayerScale away from its init, so a lost gamma shows
        b.ls1.gamma.data.uniform_(0.5, 1.5)
    _official_checkpoint(src, tmp_path / "official.pth")
    r = _export(tmp_path / "official.pth", tmp_path / "out")  # the model name comes from the official args
    assert r.returncode == 0, r.stderr[-2000:]
    said = json.loads(r.stdout)
    assert said["architecture"] == "deit3_small_patch16_224" and "pretrained=True" in said["load_with"]
    x = torch.randn(2, 3, 224, 224)
    ours = create_model("deit3_small", num_classes=1000, img_size=224).eval()
    load_checkpoint(ours, str(tmp_path / "official.pth"))
    with torch.no_grad():
        expected = ours(x)
    torch.testing.assert_close(_timm_logits(tmp_path / "out", 1000, x), expected, rtol=1e-5, atol=1e-5)


def test_a_run_checkpoint_and_its_ema_export_with_their_class_count(tmp_path):
    from deit3_fast import checkpoint as ckpt
    from deit3_fast.config import load_config, to_dict

    torch.manual_seed(1)
    model = create_model("deit3_small", num_classes=10, img_size=224).eval()
    ema = create_model("deit3_small", num_classes=10, img_size=224).eval()
    cfg = load_config("vit_s_in1k", ["model.num_classes=10"])
    state = {"model": model.state_dict(), "optimizer": {}, "scaler": {}, "ema": ema.state_dict()}
    ckpt.save_run(tmp_path / "checkpoint-last.pt", state, ckpt.Position(3, 50.0), to_dict(cfg))
    x = torch.randn(2, 3, 224, 224)
    for flag, net in (([], model), (["--ema"], ema)):
        out = tmp_path / ("ema" if flag else "model")
        r = _export(tmp_path / "checkpoint-last.pt", out, *flag)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads((out / "config.json").read_text())["num_classes"] == 10
        with torch.no_grad():
            expected = net(x)
        torch.testing.assert_close(_timm_logits(out, 10, x), expected, rtol=1e-5, atol=1e-5)


def test_export_errors_are_one_line(tmp_path):
    src = create_model("deit3_micro", num_classes=10, img_size=64)
    torch.save({"model": src.state_dict()}, tmp_path / "bare.pt")
    r = _export(tmp_path / "bare.pt", tmp_path / "o")
    assert r.returncode == 2 and "give --model" in r.stderr and r.stderr.count("\n") == 1
    r = _export(tmp_path / "bare.pt", tmp_path / "o", "--ema")
    assert r.returncode == 2 and "has no EMA weights" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("earlier", [True, False], ids=["over-an-export", "into-an-empty-folder"])
@pytest.mark.parametrize("failing", ["model.safetensors", "config.json"])
def test_a_failed_export_replaces_nothing(tmp_path, monkeypatch, failing, earlier):
    """A full disk at either file leaves an earlier export byte for byte (never new weights beside a config.json
    that describes other ones), or an empty folder; the error is a CheckpointError that the CLI prints as one line."""
    from dataset_tools import atomic
    from deit3_fast.checkpoint import CheckpointError
    from deit3_fast.export import export

    for seed in (0, 1):  # two checkpoints with different weights and class counts
        torch.manual_seed(seed)
        _official_checkpoint(create_model("deit3_small", num_classes=10 + seed, img_size=224), tmp_path / f"{seed}.pth")
    out = tmp_path / "out"
    if earlier:
        export(str(tmp_path / "0.pth"), out)
    else:
        out.mkdir()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_prepare = atomic.AtomicOutput.prepare

    def prepare(self):
        if os.path.basename(self.final) == failing:
            raise OSError(28, "No space left on device")
        real_prepare(self)

    monkeypatch.setattr(atomic.AtomicOutput, "prepare", prepare)
    with pytest.raises(
        CheckpointError,
        match=f"writing the export into {out} failed: No space left on device; no file there was replaced",
    ):
        export(str(tmp_path / "1.pth"), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    if failing == "config.json" and earlier:  # failing between the two renames: the message says what happened
        real_commit = atomic.AtomicOutput.commit
        monkeypatch.setattr(atomic.AtomicOutput, "prepare", real_prepare)
        monkeypatch.setattr(atomic.AtomicOutput, "commit", lambda self: (prepare(self), real_commit(self)))
        with pytest.raises(CheckpointError, match="; model.safetensors was replaced, config.json was not"):
            export(str(tmp_path / "1.pth"), out)


@pytest.mark.parametrize("layer_scale", [1e-4, None], ids=["layerscale", "no-layerscale"])
def test_any_trained_model_exports_and_loads_as_printed_with_the_runs_data_config(
    tmp_path, monkeypatch, capsys, layer_scale
):
    """A run of deit3_nano (a shape timm has no name for) at 16 px with crop ratio 0.875, also without LayerScale:
    export prints a call with absolute paths that, run from another directory, gives the same logits and a model
    whose data config (timm.data.resolve_model_data_config) is the run's, under our own tag."""
    import timm
    import timm.data

    from deit3_fast import checkpoint as ckpt
    from deit3_fast.cli import main
    from deit3_fast.config import load_config, to_dict

    torch.manual_seed(2)
    net = create_model("deit3_nano", num_classes=7, img_size=16, layer_scale_init=layer_scale).eval()
    cfg = load_config(
        "quickstart",
        [
            "model.num_classes=7",
            "aug.img_size=16",
            "aug.eval_crop_ratio=0.875",
            f"model.layer_scale_init={layer_scale or 'null'}",
        ],
    )
    state = {"model": net.state_dict(), "optimizer": {}, "scaler": {}, "ema": None}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ckpt.save_run(tmp_path / "a" / "checkpoint-best.pt", state, ckpt.Position(0, 1.0), to_dict(cfg))
    monkeypatch.chdir(tmp_path / "a")
    assert main(["export", "checkpoint-best.pt", "exported"]) == 0
    said = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    monkeypatch.chdir(tmp_path / "b")  # the printed call works from anywhere
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = net(x)
    models = [eval(said["load_with"], {"timm": timm})]
    if "local-dir" in getattr(timm.models._factory, "_MODEL_SOURCES", ()):  # the folder alone, where timm can
        models.append(timm.create_model(f"local-dir:{said['out']}", pretrained=True))
    for m in models:
        with torch.no_grad():
            torch.testing.assert_close(m.eval()(x), expected, rtol=1e-5, atol=1e-5)
        data = timm.data.resolve_model_data_config(m)
        assert data["input_size"] == (3, 16, 16) and data["crop_pct"] == 0.875
        assert data["interpolation"] == "bicubic" and tuple(data["mean"]) == (0.485, 0.456, 0.406)
        assert tuple(data["std"]) == (0.229, 0.224, 0.225) and m.pretrained_cfg["tag"] == "deit3_fast"

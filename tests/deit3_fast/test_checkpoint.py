"""Checkpoints: one module reads and writes them. Every kind of file loads through its one entry point, ours carries
a format version (and ours from before the version existed still load), a version this build cannot read is one
clear error, and no other module of deit3_fast knows the payload's keys."""

import argparse
import ast
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deit3_fast import checkpoint as ckpt
from deit3_fast.checkpoint import CheckpointError

from ..conftest import REPO

CONFIG = {"model": {"name": "deit3_small_patch16_224"}, "aug": {"img_size": 192}}


def _state(seed: int = 0) -> dict:
    """A run state with a few tensors (no model to build: checkpoint.py does not look inside state dicts)."""
    g = torch.Generator().manual_seed(seed)
    weights = {"pos_embed": torch.randn(1, 4, 8, generator=g), "head.weight": torch.randn(3, 8, generator=g)}
    ema = {k: v + 1 for k, v in weights.items()}
    return ckpt.RunState(weights, {"state": {}, "param_groups": [{"lr": 0.1}]}, {"scale": 2.0}, ema).to_dict()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _old_payload(state: dict, position: ckpt.Position, config: dict) -> dict:
    """A payload as deit3-fast wrote it before the format version existed (runs in flight have these)."""
    return {
        **state,
        "epoch": position.epoch,
        "best_acc1": position.best,
        "resume_at": position.resume_at,
        "config": config,
    }


def test_a_run_checkpoint_round_trips_with_its_format_version(tmp_path):
    state, pos = _state(), ckpt.Position(4, 61.5, {"step": 3, "loss_sum": 1.5, "images": 96, "seconds": 2.0})
    ckpt.save_run(tmp_path / "c.pt", state, pos, CONFIG)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert (raw["format"], raw["version"]) == ("deit3-fast-checkpoint", ckpt.VERSION) and ckpt.VERSION in ckpt.READS
    run = ckpt.load_run(tmp_path / "c.pt")
    assert (run.path, run.position, run.config, run.version) == (tmp_path / "c.pt", pos, CONFIG, 1)
    assert run.state.keys() == state.keys() and _same(run.state["model"], state["model"])
    assert _same(run.state["ema"], state["ema"]) and run.state["scaler"] == {"scale": 2.0}
    assert run.state["optimizer"] == state["optimizer"]
    assert not list(tmp_path.glob(".*partial*"))  # written through the atomic writer: no temporary left


def test_a_checkpoint_written_before_the_version_existed_loads_as_version_1(tmp_path):
    state, pos = _state(), ckpt.Position(2, 40.0, None)
    torch.save(_old_payload(state, pos, CONFIG), tmp_path / "old.pt")
    run = ckpt.load_run(tmp_path / "old.pt")
    assert (run.version, run.position, run.config) == (1, pos, CONFIG)
    assert _same(run.state["model"], state["model"]) and _same(run.state["ema"], state["ema"])
    # Older still: no resume_at and no ema key (both came later).
    older = {k: v for k, v in _old_payload(state, pos, CONFIG).items() if k not in ("resume_at", "ema")}
    torch.save(older, tmp_path / "older.pt")
    run = ckpt.load_run(tmp_path / "older.pt")
    assert run.position == ckpt.Position(2, 40.0, None) and run.state["ema"] is None
    assert _same(ckpt.load_weights(tmp_path / "older.pt"), state["model"])


def test_every_kind_of_weights_file_loads_through_one_entry_point(tmp_path):
    state = _state()
    weights = state["model"]
    ckpt.save_run(tmp_path / "ours.pt", state, ckpt.Position(0, 1.0), CONFIG)
    torch.save(
        {
            "model": weights,
            "args": argparse.Namespace(model="deit_small_patch16_LS", input_size=224),
            "epoch": 799,
            "optimizer": {},
            "scaler": {},
        },
        tmp_path / "official.pth",
    )
    # timm's train.py: "state_dict" (DDP-prefixed here) and a "version" key of its own, which is not ours.
    torch.save(
        {
            "state_dict": {f"module.{k}": v for k, v in weights.items()},
            "version": 2,
            "arch": "x",
            "epoch": 3,
            "optimizer": {},
        },
        tmp_path / "timm.pth.tar",
    )
    torch.save({f"_orig_mod.{k}": v for k, v in weights.items()}, tmp_path / "bare.pt")
    save_file(weights, str(tmp_path / "model.safetensors"))
    read = {p.name: ckpt.read_weights(p) for p in sorted(tmp_path.iterdir())}
    assert set(read) == {"ours.pt", "official.pth", "timm.pth.tar", "bare.pt", "model.safetensors"}
    for name, w in read.items():
        assert _same(w.state, weights), name
    assert (read["ours.pt"].model, read["ours.pt"].img_size) == ("deit3_small_patch16_224", 192)
    assert (read["official.pth"].model, read["official.pth"].img_size) == ("deit_small_patch16_LS", 224)
    assert all(
        (read[n].model, read[n].img_size) == (None, None) for n in ("timm.pth.tar", "bare.pt", "model.safetensors")
    )
    assert _same(ckpt.load_weights(tmp_path / "ours.pt", ema=True), state["ema"])
    assert _same(ckpt.load_weights(tmp_path / "model.safetensors"), weights)


def test_files_that_are_not_what_is_asked_are_clear_errors(tmp_path):
    state = _state()
    torch.save({"model": state["model"]}, tmp_path / "bare.pt")
    with pytest.raises(
        CheckpointError, match="bare.pt is not a checkpoint of a deit3-fast run .* use --set model.checkpoint="
    ):
        ckpt.load_run(tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=r"has no EMA weights \(only a run's checkpoint"):
        ckpt.load_weights(tmp_path / "bare.pt", ema=True)
    ckpt.save_run(tmp_path / "no_ema.pt", {**state, "ema": None}, ckpt.Position(), CONFIG)
    with pytest.raises(CheckpointError, match=r"has no EMA weights \(train.ema_decay was off\)"):
        ckpt.load_weights(tmp_path / "no_ema.pt", ema=True)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "no_ema.pt").read_bytes()[:100])
    (tmp_path / "x.safetensors").write_bytes((100).to_bytes(8, "little") + b'{"a": 1')  # header cut short
    for name in ("cut.safetensors", "x.safetensors"):
        with pytest.raises(CheckpointError, match=f"{name} cannot be read"):
            ckpt.load_weights(tmp_path / name)
        with pytest.raises(CheckpointError, match=f"{name} is not a readable checkpoint"):
            ckpt.load_run(tmp_path / name)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds no model state dict"):
        ckpt.load_weights(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a checkpoint"):
        ckpt.load_run(tmp_path / "list.pt")


NEWER = "a newer deit3-fast wrote it: upgrade deit3-fast (pip install -U deit3-fast) to read it"
NONE_WROTE = (
    "no deit3-fast writes that version: the file was changed by another tool or is damaged; use a "
    "checkpoint written by deit3-fast"
)


@pytest.mark.parametrize("version, fix", [(2, NEWER), (0, NONE_WROTE), (None, NONE_WROTE)])
def test_a_version_this_build_does_not_read_is_one_clear_error(tmp_path, capsys, version, fix):
    """Written by a newer deit3-fast (or a version none wrote): every reader refuses it with the file, its version,
    the versions this build reads and the fix; the CLI prints it as one line, exit 2."""
    from deit3_fast import __version__, cli

    path = tmp_path / "checkpoint-last.pt"
    ckpt.save_run(path, _state(), ckpt.Position(1, 5.0), CONFIG)
    payload = torch.load(path, weights_only=True)
    if version is None:
        del payload["version"]
    else:
        payload["version"] = version
    torch.save(payload, path)
    message = (
        f"{path} is a deit3-fast checkpoint of format version {version!r}, and deit3-fast {__version__} "
        f"reads version 1; {fix}"
    )
    for read in (ckpt.load_run, ckpt.load_weights, ckpt.load, lambda p: ckpt.load_weights(p, ema=True)):
        with pytest.raises(CheckpointError) as e:
            read(path)
        assert str(e.value) == message
    assert cli.main(["export", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


# The payload's keys that no module but checkpoint.py may name ("model", "epoch" and "config" are also other things'
# keys: a metrics row's epoch, a config's model section), and the calls that read or write a checkpoint file.
_PAYLOAD_KEYS = {"best_acc1", "resume_at", "optimizer", "scaler", "ema", ckpt.FORMAT}
_FILE_CALLS = {("torch", "load"), ("torch", "save"), ("safetensors.torch", "load_file"), ("safetensors", "safe_open")}


def _keys(*nodes: ast.AST) -> list[str]:
    return [n.value for n in nodes if isinstance(n, ast.Constant) and n.value in _PAYLOAD_KEYS]


def _format_knowledge(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        hits = []
        if isinstance(node, ast.Subscript):  # payload["best_acc1"]
            hits = _keys(node.slice)
        elif isinstance(node, ast.Dict):  # {"optimizer": ...}
            hits = _keys(*[k for k in node.keys if k is not None])
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            hits = _keys(node.left)  # "ema" in payload
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("get", "pop", "setdefault") and node.args:  # payload.get("resume_at")
                hits = _keys(node.args[0])
            if isinstance(node.func.value, ast.Name) and (node.func.value.id, node.func.attr) in _FILE_CALLS:
                hits = [f"{node.func.value.id}.{node.func.attr}()"]
        elif isinstance(node, ast.ImportFrom) and node.module:
            hits = [f"from {node.module} import {a.name}" for a in node.names if (node.module, a.name) in _FILE_CALLS]
        found += [(node.lineno, h) for h in hits]
    return [f"line {n}: {h}" for n, h in sorted(found)]


def _offenders(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hits
        for p in sorted((root / "deit3_fast").rglob("*.py"))
        if p.name != "checkpoint.py" or p.parent != root / "deit3_fast"
        if (hits := _format_knowledge(ast.parse(p.read_text(), str(p))))
    }


def test_no_module_but_checkpoint_py_knows_the_payload():
    """The payload's keys and the reading and writing of checkpoint files are checkpoint.py's alone: any other
    module of deit3_fast that names a payload key or calls torch.load / torch.save asks checkpoint.py instead."""
    assert _offenders(REPO) == {}


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The scan above, on code as it was before checkpoint.py owned the format: it names each place."""
    (tmp_path / "deit3_fast").mkdir()
    (tmp_path / "deit3_fast" / "old.py").write_text(
        "import torch\n"
        "def f(path, run):\n"
        "    payload = torch.load(path)\n"
        '    best = payload["best_acc1"]\n'
        '    at = payload.get("resume_at")\n'
        '    if "ema" in payload:\n'
        "        pass\n"
        '    return {"optimizer": run.optimizer.state_dict(), "model": 1, "epoch": 2}\n'
    )
    assert _offenders(tmp_path) == {
        "deit3_fast/old.py": [
            "line 3: torch.load()",
            "line 4: best_acc1",
            "line 5: resume_at",
            "line 6: ema",
            "line 8: optimizer",
        ]
    }

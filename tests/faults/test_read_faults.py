"""Faults in the data a run reads: truncated .beton files, corrupted headers and allocation tables, random bytes named
.beton, a folder named .beton, and a validation split whose classes differ from the training split's. Each is one
line `deit3-fast: error: ...`, exit 2, before training starts: no checkpoint or metrics are written.

Covered elsewhere with the same real files (not repeated here):
  tests/dataset_tools/test_beton.py::test_broken_files_are_one_clear_error
      the reader (`Beton`) on each broken layout
  tests/dataset_tools/test_beton.py::test_inspect_broken_files_exit_2_without_traceback,
  tests/dataset_tools/test_beton.py::test_inspect_catches_corrupt_image_data
      `deit3-convert --inspect` on them
  tests/pipelines/test_loader.py::test_bad_data_is_one_clear_error
      labels beyond model.num_classes, missing file
"""

import json
import subprocess

import numpy as np
import pytest

from dataset_tools.beton import Beton
from dataset_tools.convert import convert
from dataset_tools.synthetic import make_imagefolder
from deit3_fast import cli

from ..conftest import REPO
from .conftest import TRAIN


def tiny_args(train, val, out, *extra) -> list[str]:
    sets = {
        "model.num_classes": 4,
        "data.batch_size": 8,
        "train.global_batch": 16,
        "schedule.epochs": 1,
        "schedule.warmup_epochs": 0,
        "data.workers": 1,
    }
    return [
        "train",
        "--cfg",
        "quickstart",
        "--data-train",
        str(train),
        "--data-val",
        str(val),
        "--out",
        str(out),
        "--quiet",
        *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
        *extra,
    ]


def _nothing_trained(run) -> None:
    left = sorted(p.name for p in run.iterdir()) if run.exists() else []
    assert not [n for n in left if n.startswith("checkpoint") or n == "metrics.jsonl" or ".partial-" in n], left


def _broken(src, folder) -> dict:
    """Real broken files made from a good .beton: cut short, header fields overwritten, allocation table damaged."""
    data = src.read_bytes()
    b = Beton(src)
    table_at, n = b.alloc_table_ptr, len(b)
    del b
    entry = bytearray(data)
    entry[table_at + 8 : table_at + 16] = (len(data) + 2**20).to_bytes(8, "little")  # first image's pointer
    sizes = bytearray(data)
    sizes[table_at + 16 : table_at + 24] = (2**63).to_bytes(8, "little")  # first image's size
    cases = {
        "zero_bytes": b"",
        "truncated_half": data[: len(data) // 2],
        "truncated_table": data[:-8],  # allocation table cut mid-entry
        "truncated_last_entry": data[:-24],  # one allocation entry missing
        "header_version": (3).to_bytes(2, "little") + data[2:],
        "header_num_fields": data[:2] + (0).to_bytes(2, "little") + data[4:],
        "header_page_size": data[:4] + (12345).to_bytes(4, "little") + data[8:],
        "header_num_samples": data[:8] + (n * 1000).to_bytes(8, "little") + data[16:],
        "header_table_ptr": data[:16] + (len(data) + 24).to_bytes(8, "little") + data[24:],
        "field_type": data[:24] + b"\x63" + data[25:],
        "table_entry_ptr": bytes(entry),
        "table_entry_size": bytes(sizes),
        "random": np.random.default_rng(1).integers(0, 256, 1 << 16, dtype=np.uint8).tobytes(),
        "text": b"not a beton\n" * 1000,
    }
    paths = {}
    for name, payload in cases.items():
        paths[name] = folder / f"{name}.beton"
        paths[name].write_bytes(payload)
    paths["folder"] = folder / "folder.beton"
    paths["folder"].mkdir()
    return paths


@pytest.fixture(scope="module")
def broken(data, tmp_path_factory):
    return _broken(data / "train.beton", tmp_path_factory.mktemp("broken"))


CASES = [
    "zero_bytes",
    "truncated_half",
    "truncated_table",
    "truncated_last_entry",
    "header_version",
    "header_num_fields",
    "header_page_size",
    "header_num_samples",
    "header_table_ptr",
    "field_type",
    "table_entry_ptr",
    "table_entry_size",
    "random",
    "text",
    "folder",
]


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("case", CASES)
def test_broken_beton_stops_before_training(data, broken, tmp_path, capsys, case, split):
    bad = broken[case]
    train, val = (bad, data / "val.beton") if split == "train" else (data / "train.beton", bad)
    assert cli.main(tiny_args(train, val, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"deit3-fast: error: {bad}: "), err
    assert "not a valid .beton" in err or "cannot open" in err or "not a .beton or a shard set" in err
    _nothing_trained(tmp_path / "run")


def test_broken_beton_through_the_command_line(data, broken, tmp_path):
    """The same as a user sees it: a fresh process, no traceback, exit 2."""
    r = subprocess.run(
        [*TRAIN, *tiny_args(broken["truncated_half"], data / "val.beton", tmp_path / "run")[1:]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"deit3-fast: error: {broken['truncated_half']}: "), r.stderr
    assert "not a valid .beton" in r.stderr and "Traceback" not in r.stderr
    _nothing_trained(tmp_path / "run")


@pytest.fixture(scope="module")
def val_other_classes(data, tmp_path_factory):
    """A val split converted on its own from a folder that lacks class_01: its labels 0..2 mean class_00, class_02,
    class_03 — in range for the model, but not the training split's classes. And the same folder converted the right
    way (`--classes train.beton.json`)."""
    root = tmp_path_factory.mktemp("val_other")
    make_imagefolder(root / "src", num_classes=4, per_class=4, seed=1, min_side=32, max_side=64)
    for f in (root / "src" / "class_01").iterdir():
        f.unlink()
    (root / "src" / "class_01").rmdir()
    convert(str(root / "src"), str(root / "own.beton"), workers=1, show_progress=False)
    convert(
        str(root / "src"),
        str(root / "aligned.beton"),
        classes_file=str(data / "train.beton.json"),
        workers=1,
        show_progress=False,
    )
    return root


@pytest.mark.slow
def test_val_split_with_other_classes_is_refused(data, val_other_classes, tmp_path, capsys):
    own = val_other_classes / "own.beton"
    assert (
        json.loads((val_other_classes / "own.beton.json").read_text())["classes"]
        != json.loads((data / "train.beton.json").read_text())["classes"]
    )
    assert cli.main(tiny_args(data / "train.beton", own, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deit3-fast: error: "), err
    assert str(own) in err and "class" in err, err
    _nothing_trained(tmp_path / "run")
    # Converted with the training split's class list, the same images train and evaluate.
    assert cli.main(tiny_args(data / "train.beton", val_other_classes / "aligned.beton", tmp_path / "ok")) == 0
    assert (tmp_path / "ok" / "checkpoint-last.pt").exists()

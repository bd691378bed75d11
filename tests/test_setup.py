"""The README's promises about set-up: the bootstrap is idempotent, the console scripts exist, the quickstart runs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from dataset_tools.beton import Beton

from .conftest import REPO


def test_bootstrap_second_run_skips_everything():
    """`make test` already ran the bootstrap once; a second run must find everything and install nothing."""
    venv = Path(sys.prefix)
    if not (venv / ".deit3-installed-all").exists():
        import pytest

        pytest.skip("tests are not running inside the bootstrap's virtual environment")
    r = subprocess.run(
        ["bash", "scripts/bootstrap.sh"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "VENV": str(venv)},
    )
    assert r.returncode == 0, r.stderr
    assert "system packages: present" in r.stdout
    assert "exists" in r.stdout and "up to date" in r.stdout
    assert "installing" not in r.stdout


def test_console_scripts_are_installed():
    bindir = Path(sys.executable).parent
    for script in ("deit3-convert", "deit3-fast"):
        path = shutil.which(script, path=str(bindir)) or shutil.which(script)
        assert path, f"{script} not on PATH"
        r = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage:" in r.stdout


def test_quickstart_converts_trains_and_evaluates(tmp_path):
    args = [
        sys.executable,
        "-m",
        "deit3_fast",
        "quickstart",
        "--out",
        str(tmp_path),
        "--train-per-class",
        "12",
        "--val-per-class",
        "4",
        "--epochs",
        "2",
    ]
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "quickstart done" in r.stdout and "val top-1" in r.stdout
    assert len(Beton(tmp_path / "train.beton")) == 120 and len(Beton(tmp_path / "val.beton")) == 40
    run = tmp_path / "run"
    assert (run / "checkpoint-best.pt").exists() and (run / "curves.png").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    # Idempotent: a second run reuses the generated images and starts the training afresh.
    r2 = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0 and "generating" not in r2.stdout
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

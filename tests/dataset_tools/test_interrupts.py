"""Ctrl-C, SIGTERM and SIGKILL in the middle of a conversion leave no output and no temporary file."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from PIL import Image

from dataset_tools.atomic import AtomicOutput

from ..conftest import REPO, no_leftovers

pytestmark = pytest.mark.slow  # ~1 min: real conversions interrupted mid-write


@pytest.fixture(scope="module")
def slow_tree(tmp_path_factory):
    """600 hard links to one 1600x1200 JPEG: ~10 s of writing at full resolution on 2 cores."""
    root = tmp_path_factory.mktemp("slow") / "src"
    rng = np.random.default_rng(0)
    big = (rng.random((1200, 1600, 3)) * 255).astype(np.uint8)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
    first = root / "c0" / "0000.JPEG"
    Image.fromarray(big).save(first, quality=95)
    for c in range(3):
        for i in range(200):
            p = root / f"c{c}" / f"{i:04d}.JPEG"
            if p != first:
                os.link(first, p)
    return root


def _start(src, out):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dataset_tools.convert",
            str(src),
            str(out),
            "--workers",
            "2",
            "--max-resolution",
            "1600",
            "--jpeg-quality",
            "95",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_writers(proc, n=2, timeout=60):
    """Block until the converter has started its writer processes (the write is under way)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        kids = psutil.Process(proc.pid).children()
        if len(kids) >= n:
            time.sleep(1.0)
            return [k.pid for k in kids]
        time.sleep(0.05)
    raise AssertionError("writers never started")


def _gone(pids, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("how", ["ctrl_c", "sigterm", "sigkill"])
def test_interrupt_leaves_nothing_and_rerun_succeeds(slow_tree, tmp_path, how):
    out = tmp_path / "train.beton"
    proc = _start(slow_tree, out)
    workers = _wait_for_writers(proc)
    if how == "ctrl_c":
        os.killpg(proc.pid, signal.SIGINT)  # the terminal sends SIGINT to the whole foreground group
    elif how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    if how == "sigkill":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, err
        assert "interrupted; nothing was written" in err and "Traceback" not in err
    assert _gone(workers), "writer processes outlived the converter"
    assert no_leftovers(tmp_path, "train.beton") == []
    # Nothing stale blocks the next run.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dataset_tools.convert",
            str(slow_tree),
            str(out),
            "--workers",
            "2",
            "--max-per-class",
            "5",
            "--quiet",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert no_leftovers(tmp_path, "train.beton") == ["train.beton"]


def test_existing_output_survives_a_failed_run(slow_tree, tmp_path):
    out = tmp_path / "keep.beton"
    out.write_bytes(b"previous good file")
    proc = _start(slow_tree, out)
    _wait_for_writers(proc)
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=60)
    assert out.read_bytes() == b"previous good file"


def test_fallback_temp_file_is_removed_on_error_and_swept_after_kill(tmp_path, monkeypatch):
    """Where O_TMPFILE is unavailable (NFS, Lustre) a hidden partial file is used and cleaned up."""
    monkeypatch.delattr(os, "O_TMPFILE")
    final = tmp_path / "x.beton"
    with pytest.raises(RuntimeError):
        with AtomicOutput(str(final)) as out:
            assert os.path.basename(out.path).startswith(".x.beton.partial-")
            open(out.path, "wb").write(b"half")
            raise RuntimeError("crash")
    assert no_leftovers(tmp_path, "x.beton") == []
    # A partial file of a process that no longer exists (SIGKILL) is swept by the next run.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".x.beton.partial-{dead.pid}").write_bytes(b"stale")
    with AtomicOutput(str(final)) as out:
        open(out.path, "wb").write(b"complete")
        out.commit()
    assert no_leftovers(tmp_path, "x.beton") == ["x.beton"] and final.read_bytes() == b"complete"


def test_tmpfile_output_is_invisible_until_commit(tmp_path):
    final = tmp_path / "y.beton"
    with AtomicOutput(str(final)) as out:
        with open(out.path, "wb") as f:
            f.write(b"data")
        assert list(tmp_path.iterdir()) == []
        out.commit()
    assert final.read_bytes() == b"data" and no_leftovers(tmp_path, "y.beton") == ["y.beton"]

"""Helpers for injecting real faults: a size-limited tmpfs, a process without root's permission bypass, a file-size
limit, and finding (and freezing) the converter's writer processes so a fault lands mid-write, deterministically."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from ..conftest import REPO

CONVERT = [sys.executable, "-m", "dataset_tools.convert"]
TRAIN = [sys.executable, "-m", "deit3_fast", "train"]

_PR_CAPBSET_DROP, _CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 24, 1, 2


@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    """A tmpfs of `size` (e.g. "4m") mounted at `where`: a real, small disk that fills up. Skips where mounting is not
    permitted (not root, or a container without CAP_SYS_ADMIN)."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", f"deit3-faults-{uuid.uuid4().hex[:8]}", str(where)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({r.stderr.strip() or 'mount failed'}); the RLIMIT_FSIZE test covers "
            "a full disk instead"
        )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def resize_tmpfs(where: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True, capture_output=True)


def drop_root_file_access():
    """preexec_fn: as root, give up CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH for the child and everything it execs, so
    permission bits apply to it as to any user (files stay root-owned; only mode 000 ones become unreadable)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def permission_faults_possible() -> str | None:
    """None if a child can be made to respect permission bits here, else why not."""
    if os.geteuid() != 0:
        return None
    try:
        subprocess.run([sys.executable, "-c", "pass"], preexec_fn=drop_root_file_access, check=True)
    except (subprocess.SubprocessError, OSError) as e:
        return f"running as root and cannot drop CAP_DAC_OVERRIDE for a child ({e})"
    return None


def file_size_limit(limit: int):
    """preexec_fn: every file the child (and its workers) writes is capped at `limit` bytes; writes past it fail with
    EFBIG ('File too large'), as on a full quota. SIGXFSZ is ignored (Python does that itself at start-up too)."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def start_convert(src, out, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [*CONVERT, str(src), str(out), *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )


def writer_processes(proc: subprocess.Popen, n: int, timeout: float = 120) -> list[psutil.Process]:
    """The converter's `n` writer processes, once they exist (the scan is then complete and the outputs open): its
    children, apart from a multiprocessing resource tracker should one be running."""
    parent = psutil.Process(proc.pid)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"converter ended before its writers were seen: {proc.communicate()}")
        try:
            writers = [k for k in parent.children() if "resource_tracker" not in " ".join(k.cmdline())]
            if len(writers) >= n:
                return writers[:n]
        except psutil.Error:
            pass
        time.sleep(0.005)
    raise AssertionError("writer processes never started")


def wait_gone(procs: list[psutil.Process], timeout: float = 20) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="session")
def big_jpeg(tmp_path_factory) -> Path:
    """One 1600x1200 noise JPEG (~2 MB): decoding and re-encoding it takes tens of ms, so a conversion of many hard
    links to it is slow enough to be interrupted mid-write."""
    p = tmp_path_factory.mktemp("big") / "big.JPEG"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((1200, 1600, 3)) * 255).astype(np.uint8)).save(p, quality=95)
    return p


def link_tree(root: Path, big: Path, classes: dict[str, int]) -> Path:
    """root/<class>/<i>.JPEG as hard links to `big` (cheap to make, each a real full-size JPEG to convert)."""
    for cls, n in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            os.link(big, root / cls / f"{i:04d}.JPEG")
    return root

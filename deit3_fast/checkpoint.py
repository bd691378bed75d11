"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint holds the model, optimiser, grad scaler, EMA, schedule position (epoch, step), the best accuracy so far
and the resolved config. It holds no RNG state: every random draw of a run is keyed by (seed, rank, epoch, batch),
so a resume on any number of processes redraws exactly what an uninterrupted run would. It is written to a temporary
file beside the target, fsynced and renamed, so a crash or SIGKILL mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

LAST, BEST = "checkpoint-last.pt", "checkpoint-best.pt"


def _sweep_partials(path: Path) -> None:
    """Remove what a process killed mid-write (SIGKILL, OOM killer, node loss) left: `.NAME.partial-PID` files whose
    PID is no longer running. They are never read, but each can be as large as the checkpoint."""
    for stale in path.parent.glob(f".{path.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            stale.unlink(missing_ok=True)


def save(path: Path, payload: dict) -> None:
    _sweep_partials(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load(path: Path) -> dict:
    from .models import CheckpointError

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({first}); it may have been cut short: pass "
                              "--resume with an earlier checkpoint, or move it away to start over") from None


def find_resume(resume: str | None, out_dir: Path) -> Path | None:
    """`--resume auto`: the run dir's last checkpoint if there is one; `--resume DIR|FILE`: that one (must exist)."""
    if not resume:
        return None
    if resume == "auto":
        p = out_dir / LAST
        return p if p.exists() else None
    p = Path(resume)
    p = p / LAST if p.is_dir() else p
    if not p.exists():
        raise FileNotFoundError(f"--resume {resume}: no checkpoint at {p}")
    return p

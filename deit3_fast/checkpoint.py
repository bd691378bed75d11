"""Checkpoints: the one format a run saves and resumes from, written atomically.

A checkpoint is the run's state (`Run.state_dict()`: model, optimiser, grad scaler, EMA) plus where it stands: the
last completed epoch, the position inside the next one for a mid-epoch stop (`resume_at`), the best accuracy so far,
and the config it was written with. It holds no RNG state: every random draw of a run is keyed by (seed, rank,
epoch, batch), so a resume on any number of processes redraws exactly what an uninterrupted run would. Files load
with `torch.load(weights_only=True)`; they are written to a temporary beside the target, fsynced and renamed
(`dataset_tools.atomic.write_atomic`), so a crash or SIGKILL mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from dataset_tools.atomic import write_atomic
from dataset_tools.errors import UserError

LAST, BEST = "checkpoint-last.pt", "checkpoint-best.pt"


class CheckpointError(UserError):
    """A checkpoint that cannot be read, or does not fit the model or run it is loaded into."""


@dataclass
class Position:
    """Where a checkpoint stands: the last completed epoch (-1: none), the position inside the next epoch after a
    mid-epoch stop (step and the partial sums of its statistics), and the best accuracy so far."""
    epoch: int = -1
    best: float = -1.0
    resume_at: dict | None = None


def save(path: Path, state: dict, position: Position, config: dict) -> None:
    payload = {**state, "epoch": position.epoch, "best_acc1": position.best, "resume_at": position.resume_at,
               "config": config}
    with _signals_deferred():
        write_atomic(path, lambda f: torch.save(payload, f))


# What a scheduler sends before a time limit or preemption: SIGTERM (our handler), SIGUSR1/2 (submitit's, which
# requeues the job and calls sys.exit in whatever the main thread is doing).
_DEFERRED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@contextmanager
def _signals_deferred():
    """Run the handlers of signals that arrive during a checkpoint write after it, not inside it: a requeue's
    sys.exit inside torch.save became torch's 'unexpected pos' error on the way out, and the job failed instead of
    being requeued. Python runs signal handlers in the main thread, so elsewhere there is nothing to defer."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived = []
    # A handler installed outside Python (getsignal: None) could not be put back: such a signal is left alone.
    previous = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in _DEFERRED
                if signal.getsignal(s) is not None}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(arrived):  # each once, in the order they came
            signal.raise_signal(s)


def load(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({first}); it may have been cut short: pass "
                              "--resume with an earlier checkpoint, or move it away to start over") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a checkpoint (a dict of state)")
    return payload


def position(payload: dict) -> Position:
    return Position(payload["epoch"], payload["best_acc1"], payload.get("resume_at"))


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
        raise CheckpointError(f"--resume {resume}: no checkpoint at {p}")
    return p

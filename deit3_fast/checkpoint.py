"""Checkpoints: the one module that reads and writes them, ours and the weights files a run starts from.

Ours: a run's state (`Run.state_dict()`: model, optimiser, grad scaler, EMA) plus where it stands: the last
completed epoch, the position inside the next one for a mid-epoch stop (`resume_at`), the best accuracy so far, and
the config it was written with, under a format name and version. It holds no RNG state: every random draw of a run
is keyed by (seed, rank, epoch, batch), so a resume on any number of processes redraws exactly what an
uninterrupted run would. Files load with `torch.load(weights_only=True)`; they are written to a temporary beside the
target, fsynced and renamed (`dataset_tools.atomic.write_atomic`), so a crash or SIGKILL mid-write leaves the
previous checkpoint intact.

Everything else asks through this API and never subscripts a payload:
  save_run(path, state, position, config)   write ours (atomically, scheduler signals deferred to after it)
  load_run(path) -> RunCheckpoint            ours, to resume (--resume): state, position, config, version
  read_weights(path, ema=False) -> Weights   a model's weights, and the model name and image size the file records,
                                             from any file we read: ours (or its EMA), an official DeiT III .pth
                                             ({"model": ..., "args": Namespace}), a timm checkpoint ("state_dict"),
                                             a bare state dict, a .safetensors file (model.checkpoint, eval, export)
  load_weights(path, ema=False) -> dict      the same, the state dict alone
  run_config(path) -> dict | None            the config ours was written with (None: not ours), read without
                                             loading the tensors (eval, export)
  RunState                                   the layout of the run state, for Run.state_dict / load_state_dict
  load(path) -> dict                         ours as stored, for tests that compare two checkpoints whole
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from dataset_tools.atomic import write_atomic
from dataset_tools.errors import UserError

LAST, BEST = "checkpoint-last.pt", "checkpoint-best.pt"

# The payload is one flat dict, as it was before it carried a version: the weights stay under "model", where timm's
# and the official loaders look for them, and checkpoints of runs in flight keep loading.
#   format, version                  what wrote it (from version 1 on; absent before: read as version 1)
#   model, optimizer, scaler, ema    the run state (RunState)
#   epoch, best_acc1, resume_at      the position (Position)
#   config                           the config as a dict (config.to_dict)
FORMAT, VERSION = "deit3-fast-checkpoint", 1
READS = (1,)  # the versions this build reads; a change of layout adds one here with the code that reads it
# A payload written before "format" existed: every key it always had (resume_at and ema came later or may be None).
_UNVERSIONED = frozenset({"model", "optimizer", "scaler", "epoch", "best_acc1", "config"})


class CheckpointError(UserError):
    """A checkpoint that cannot be read, or does not fit the model or run it is loaded into."""


@dataclass
class Position:
    """Where a checkpoint stands: the last completed epoch (-1: none), the position inside the next epoch after a
    mid-epoch stop (step and the partial sums of its statistics), and the best accuracy so far."""

    epoch: int = -1
    best: float = -1.0
    resume_at: dict | None = None


@dataclass
class RunState:
    """What a checkpoint saves of a run's components: each one's state dict (`ema` None without train.ema_decay;
    `scaler` empty where the grad scaler is off, bf16)."""

    model: dict
    optimizer: dict
    scaler: dict
    ema: dict | None = None

    def to_dict(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler, "ema": self.ema}

    @classmethod
    def from_dict(cls, state: Mapping) -> RunState:
        """From `to_dict`'s dict or a whole payload (which holds it); `ema` may be absent (older checkpoints)."""
        return cls(state["model"], state["optimizer"], state["scaler"], state.get("ema"))


@dataclass
class RunCheckpoint:
    """One of our checkpoints, read to resume: `state` is what `Run.load_state_dict` takes."""

    path: Path
    state: dict
    position: Position
    config: dict
    version: int


@dataclass
class Weights:
    """A model's state dict (DDP 'module.' and torch.compile '_orig_mod.' prefixes removed) and what the file says
    about the model it belongs to: its name and training image size (ours: the config; official: its args), or
    None where it does not say."""

    state: dict
    model: str | None = None
    img_size: int | None = None


def save_run(path: Path, state: dict, position: Position, config: dict) -> None:
    """Write our checkpoint of `state` (`Run.state_dict()`) at `position`, atomically."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        **RunState.from_dict(state).to_dict(),
        "epoch": position.epoch,
        "best_acc1": position.best,
        "resume_at": position.resume_at,
        "config": config,
    }
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
    previous = {
        s: signal.signal(s, lambda signum, frame: arrived.append(signum))
        for s in _DEFERRED
        if signal.getsignal(s) is not None
    }
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(arrived):  # each once, in the order they came
            signal.raise_signal(s)


def load(path: Path) -> dict:
    """Our checkpoint at `path` as stored (version checked). Code reads it through `load_run` / `read_weights`;
    this is for tests and tools that compare two checkpoints whole."""
    try:
        payload = _read(path)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({_first_line(e)}); it may have been cut short: "
            "pass --resume with an earlier checkpoint, or move it away to start over"
        ) from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a checkpoint (a dict of state)")
    if _version(path, payload) is None:
        raise CheckpointError(
            f"{path} is not a checkpoint of a deit3-fast run (no config and position to resume "
            f"from); to start from its weights, use --set model.checkpoint={path}"
        )
    return payload


def load_run(path: Path) -> RunCheckpoint:
    """Our checkpoint at `path`, to resume from."""
    payload = load(path)
    position = Position(payload["epoch"], payload["best_acc1"], payload.get("resume_at"))
    return RunCheckpoint(
        Path(path), RunState.from_dict(payload).to_dict(), position, payload["config"], _version(path, payload)
    )


def read_weights(path: str | Path, ema: bool = False) -> Weights:
    """A model's weights from any file we read (see the module docstring); `ema`: our checkpoint's EMA weights."""
    try:
        payload = _read(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # corrupt zip, pickle with unexpected globals, not a torch or safetensors file
        raise CheckpointError(f"checkpoint {path} cannot be read: {_first_line(e)}") from None
    ours = isinstance(payload, dict) and _version(path, payload) is not None
    if ema:
        if not ours:
            raise CheckpointError(f"{path} has no EMA weights (only a run's checkpoint with train.ema_decay has)")
        if payload.get("ema") is None:
            raise CheckpointError(f"{path} has no EMA weights (train.ema_decay was off)")
    model = img_size = None
    if ours:
        state = payload["ema"] if ema else payload["model"]
        config = payload["config"]
        model, img_size = config["model"]["name"], config["aug"]["img_size"]
    else:
        state = payload
        # Official checkpoints: "model" (and "args", their argparse.Namespace); timm's: "state_dict".
        for key in ("model", "state_dict", "model_ema"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
                break
        args = payload.get("args") if isinstance(payload, dict) else None
        if isinstance(args, argparse.Namespace) and getattr(args, "model", None):
            model, img_size = args.model, getattr(args, "input_size", None)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} holds no model state dict")
    # DDP ('module.') and torch.compile ('_orig_mod.') prefixes.
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    return Weights(state, model, img_size)


def load_weights(path: str | Path, ema: bool = False) -> dict:
    """`read_weights(path, ema).state`: the state dict alone."""
    return read_weights(path, ema).state


def run_config(path: str | Path) -> dict | None:
    """The config our checkpoint at `path` was written with, or None for any other file (official, timm,
    safetensors). The file is memory-mapped: its tensors are not read."""
    if _is_safetensors(path):
        return None
    try:
        try:
            payload = _read(path, mmap=True)
        except RuntimeError:  # torch's legacy (pre-zip) format cannot be mapped: read it whole
            payload = _read(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {_first_line(e)}") from None
    if not isinstance(payload, dict) or _version(path, payload) is None:
        return None
    return payload["config"]


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


def _read(path: str | Path, mmap: bool = False) -> object:
    """The file's contents: a .safetensors file's tensors, else what torch.load gives (weights only; `mmap`: its
    tensors mapped, not read)."""
    if _is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(str(path))
    # Official checkpoints carry their argparse.Namespace ('args') beside the weights. (add_safe_globals: torch 2.4
    # has no safe_globals context manager; a Namespace holds plain values, so allowing it everywhere is harmless.)
    torch.serialization.add_safe_globals([argparse.Namespace])
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _is_safetensors(path: str | Path) -> bool:
    """safetensors' layout: an 8-byte little-endian header length, then that many bytes of JSON (an object). torch
    files start with a zip ('PK') or a pickle (0x80) header, which never reads as a length followed by '{'."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = f.seek(0, 2)
    except OSError:
        return False  # torch.load reports it
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def _version(path: str | Path, payload: dict) -> int | None:
    """The format version of our checkpoint `payload` (1 for one written before the field existed), or None where
    it is not ours; a version this build does not read is a CheckpointError naming the fix."""
    if payload.get("format") != FORMAT:
        return 1 if _UNVERSIONED <= payload.keys() else None
    version = payload.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version in READS:
        return version
    from . import __version__

    reads = ", ".join(map(str, READS))
    if isinstance(version, int) and not isinstance(version, bool) and version > max(READS):
        fix = "a newer deit3-fast wrote it: upgrade deit3-fast (pip install -U deit3-fast) to read it"
    else:
        fix = (
            "no deit3-fast writes that version: the file was changed by another tool or is damaged; use a "
            "checkpoint written by deit3-fast"
        )
    raise CheckpointError(
        f"{path} is a deit3-fast checkpoint of format version {version!r}, and deit3-fast "
        f"{__version__} reads version {reads}; {fix}"
    )


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__

"""Device and precision policy: which device a command runs on, what `train.amp` means there, and what it costs.

`train.amp: auto` is bf16 where the device computes it natively (CUDA compute capability 8.0 and later: A100,
H100; and CPUs), else fp16 with a GradScaler (V100, T4). An explicit bf16 on a device that only emulates it works,
several times slower: one warning.
"""

from __future__ import annotations

import os
import resource
import warnings
from contextlib import nullcontext

import torch

from dataset_tools.errors import UserError

from .amp import PRECISIONS

AMP_DTYPES = {name: getattr(torch, dtype) for name, dtype in PRECISIONS.items()}


class DeviceError(UserError):
    """A device was asked for that this machine does not have."""


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def pick_device(name: str | None) -> torch.device:
    """`--device cpu|cuda`, or the default: CUDA when one is visible."""
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver)")
    return torch.device(name) if name else default_device()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: CUDA from compute capability 8.0 (not V100 or T4, which only emulate
    it), and CPUs (autocast's bf16 kernels)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return True


def resolve_amp(amp: str, device: torch.device) -> str:
    """`train.amp` for this device: auto -> bf16 | fp16; the others as given (bf16 where emulated: a warning)."""
    if amp == "auto":
        return "bf16" if native_bf16(device) else "fp16"
    if amp == "bf16" and not native_bf16(device):
        warnings.warn(
            f"train.amp: bf16 on {torch.cuda.get_device_name(device)}, which has no native bf16 (it is "
            "emulated, several times slower): use train.amp: auto or fp16",
            stacklevel=2,
        )
    return amp


def autocast(device: torch.device, amp: str):
    """The forward pass's autocast for a resolved amp (bf16 | fp16 | fp32 = none)."""
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp != "fp32" else nullcontext()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({len(os.sched_getaffinity(0))} cores)"


def reset_peak_memory(device: torch.device) -> None:
    """At the start of each run: `ablate` runs several in one process, and each reports its own peak. (On a CPU
    the peak is the process's resident set, which cannot be reset.)"""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def max_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def is_out_of_memory(e: BaseException) -> bool:
    """torch's CUDA OOM, a CPU allocation failure (torch's RuntimeError, numpy's MemoryError in FFCV's buffers)."""
    text = str(e)
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError)
        and ("not enough memory" in text or "can't allocate memory" in text or "out of memory" in text.lower())
    )

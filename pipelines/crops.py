"""Primary crops (RandomResizedCrop, Simple Random Crop, eval centre crop) as pure functions of the image size and a
64-bit key (`keys.py`).

The key of a sample is derived from (seed, rank, epoch, sample index, slot in batch), so a crop does not depend on
which thread decoded it, a resumed run sees the crops of an uninterrupted one, and every engine (FFCV's numba
threads, DALI's external source, torch nvjpeg) computes the same box from the same key. The box functions are
numba-compiled (FFCV's decoder calls them) and callable from Python; `crop_plan` gives the Python engines a named
plan.

RandomResizedCrop gives an integer box (top, left, height, width) that is cropped, then resized; the eval crop and
Simple Random Crop give fractional source boxes (y0, x0, y1, x1), the exact preimage of torchvision's
resize-then-crop, which `resample.resize_box` maps onto the output in one step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numba import njit

from .keys import uniform


@dataclass(frozen=True)
class CropSpec:
    """Which primary crop an engine takes, and its parameters (from the `aug` config)."""

    kind: str  # "rrc" | "src" | "center"
    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    pad: int = 4
    center_ratio: float = 1.0


@njit(cache=True, nogil=True)
def rrc_box(height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, key):
    """torchvision RandomResizedCrop.get_params: 10 tries of (area fraction ~ U(scale), log aspect ~ U(log ratio)),
    then the largest centred crop within the ratio range."""
    area = height * width
    for attempt in range(10):
        target_area = area * (scale_lo + (scale_hi - scale_lo) * uniform(key, 4 * attempt))
        aspect = math.exp(log_ratio_lo + (log_ratio_hi - log_ratio_lo) * uniform(key, 4 * attempt + 1))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(uniform(key, 4 * attempt + 2) * (height - h + 1))
            j = int(uniform(key, 4 * attempt + 3) * (width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < math.exp(log_ratio_lo):
        w = width
        h = int(round(w / math.exp(log_ratio_lo)))
    elif in_ratio > math.exp(log_ratio_hi):
        h = height
        w = int(round(h * math.exp(log_ratio_hi)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


@njit(cache=True, nogil=True)
def center_box(height, width, size, crop_ratio):
    """Eval crop as torchvision's Resize(int(size / crop_ratio)) + CenterCrop(size), expressed as the (fractional)
    source box (y0, x0, y1, x1) that resampling maps onto the size x size output: same filter weights, one step."""
    short = min(height, width)
    s = int(size / crop_ratio)
    rh = s if height == short else int(s * height / short)
    rw = s if width == short else int(s * width / short)
    top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    sy, sx = height / rh, width / rw
    return top * sy, left * sx, (top + size) * sy, (left + size) * sx


@njit(cache=True, nogil=True)
def src_box(height, width, size, pad, key):
    """Simple Random Crop: torchvision Resize(size) (shorter side), RandomCrop(size, padding=pad, reflect).

    Returns the fractional source box of the part of the crop inside the image, and where that part lands in
    the size x size output: (y0, x0, y1, x1, out_top, out_left, out_h, out_w). Output rows/columns outside it are
    the reflect padding (at most `pad` wide)."""
    short = min(height, width)
    rh = size if height == short else int(size * height / short)
    rw = size if width == short else int(size * width / short)
    # RandomCrop(size, padding=pad): offset uniform over the padded image, here relative to the unpadded one.
    y = int(uniform(key, 0) * (rh + 2 * pad - size + 1)) - pad
    x = int(uniform(key, 1) * (rw + 2 * pad - size + 1)) - pad
    r0, r1 = max(y, 0), min(y + size, rh)
    c0, c1 = max(x, 0), min(x + size, rw)
    sy, sx = height / rh, width / rw
    return r0 * sy, c0 * sx, r1 * sy, c1 * sx, r0 - y, c0 - x, r1 - r0, c1 - c0


@njit(cache=True, nogil=True)
def reflect_fill(out, out_top, out_left, out_h, out_w):
    """Fill the border of `out` (H, W, C) around the valid block by reflection (no edge repeat, like
    torchvision's padding_mode='reflect'): row out_top - k mirrors row out_top + k."""
    size_h, size_w = out.shape[0], out.shape[1]
    for k in range(1, out_top + 1):
        out[out_top - k, :, :] = out[min(out_top + k, out_top + out_h - 1), :, :]
    for k in range(1, size_h - (out_top + out_h) + 1):
        out[out_top + out_h - 1 + k, :, :] = out[max(out_top + out_h - 1 - k, out_top), :, :]
    for k in range(1, out_left + 1):
        out[:, out_left - k, :] = out[:, min(out_left + k, out_left + out_w - 1), :]
    for k in range(1, size_w - (out_left + out_w) + 1):
        out[:, out_left + out_w - 1 + k, :] = out[:, max(out_left + out_w - 1 - k, out_left), :]


class BoxPlan(NamedTuple):
    """Resample the source box [y0, y1) x [x0, x1) onto the whole output. `whole`: the filter may read outside the
    box (resize-then-crop: eval); else only the box's own pixels (crop-then-resize: RandomResizedCrop)."""

    y0: float
    x0: float
    y1: float
    x1: float
    whole: bool


class SrcPlan(NamedTuple):
    """Simple Random Crop: resample [y0, y1) x [x0, x1) of the whole image onto the out_h x out_w block at
    (out_top, out_left) of the output, and fill the rest by reflection."""

    y0: float
    x0: float
    y1: float
    x1: float
    out_top: int
    out_left: int
    out_h: int
    out_w: int


def crop_plan(spec: CropSpec, height: int, width: int, key) -> BoxPlan | SrcPlan:
    """What to take from an image of this size for a sample with this key."""
    if spec.kind == "rrc":
        i, j, h, w = rrc_box(
            height, width, spec.scale[0], spec.scale[1], np.log(spec.ratio[0]), np.log(spec.ratio[1]), key
        )
        return BoxPlan(float(i), float(j), float(i + h), float(j + w), False)
    if spec.kind == "center":
        y0, x0, y1, x1 = center_box(height, width, spec.size, spec.center_ratio)  # (mypy cannot count *njit(...))
        return BoxPlan(y0, x0, y1, x1, True)
    return SrcPlan(*src_box(height, width, spec.size, spec.pad, key))

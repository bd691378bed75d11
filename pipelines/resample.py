"""PIL's bicubic resampling (antialiased when shrinking) of a box with fractional corners, compiled with numba.

The official transforms resize with PIL bicubic: RandomResizedCrop crops an integer box then resizes it, eval and
Simple Random Crop resize the whole image then crop. Both are "resample this box of the source": the first with the
box's own pixels only (pass the cropped view), the second with a fractional box whose filter taps may reach outside
it (pass the whole image). Filter weights follow Pillow's `precompute_coeffs` (bicubic a = -0.5, support 2 scaled by
the shrink factor), with Pillow's rounding and clipping to 8 bits after each pass; Pillow's fixed-point weights
leave differences of at most a grey level.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _bicubic(x):
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@njit(cache=True, nogil=True, fastmath=True)
def _to_u8(v):
    """Round and clip to 0..255, as Pillow does after each pass (bicubic overshoots at sharp edges)."""
    v = math.floor(v + 0.5)
    return 0.0 if v < 0 else (255.0 if v > 255 else v)


@njit(cache=True, nogil=True)
def _coeffs(in_size, in0, in1, out_size):
    """Per output pixel: first source index, tap count, and normalised weights (Pillow's precompute_coeffs)."""
    scale = (in1 - in0) / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    first = np.empty(out_size, np.int64)
    count = np.empty(out_size, np.int64)
    weights = np.zeros((out_size, ksize), np.float32)
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        total = 0.0
        for x in range(xmax - xmin):
            w = _bicubic((x + xmin - center + 0.5) / filterscale)
            weights[xx, x] = w
            total += w
        if total != 0.0:
            for x in range(xmax - xmin):
                weights[xx, x] /= total
        first[xx] = xmin
        count[xx] = xmax - xmin
    return first, count, weights


@njit(cache=True, nogil=True, fastmath=True)
def resize_box(src, y0, x0, y1, x1, out):
    """Resample the box [y0, y1) x [x0, x1) (float source coordinates) of src (H, W, 3) uint8 into out (h, w, 3)."""
    oh, ow = out.shape[0], out.shape[1]
    hf, hc, hw = _coeffs(src.shape[1], x0, x1, ow)
    vf, vc, vw = _coeffs(src.shape[0], y0, y1, oh)
    r_lo = vf[0]
    r_hi = vf[oh - 1] + vc[oh - 1]
    # Horizontal pass over the source rows the vertical pass will need; rows are (ow * 3) floats, contiguous.
    tmp = np.zeros((r_hi - r_lo, ow * 3), np.float32)
    for r in range(r_lo, r_hi):
        row = src[r]
        t = tmp[r - r_lo]
        for xx in range(ow):
            a0 = a1 = a2 = np.float32(0.0)
            for k in range(hc[xx]):
                w = hw[xx, k]
                px = row[hf[xx] + k]
                a0 += w * px[0]
                a1 += w * px[1]
                a2 += w * px[2]
            t[3 * xx] = _to_u8(a0)
            t[3 * xx + 1] = _to_u8(a1)
            t[3 * xx + 2] = _to_u8(a2)
    # Vertical pass: whole rows at a time (a weighted sum of contiguous vectors).
    acc = np.empty(ow * 3, np.float32)
    for yy in range(oh):
        base = vf[yy] - r_lo
        acc[:] = 0.0
        for k in range(vc[yy]):
            w = vw[yy, k]
            t = tmp[base + k]
            for i in range(ow * 3):
                acc[i] += w * t[i]
        o = out[yy]
        for xx in range(ow):
            for c in range(3):
                o[xx, c] = _to_u8(acc[3 * xx + c])

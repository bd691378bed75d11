"""Pixel primitives of the batch augmentation, shared by its ops (augment.py) and RandAugment (randaugment.py).

Every function works on float (B, H, W, 3) holding integer pixel values on the 0..255 scale (NHWC: a pixel's three
channels are adjacent, so a grey value is three multiply-adds), and reproduces the PIL or torchvision function it is
named after, with PIL's own rounding where PIL rounds. Nothing here draws random numbers or knows an op's parameters:
the ops pass per-sample values in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# torchvision's rgb_to_grayscale weights, used by contrast and saturation (as torchvision's ColorJitter does).
TV_GREY = (0.2989, 0.587, 0.114)
# PIL's convert('L') weights, in units of 2^-16.
_PIL_GREY = (19595.0, 38470.0, 7471.0)


def weighted_grey(x: torch.Tensor, w: tuple[float, float, float]) -> torch.Tensor:
    """w[0] R + w[1] G + w[2] B over the last axis, with Python-number weights: a weight tensor built here would be
    a blocking host-to-device copy on every call."""
    return w[0] * x[..., 0] + w[1] * x[..., 1] + w[2] * x[..., 2]


def pil_grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's convert('L') on integer pixels: (19595 R + 38470 G + 7471 B + 2^15) >> 16, one channel (B, H, W).
    Exact in float32: every partial sum is an integer below 2^24."""
    return torch.floor((weighted_grey(x, _PIL_GREY) + 32768) / 65536)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL's convert('L') copied to 3 channels."""
    return pil_grey(x).unsqueeze(-1).expand_as(x)


def solarize(x: torch.Tensor, threshold: float = 128) -> torch.Tensor:
    """PIL ImageOps.solarize: pixels >= threshold are inverted."""
    return torch.where(x >= threshold, 255 - x, x)


def flip(x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of the samples where `chosen` (B,) is true, as a whole-batch select."""
    return torch.where(chosen.view(-1, 1, 1, 1), x.flip(2), x)


def tv_blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend on 0..255 floats: clamp(f x + (1 - f) other), not rounded (torchvision keeps floats)."""
    return (f * x + (1 - f) * other).clamp_(0, 255)


def pil_blend(d: torch.Tensor, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Image.blend(d, x, f) on 8-bit pixels: float32 d + f (x - d), truncated into 0..255."""
    return torch.floor((d + f * (x - d)).clamp(0, 255))


def pil_smooth(x: torch.Tensor) -> torch.Tensor:
    """ImageFilter.SMOOTH: kernel [1 1 1; 1 5 1; 1 1 1] / 13 rounded half up, border pixels copied. On integers the
    sum S is exact and S / 13 is never within 1/26 of a half, so floor((S + 6.5) / 13) is PIL's float result."""
    rows = x[:, :-2] + x[:, 1:-1] + x[:, 2:]
    s = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:] + 4 * x[:, 1:-1, 1:-1]
    out = x.clone()
    out[:, 1:-1, 1:-1] = torch.floor((s + 6.5) / 13)
    return out


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float = 2.0) -> torch.Tensor:
    """Per-sample separable Gaussian blur, kernel truncated at 3 sigma of the largest sigma, edges replicated."""
    b, h, w, c = x.shape
    radius = int(math.ceil(3 * max_sigma))
    k = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-(k[None, :] ** 2) / (2 * sigma.float()[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K)
    y = x.permute(0, 3, 1, 2).reshape(1, b * c, h, w).float()
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), kernel[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w).permute(0, 2, 3, 1)


def per_sample(x: torch.Tensor, on: torch.Tensor, subset: bool, fn) -> torch.Tensor:
    """`fn` applied to the samples where `on` (fn(x_part, index) gets those samples and an index for its
    per-sample values). With `subset` (a CPU) only those are computed; otherwise the whole batch is, and the result
    selected, because picking the subset (nonzero) would make the host wait for the device."""
    if not subset:
        return torch.where(on.view(-1, 1, 1, 1), fn(x, slice(None)), x)
    idx = on.nonzero().squeeze(1)
    if not idx.numel():
        return x
    x = x.clone()
    x[idx] = fn(x[idx], idx)
    return x


def exact_div(a: torch.Tensor, b) -> torch.Tensor:
    """a / b rounded as Python rounds it: torch divides by a Python number as a multiplication by its reciprocal,
    one ulp off at times, which moves int() across an integer (PIL's autocontrast at 47 * 255 / 235 = 51)."""
    return a / (b if isinstance(b, torch.Tensor) else torch.full_like(a, b))


def device_const(values, device, dtype=torch.float32) -> torch.Tensor:
    """A small constant built on `device` from Python numbers: torch.tensor(..., device=cuda) would be a blocking
    copy from host memory, which waits for the device."""
    t = torch.empty(len(values), device=device, dtype=dtype)
    for i, v in enumerate(values):
        t[i] = v
    return t

"""The device stage: batched DeiT III augmentation after the primary crop, one implementation for every engine.

Input: uint8 (B, H, W, 3) on any device (what an engine yields). Output: float (B, 3, H, W) in channels-last memory,
normalised, in the requested dtype. Training applies, per sample, as the official `new_data_aug_generator`:
horizontal flip -> exactly one of grayscale | solarize | Gaussian blur (3-Augment) -> colour jitter (brightness,
contrast, saturation in random order) -> normalise. Randomness comes from a torch.Generator on the same device,
drawn once per batch into `AugParams` (returned, so previews and tests can see which branch each sample took).

Pixel values stay on the 0..255 scale until normalisation, so thresholds and the integer grayscale formula are
PIL's exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BRANCHES = ("grayscale", "solarize", "blur")
JITTER_OPS = ("brightness", "contrast", "saturation")
# torchvision's rgb_to_grayscale weights, used by contrast and saturation (as torchvision's ColorJitter does).
_TV_GREY = (0.2989, 0.587, 0.114)


@dataclass
class AugParams:
    flip: torch.Tensor          # (B,) bool
    branch: torch.Tensor        # (B,) long: index into BRANCHES, -1 when 3-Augment is off
    sigma: torch.Tensor         # (B,) blur sigma (used where branch == blur)
    jitter: torch.Tensor        # (B, 3) brightness, contrast, saturation factors
    jitter_order: torch.Tensor  # (B, 3) permutation of JITTER_OPS per sample


def draw_params(batch: int, g: torch.Generator, *, hflip: float, three_augment: bool,
                blur_sigma: tuple[float, float], color_jitter: float) -> AugParams:
    dev = g.device
    u = torch.rand(batch, 6, generator=g, device=dev)
    branch = (u[:, 1] * 3).long().clamp_(max=2) if three_augment else torch.full((batch,), -1, device=dev)
    jitter = 1 + color_jitter * (2 * u[:, 3:6] - 1)
    return AugParams(flip=u[:, 0] < hflip, branch=branch,
                     sigma=blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * u[:, 2],
                     jitter=jitter, jitter_order=torch.argsort(torch.rand(batch, 3, generator=g, device=dev), dim=1))


# ---- single operations on float (B, 3, H, W) in [0, 255] -----------------------------------------------------------

def grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL's convert('L') on integer pixels: (19595 R + 38470 G + 7471 B + 2^15) >> 16, copied to 3 channels.
    Exact in float32: the largest sum is below 2^24."""
    r, g, b = x.unbind(1)
    grey = torch.floor((19595 * r + 38470 * g + 7471 * b + 32768) / 65536)
    return grey.unsqueeze(1).expand_as(x).contiguous(memory_format=torch.channels_last)


def solarize(x: torch.Tensor, threshold: float = 128) -> torch.Tensor:
    """PIL ImageOps.solarize: pixels >= threshold are inverted."""
    return torch.where(x >= threshold, 255 - x, x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float = 2.0) -> torch.Tensor:
    """Per-sample separable Gaussian blur, kernel truncated at 3 sigma of the largest sigma, edges replicated."""
    b, c, h, w = x.shape
    radius = int(math.ceil(3 * max_sigma))
    k = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-(k[None, :] ** 2) / (2 * sigma.float()[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K)
    y = x.reshape(1, b * c, h, w).float()
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), kernel[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w).contiguous(memory_format=torch.channels_last)


def _tv_grey(x: torch.Tensor) -> torch.Tensor:
    return (_TV_GREY[0] * x[:, 0] + _TV_GREY[1] * x[:, 1] + _TV_GREY[2] * x[:, 2]).unsqueeze(1)


def adjust(x: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_brightness / adjust_contrast / adjust_saturation with a per-sample factor (B,)."""
    f = factor.view(-1, 1, 1, 1).to(x.dtype)
    if op == 0:
        other = torch.zeros_like(x)
    elif op == 1:
        other = _tv_grey(x).mean(dim=(-3, -2, -1), keepdim=True)
    else:
        other = _tv_grey(x)
    return (f * x + (1 - f) * other).clamp_(0, 255)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Each sample gets its three adjustments in its own order (torchvision ColorJitter draws a permutation)."""
    for pos in range(3):
        for op in range(3):
            chosen = order[:, pos] == op
            x = torch.where(chosen.view(-1, 1, 1, 1), adjust(x, op, factors[:, op]), x)
    return x


# ---- the stage -----------------------------------------------------------------------------------------------------

def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) channels-last: a permuted view, so no layout copy."""
    return images.permute(0, 3, 1, 2).float()


def normalize(x: torch.Tensor, dtype: torch.dtype, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    scale = torch.tensor([1 / (255 * s) for s in std], device=x.device).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], device=x.device).view(1, 3, 1, 1)
    return (x * scale - shift).to(dtype).contiguous(memory_format=torch.channels_last)


def _on_subset(x: torch.Tensor, mask: torch.Tensor, fn) -> None:
    """x[mask] = fn(x[mask]), in place: each sample pays for its own 3-Augment branch only."""
    idx = mask.nonzero().squeeze(1)
    if idx.numel():
        x[idx] = fn(x[idx], idx)


def augment(x: torch.Tensor, p: AugParams, *, solarize_threshold: float = 128, max_sigma: float = 2.0,
            color_jitter_on: bool = True) -> torch.Tensor:
    """Flip, 3-Augment, colour jitter on float (B, 3, H, W) in [0, 255]."""
    x = torch.where(p.flip.view(-1, 1, 1, 1), x.flip(-1), x)  # a new tensor: the caller's is not modified below
    _on_subset(x, p.branch == 0, lambda s, i: grayscale(s))
    _on_subset(x, p.branch == 1, lambda s, i: solarize(s, solarize_threshold))
    _on_subset(x, p.branch == 2, lambda s, i: gaussian_blur(s, p.sigma[i], max_sigma))
    if color_jitter_on:
        x = color_jitter(x, p.jitter, p.jitter_order)
    return x


class DeviceStage:
    """uint8 batch -> model-ready batch. Training augments; evaluation only converts and normalises."""

    def __init__(self, aug, train: bool, dtype: torch.dtype = torch.float32):
        self.aug, self.train, self.dtype = aug, train, dtype

    def __call__(self, images: torch.Tensor, g: torch.Generator | None = None):
        x = to_float(images)
        params = None
        if self.train:
            a = self.aug
            params = draw_params(x.shape[0], g, hflip=a.hflip, three_augment=a.three_augment,
                                 blur_sigma=tuple(a.blur_sigma), color_jitter=a.color_jitter)
            x = augment(x, params, solarize_threshold=a.solarize_threshold, max_sigma=max(a.blur_sigma),
                        color_jitter_on=a.color_jitter > 0)
        return normalize(x, self.dtype, tuple(self.aug.mean), tuple(self.aug.std)), params

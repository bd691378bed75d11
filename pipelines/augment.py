"""The device stage: batched DeiT III augmentation after the primary crop, one implementation for every engine.

Input: uint8 (B, H, W, 3) on any device (what an engine yields). Output: float (B, 3, H, W) in channels-last memory,
normalised, in the requested dtype. Internally everything is NHWC, so a pixel's three channels are adjacent (grey
values are one small matmul) and the channels-last output is a free permute. Training applies, per sample, as
the official `new_data_aug_generator`: horizontal flip -> exactly one of grayscale | solarize | Gaussian blur
(3-Augment) -> colour jitter (brightness, contrast, saturation in random order) -> normalise. The fine-tuning
recipes' RandAugment (`aug.auto_augment`, randaugment.py) comes right after the flip, as in timm's transform.
Randomness comes from a torch.Generator on the same device, drawn once per batch into `AugParams` (returned, so
previews and tests can see which branch and which RandAugment ops each sample took).

Pixel values stay on the 0..255 scale until normalisation, so thresholds and the integer grayscale formula are
PIL's exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .config import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from .randaugment import RandAugParams

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
    randaug: RandAugParams | None = None  # aug.auto_augment's ops, per layer and sample

    def tensors(self) -> list[torch.Tensor]:
        more = list(vars(self.randaug).values()) if self.randaug is not None else []
        return [self.flip, self.branch, self.sigma, self.jitter, self.jitter_order, *more]

    def slice(self, s: slice) -> AugParams:
        return AugParams(self.flip[s], self.branch[s], self.sigma[s], self.jitter[s], self.jitter_order[s],
                         self.randaug.slice(s) if self.randaug is not None else None)


def draw_params(batch: int, g: torch.Generator, *, hflip: float, three_augment: bool,
                blur_sigma: tuple[float, float], color_jitter: float) -> AugParams:
    dev = g.device
    u = torch.rand(batch, 6, generator=g, device=dev)
    branch = (u[:, 1] * 3).long().clamp_(max=2) if three_augment else torch.full((batch,), -1, device=dev)
    jitter = 1 + color_jitter * (2 * u[:, 3:6] - 1)
    return AugParams(flip=u[:, 0] < hflip, branch=branch,
                     sigma=blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * u[:, 2],
                     jitter=jitter, jitter_order=torch.argsort(torch.rand(batch, 3, generator=g, device=dev), dim=1))


# ---- single operations on float (B, H, W, 3) in [0, 255] (NHWC: a pixel's channels are adjacent in memory) ------

_PIL_GREY = (19595.0, 38470.0, 7471.0)


def _weighted_grey(x: torch.Tensor, w: tuple[float, float, float]) -> torch.Tensor:
    """w[0] R + w[1] G + w[2] B over the last axis, with Python-number weights: a weight tensor built here would be
    a blocking host-to-device copy on every call."""
    return w[0] * x[..., 0] + w[1] * x[..., 1] + w[2] * x[..., 2]


def pil_grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's convert('L') on integer pixels: (19595 R + 38470 G + 7471 B + 2^15) >> 16, one channel (B, H, W).
    Exact in float32: every partial sum is an integer below 2^24."""
    return torch.floor((_weighted_grey(x, _PIL_GREY) + 32768) / 65536)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL's convert('L') copied to 3 channels."""
    return pil_grey(x).unsqueeze(-1).expand_as(x)


def solarize(x: torch.Tensor, threshold: float = 128) -> torch.Tensor:
    """PIL ImageOps.solarize: pixels >= threshold are inverted."""
    return torch.where(x >= threshold, 255 - x, x)


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


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Each sample gets its three adjustments in its own order (torchvision ColorJitter draws a permutation).

    All three are torchvision blends `clamp(f * x + (1 - f) * other)`, other = 0 (brightness), the mean of the
    grey image (contrast) or the grey image (saturation); so each step is one blend with a per-sample `other`,
    not every op on every sample."""
    for pos in range(3):
        op = order[:, pos].view(-1, 1, 1, 1)
        f = factors.gather(1, order[:, pos:pos + 1]).to(x.dtype).view(-1, 1, 1, 1)
        grey = _weighted_grey(x, _TV_GREY).unsqueeze(-1)
        other = torch.where(op == 1, grey.mean(dim=(1, 2), keepdim=True), grey) * (op != 0)
        x = (f * x + (1 - f) * other).clamp_(0, 255)
    return x


# ---- the stage -----------------------------------------------------------------------------------------------------

def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, H, W, 3), the layout every operation above works in."""
    return images.float()


def to_model_layout(x: torch.Tensor) -> torch.Tensor:
    """NHWC -> (B, 3, H, W) in channels-last memory: a permuted view, no copy."""
    return x.permute(0, 3, 1, 2)


def scale_shift(mean, std, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalisation as `x * scale - shift` on 0..255 pixels, built on the host and copied with non_blocking (torch
    does not wait for the device, as it does for torch.tensor(..., device=cuda); CUDA stages a copy from pageable
    memory before returning, so the host tensor may go). Callers cache the pair, so this runs once per device."""
    host = torch.tensor([[1 / (255 * s) for s in std], [m / s for m, s in zip(mean, std)]])
    pair = host.to(device, non_blocking=True)
    return pair[0], pair[1]


def normalize(x: torch.Tensor, dtype: torch.dtype, mean=IMAGENET_MEAN, std=IMAGENET_STD,
              consts: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    scale, shift = consts if consts is not None else scale_shift(mean, std, x.device)
    return to_model_layout((x * scale - shift).to(dtype))


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


def _blur_branch(x: torch.Tensor, p: AugParams, max_sigma: float, subset: bool) -> torch.Tensor:
    """Blur the samples whose branch is blur (only those on a CPU, see per_sample)."""
    return per_sample(x, p.branch == 2, subset, lambda v, i: gaussian_blur(v, p.sigma[i], max_sigma))


def flip(x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    return torch.where(chosen.view(-1, 1, 1, 1), x.flip(2), x)


def _pointwise(x: torch.Tensor, flipped: torch.Tensor, branch: torch.Tensor, factors: torch.Tensor,
               order: torch.Tensor, solarize_threshold: float, jitter: bool) -> torch.Tensor:
    """Flip, grayscale, solarize and colour jitter as whole-batch selects: no data-dependent shapes, so
    torch.compile can fuse it into a few passes over memory (see DeviceStage)."""
    x = flip(x, flipped)
    x = torch.where((branch == 0).view(-1, 1, 1, 1), grayscale(x), x)
    x = torch.where((branch == 1).view(-1, 1, 1, 1), solarize(x, solarize_threshold), x)
    return color_jitter(x, factors, order) if jitter else x


def augment(x: torch.Tensor, p: AugParams, *, solarize_threshold: float = 128, max_sigma: float = 2.0,
            color_jitter_on: bool = True) -> torch.Tensor:
    """Flip, 3-Augment, colour jitter on float (B, H, W, 3) in [0, 255]. Blur runs before the flip: a symmetric
    kernel with symmetric edge padding commutes with it, and the branches exclude each other."""
    x = _blur_branch(x, p, max_sigma, subset=x.device.type == "cpu")
    return _pointwise(x, p.flip, p.branch, p.jitter, p.jitter_order, solarize_threshold, color_jitter_on)


def _pointwise_normalized(x, flipped, branch, factors, order, solarize_threshold: float, jitter: bool,
                          scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = _pointwise(x, flipped, branch, factors, order, solarize_threshold, jitter)
    return (x * scale - shift).to(dtype)


class DeviceStage:
    """uint8 batch -> model-ready batch. Training augments; evaluation only converts and normalises.

    Nothing here waits for the device: constants are cached per device, parameters are drawn on it, and the blur
    branch and RandAugment select rather than gather on a GPU. With `compile=True` the pointwise part and
    RandAugment are compiled by torch.compile (inductor): about 3x faster on CPU and fewer kernel launches on GPU,
    for a one-off compilation of tens of seconds."""

    CPU_SLICE = 16

    def __init__(self, aug, train: bool, dtype: torch.dtype = torch.float32, compile: bool = False):
        self.aug, self.train, self.dtype = aug, train, dtype
        self._fused = torch.compile(_pointwise_normalized, dynamic=False) if compile else _pointwise_normalized
        self._consts: dict = {}
        self.randaug = None
        if train and aug.auto_augment:
            from .randaugment import RandAugment

            # timm's create_transform: translate relative to the crop, fill with the mean colour.
            fill = tuple(min(255, round(255 * m)) for m in aug.mean)
            self.randaug = RandAugment(aug.auto_augment, fill, translate_const=int(aug.img_size * 0.45),
                                       compile=compile)

    def _scale_shift(self, device):
        if device not in self._consts:
            self._consts[device] = scale_shift(self.aug.mean, self.aug.std, device)
        return self._consts[device]

    def __call__(self, images: torch.Tensor, g: torch.Generator | None = None):
        if not self.train:
            return normalize(to_float(images), self.dtype, consts=self._scale_shift(images.device)), None
        a = self.aug
        p = draw_params(images.shape[0], g, hflip=a.hflip, three_augment=a.three_augment,
                        blur_sigma=tuple(a.blur_sigma), color_jitter=a.color_jitter)
        if self.randaug is not None:
            p.randaug = self.randaug.draw(images.shape[0], g)
        scale, shift = self._scale_shift(images.device)
        # On a CPU the ~20 passes over a batch run from cache when it is cut into slices (about 2x faster);
        # a GPU takes the whole batch at once. The parameters are drawn for the whole batch either way.
        step = self.CPU_SLICE if images.device.type == "cpu" else len(images)
        out = torch.empty(images.shape, dtype=self.dtype, device=images.device)
        for s in range(0, len(images), step):
            q = p.slice(slice(s, s + step))
            x, flipped = to_float(images[s:s + step]), q.flip
            if q.randaug is not None:  # flip -> RandAugment -> the rest, as timm orders them
                x, flipped = self.randaug(flip(x, q.flip), q.randaug), torch.zeros_like(q.flip)
            x = _blur_branch(x, q, max(a.blur_sigma), subset=images.device.type == "cpu")
            out[s:s + step] = self._fused(x, flipped, q.branch, q.jitter, q.jitter_order, float(a.solarize_threshold),
                                          a.color_jitter > 0, scale, shift, self.dtype)
        return to_model_layout(out), p

"""RandAugment (timm's `rand-*` policies; the fine-tuning recipes' `rand-m9-mstd0.5-inc1`) as batched tensor ops, an op
of the batch augmentation (augment.py): after the primary crop and the flip, as the official fine-tuning transform
applies it.

Semantics are timm's `rand_augment_transform` as timm's `create_transform` builds it for the official fine-tuning
(`--aa rand-m9-mstd0.5-inc1 --train-interpolation bicubic`): timm parses the policy string (so every option it
knows, m, n, p, mstd, mmax, inc, means what it means there), and per image draws `num_layers` ops uniformly with
replacement; each applies with its probability, at magnitude ~ N(m, mstd) clipped to [0, mmax or 10], with a
random sign for the signed ops, filling uncovered pixels with the mean colour, geometric ops bicubic.

Each op reproduces the PIL function timm calls, on integer pixel values held in float32 (NHWC, 0..255, the batch
augmentation's layout; the primitives shared with it are pixels.py's): the colour ops are per-sample lookup tables
(PIL's `point`), or PIL's `Image.blend` (float32 maths, truncated) against PIL's degenerate image; the geometric ops
are one affine warp with PIL's own bicubic (its transform filter is cubic convolution with a = -1, not torch's
-0.75), sampled at PIL's pixel centres. Tolerances are stated by the tests that compare every op with timm's.

One layer is three whole-batch passes, whichever op each sample drew: a lookup table (identity where the sample's op
is not a table op), a blend (factor 1 where not a blend op) and a warp (identity where not geometric) -- each exact
where it does nothing, so the composition is each sample's own op. No shape depends on the data (no host sync,
`torch.compile`-able); on a CPU, where a gather costs no sync, the blend and the warp run on their samples only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from dataset_tools.errors import UserError

from .ops import AugOp, OpParams
from .pixels import device_const, exact_div, grayscale, per_sample, pil_blend, pil_grey, pil_smooth

# The ops timm's RandAugment sets use (_RAND_TRANSFORMS, _RAND_INCREASING_TRANSFORMS and the weighted '0' set).
TABLE_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Posterize",
    "PosterizeIncreasing",
    "PosterizeOriginal",
    "Solarize",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "Contrast",
    "ContrastIncreasing",
    "Brightness",
    "BrightnessIncreasing",
)
BLEND_OPS = ("Color", "ColorIncreasing", "Sharpness", "SharpnessIncreasing")
WARP_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")
SUPPORTED = TABLE_OPS + BLEND_OPS + WARP_OPS
SIGNED = WARP_OPS + ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")


@dataclass
class RandAugParams(OpParams):
    """Per layer and sample (each (layers, B), so the batch is dimension 1): which op of the policy, whether it
    applies, its magnitude after noise and clipping, and whether a signed op's argument is negated."""

    BATCH_DIM: ClassVar[int] = 1
    op: torch.Tensor
    apply: torch.Tensor
    magnitude: torch.Tensor
    negate: torch.Tensor


class RandAugmentError(UserError, ValueError):
    """A RandAugment policy the batch augmentation cannot run (an op it lacks, a string timm cannot parse)."""


class RandAugment(AugOp):
    """`policy` as timm spells it; `fill`: the colour of uncovered pixels (timm: the mean, rounded to 0..255).

    As an op of the batch augmentation (ops.py) it is all eager part, and a barrier: timm flips before it, and its
    warps do not commute with the flip."""

    name = "randaugment"
    barrier = True
    tally_key = "randaug"

    def __init__(self, policy: str, fill: tuple[int, int, int], translate_const: int = 100, compile: bool = False):
        from timm.data.auto_augment import rand_augment_transform

        if not policy.startswith("rand"):
            raise RandAugmentError(
                f"aug.auto_augment {policy!r}: only timm's RandAugment policies (rand-...) run on "
                "the device, e.g. rand-m9-mstd0.5-inc1"
            )
        try:
            t = rand_augment_transform(policy, {"translate_const": translate_const, "img_mean": tuple(fill)})
        except (AssertionError, ValueError, KeyError) as e:
            raise RandAugmentError(
                f"aug.auto_augment {policy!r} is not a policy timm parses ({e or 'bad section'}); "
                "e.g. rand-m9-mstd0.5-inc1"
            ) from None
        self.policy, self.translate_const = policy, translate_const
        self.fill: tuple[float, float, float] = (float(fill[0]), float(fill[1]), float(fill[2]))
        self.names = [op.name for op in t.ops]
        unknown = sorted(set(self.names) - set(SUPPORTED))
        if unknown:
            raise RandAugmentError(
                f"aug.auto_augment {policy!r} uses ops the batch augmentation does not implement: {', '.join(unknown)}"
            )
        first = t.ops[0]
        if t.choice_weights is not None and t.num_layers > len(self.names):
            raise RandAugmentError(
                f"aug.auto_augment {policy!r}: {t.num_layers} ops per image from a weighted set of "
                f"{len(self.names)}, which timm draws without replacement: use n{len(self.names)} "
                "or fewer"
            )
        self.layers, self.prob, self.mean = t.num_layers, first.prob, float(first.magnitude)
        self.std, self.top = first.magnitude_std, float(first.magnitude_max or 10)
        self.weights = None if t.choice_weights is None else torch.tensor(t.choice_weights, dtype=torch.float64)
        self._weights_on: dict = {}
        self.translate_pct = first.hparams.get("translate_pct", 0.45)
        # torch.compile: on a GPU the whole pass (no data-dependent shapes); on a CPU, which takes each op's samples
        # only (their count varies), the warp alone, with dynamic shapes: about 10x faster than eager there.
        self.compile = compile
        self._whole: Callable | None = None
        self._warp: Callable | None = None

    def draw(self, batch: int, g: torch.Generator) -> RandAugParams:
        dev, shape = g.device, (self.layers, batch)
        u = torch.rand(4, *shape, generator=g, device=dev)
        if self.weights is None:  # timm: np.random.choice with replacement
            op = (u[0] * len(self.names)).long().clamp_(max=len(self.names) - 1)
        else:  # timm: weighted choice without replacement = Gumbel top-k
            gumbel = -torch.log(-torch.log(torch.rand(batch, len(self.names), generator=g, device=dev)))
            op = (self._log_weights(dev) + gumbel).topk(self.layers, dim=1).indices.T
        noise = torch.randn(shape, generator=g, device=dev)
        if self.std == float("inf"):
            magnitude = self.mean * u[3]
        else:
            magnitude = self.mean + self.std * noise if self.std > 0 else torch.full(shape, self.mean, device=dev)
        # timm skips an op when random() > prob, and negates when random() > 0.5.
        return RandAugParams(op, u[1] <= self.prob, magnitude.clamp(0, self.top), u[2] > 0.5)

    def _log_weights(self, device: torch.device) -> torch.Tensor:
        """The weighted choice's log-weights on `device`, copied once (a copy per batch would wait for the device)."""
        if device not in self._weights_on:
            assert self.weights is not None  # only the weighted choice asks
            self._weights_on[device] = self.weights.log().float().to(device)
        return self._weights_on[device]

    def describe(self, p: RandAugParams, sample: int) -> str:
        """What sample `sample` went through, for captions: 'Rotate 9.3, Equalize' (ops skipped by p left out)."""
        parts = []
        for layer in range(p.op.shape[0]):
            if bool(p.apply[layer, sample]):
                name = self.names[int(p.op[layer, sample])]
                m = float(p.magnitude[layer, sample])
                sign = "-" if name in SIGNED and bool(p.negate[layer, sample]) else ""
                parts.append(name if name in ("AutoContrast", "Equalize", "Invert") else f"{name} {sign}{m:.1f}")
        return ", ".join(parts) or "no op"

    def tally(self, p: RandAugParams) -> dict[str, int]:
        """How many times each op of the policy applied in the batch (ops that never did left out)."""
        applied = p.op[p.apply]
        return {n: int((applied == i).sum()) for i, n in enumerate(self.names) if (applied == i).any()}

    def eager(self, x: torch.Tensor, p: RandAugParams) -> torch.Tensor:
        return self(x, p)

    def __call__(self, x: torch.Tensor, p: RandAugParams) -> torch.Tensor:
        """float (B, H, W, 3) integer-valued in [0, 255] -> the same, every sample through its own ops."""
        subset = x.device.type == "cpu"
        if self.compile and not subset:
            self._whole = self._whole or torch.compile(self.apply, dynamic=False)
            return self._whole(x, p, subset)
        return self.apply(x, p, subset)

    def apply(self, x: torch.Tensor, p: RandAugParams, subset: bool) -> torch.Tensor:
        for layer in range(p.op.shape[0]):
            x = self.layer(x, p.op[layer], p.apply[layer], p.magnitude[layer], p.negate[layer], subset)
        return x

    def warp(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        if self.compile and x.device.type == "cpu":
            self._warp = self._warp or torch.compile(warp_affine, dynamic=True)
            return self._warp(x, matrix, self.fill)
        return warp_affine(x, matrix, self.fill)

    # ---- one layer ---------------------------------------------------------------------------------------------

    def _kind(self, op: torch.Tensor, apply: torch.Tensor, names) -> tuple[torch.Tensor, list]:
        """Samples whose applied op is one of `names`, and each such name of the policy with its sample mask."""
        chosen = [(n, (op == i) & apply) for i, n in enumerate(self.names) if n in names]
        any_ = torch.zeros_like(apply)
        for _, m in chosen:
            any_ = any_ | m
        return any_, chosen

    def layer(self, x, op, apply, magnitude, negate, subset: bool) -> torch.Tensor:
        m, neg = magnitude.double(), negate
        _, tables = self._kind(op, apply, TABLE_OPS)
        if tables:
            x = _apply_table(x, self._table(x, m, neg, tables))
        blend_on, blends = self._kind(op, apply, BLEND_OPS)
        if blends:
            factor = torch.ones_like(m)
            sharp = torch.zeros_like(apply)
            for name, mask in blends:
                factor = torch.where(mask, _level(name, m, neg, self), factor)
                if name.startswith("Sharpness"):
                    sharp = sharp | mask
            x = per_sample(
                x, blend_on, subset, lambda v, i: _blend_color_or_sharpness(v, factor[i].float(), sharp[i], subset)
            )
        warp_on, warps = self._kind(op, apply, WARP_OPS)
        if warps:
            matrix = device_const((1.0, 0, 0, 0, 1, 0), x.device, torch.float64).expand(len(x), 6)
            h, w = x.shape[1:3]
            for name, mask in warps:
                matrix = torch.where(mask[:, None], _affine(name, _level(name, m, neg, self), h, w), matrix)
            x = per_sample(x, warp_on, subset, lambda v, i: self.warp(v, matrix[i]))
        return x

    def _table(self, x, m, neg, tables) -> torch.Tensor:
        """(B, 3, 256) lookup table: each sample's table op (identity where its op is none of them)."""
        b = len(x)
        ramp = torch.arange(256, device=x.device, dtype=torch.float64)
        lut = ramp.expand(b, 3, 256)
        names = {n for n, _ in tables}
        # The tables' maths is PIL's float64 (counts are exact in it).
        hist = _histogram(x).double() if names & {"AutoContrast", "Equalize"} else None
        for name, mask in tables:
            if name == "AutoContrast":
                assert hist is not None  # computed above whenever a table op is in `tables`
                t = _autocontrast_table(hist)
            elif name == "Equalize":
                assert hist is not None
                t = _equalize_table(hist)
            elif name == "Invert":
                t = (255 - ramp).expand(b, 3, 256)
            elif name.startswith("Posterize"):
                bits = _level(name, m, neg, self).clamp(0, 8)
                # PIL keeps the top `bits` bits; 0 bits is a black image (Pillow 13 refuses 0, older Pillow gave black).
                unit = torch.exp2(8 - bits)[:, None, None]
                t = torch.floor(ramp / unit) * unit
                t = torch.where(bits[:, None, None] <= 0, torch.zeros_like(t), t)
            elif name in ("Solarize", "SolarizeIncreasing"):
                thresh = _level(name, m, neg, self)[:, None, None]
                t = torch.where(ramp < thresh, ramp, 255 - ramp)
            elif name == "SolarizeAdd":
                add = _level(name, m, neg, self)[:, None, None]
                t = torch.where(ramp < 128, (ramp + add).clamp(max=255), ramp)
            else:  # Contrast / Brightness: Image.blend against a flat degenerate image (the grey mean, or black)
                f = _level(name, m, neg, self).float()[:, None, None]
                if name.startswith("Contrast"):
                    grey = pil_grey(x)
                    mean = exact_div(grey.sum(dim=(1, 2), dtype=torch.float64), grey[0].numel())
                    d = torch.floor(mean + 0.5).float()[:, None, None]
                else:
                    d = torch.zeros_like(f)
                t = pil_blend(d, ramp.float(), f).double()
            lut = torch.where(mask[:, None, None], t.expand(b, 3, 256), lut)
        return lut.float()


# ---- level -> argument (timm's LEVEL_TO_ARG, in float64 as Python computes it) ------------------------------------


def _level(name: str, m: torch.Tensor, neg: torch.Tensor, ra: RandAugment) -> torch.Tensor:
    def signed(v):
        return torch.where(neg, -v, v)

    base = name.removesuffix("Increasing")
    if name == "Rotate":
        return signed(exact_div(m, 10) * 30.0)
    if name in ("ShearX", "ShearY"):
        return signed(exact_div(m, 10) * 0.3)
    if name in ("TranslateXRel", "TranslateYRel"):
        return signed(exact_div(m, 10) * ra.translate_pct)
    if name in ("TranslateX", "TranslateY"):
        return signed(exact_div(m, 10) * float(ra.translate_const))
    if name == "Posterize":
        return torch.floor(exact_div(m, 10) * 4)
    if name == "PosterizeIncreasing":
        return 4 - torch.floor(exact_div(m, 10) * 4)
    if name == "PosterizeOriginal":
        return torch.floor(exact_div(m, 10) * 4) + 4
    if name == "Solarize":
        return torch.floor(exact_div(m, 10) * 256).clamp(max=256)
    if name == "SolarizeIncreasing":
        return 256 - torch.floor(exact_div(m, 10) * 256).clamp(max=256)
    if name == "SolarizeAdd":
        return torch.floor(exact_div(m, 10) * 110).clamp(max=128)
    if base in ("Color", "Contrast", "Brightness", "Sharpness"):
        if name.endswith("Increasing"):
            return (1.0 + signed(exact_div(m, 10) * 0.9)).clamp(min=0.1)
        return exact_div(m, 10) * 1.8 + 0.1
    raise KeyError(name)


# ---- tables -------------------------------------------------------------------------------------------------------


def _histogram(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, 256) pixel counts per sample and channel, counted in int32: exact (to 2^31 pixels), and on a GPU the
    scatter's atomic adds are 32-bit integer ones, half the width of float64's, on bins every thread of a flat image
    hits."""
    b = len(x)
    idx = x.long().view(b, -1, 3) + torch.arange(0, 768, 256, device=x.device)
    ones = torch.ones(1, device=x.device, dtype=torch.int32).expand(b, idx.numel() // b)
    return (
        torch.zeros(b, 768, device=x.device, dtype=torch.int32).scatter_add_(1, idx.view(b, -1), ones).view(b, 3, 256)
    )


def _apply_table(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """out[b, h, w, c] = lut[b, c, x[b, h, w, c]] (PIL's Image.point)."""
    b = len(x)
    idx = x.long().view(b, -1, 3) + torch.arange(0, 768, 256, device=x.device)
    return lut.reshape(b, 768).gather(1, idx.view(b, -1)).view_as(x)


def _autocontrast_table(hist: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast (cutoff 0): per channel, [lo, hi] stretched to [0, 255], int() of float64 maths."""
    ramp = torch.arange(256, device=hist.device, dtype=torch.float64)
    present = hist > 0
    lo = torch.where(present, ramp, 256.0).amin(-1, keepdim=True)
    hi = torch.where(present, ramp, -1.0).amax(-1, keepdim=True)
    scale = exact_div(torch.full_like(hi, 255.0), (hi - lo).clamp(min=1))
    t = torch.floor(ramp * scale + (-lo * scale)).clamp(0, 255)  # int() truncates; clamping makes it a floor
    return torch.where(hi <= lo, ramp, t)


def _equalize_table(hist: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize: step = (pixels - count of the last used level) // 255; lut[i] = (step // 2 + pixels below
    i) // step; identity when at most one level is used or step is 0."""
    ramp = torch.arange(256, device=hist.device, dtype=torch.float64)
    last = torch.where(hist > 0, ramp, -1.0).argmax(-1, keepdim=True)
    step = torch.floor(exact_div(hist.sum(-1, keepdim=True) - hist.gather(-1, last), 255))
    below = hist.cumsum(-1) - hist
    t = torch.floor((torch.floor(exact_div(step, 2)) + below) / step.clamp(min=1)).clamp(max=255)
    keep = ((hist > 0).sum(-1, keepdim=True) <= 1) | (step == 0)
    return torch.where(keep, ramp, t)


# ---- blends -------------------------------------------------------------------------------------------------------


def _blend_color_or_sharpness(x: torch.Tensor, factor: torch.Tensor, sharp: torch.Tensor, look: bool) -> torch.Tensor:
    """ImageEnhance.Color (against the grey image) or .Sharpness (against SMOOTH), per sample."""
    grey = grayscale(x)
    if look and not sharp.any():  # on a CPU looking costs no sync: skip the filter when nobody sharpens
        return pil_blend(grey, x, factor.view(-1, 1, 1, 1))
    degenerate = torch.where(sharp.view(-1, 1, 1, 1), pil_smooth(x), grey)
    return pil_blend(degenerate, x, factor.view(-1, 1, 1, 1))


# ---- warps --------------------------------------------------------------------------------------------------------


def _affine(name: str, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """PIL's AFFINE data (a, b, c, d, e, f), per sample: output pixel centre (x, y) reads input (ax+by+c, dx+ey+f)."""
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    if name == "ShearX":
        return torch.stack([one, v, zero, zero, one, zero], 1)
    if name == "ShearY":
        return torch.stack([one, zero, zero, v, one, zero], 1)
    if name in ("TranslateX", "TranslateXRel"):
        px = v * w if name.endswith("Rel") else v
        return torch.stack([one, zero, px, zero, one, zero], 1)
    if name in ("TranslateY", "TranslateYRel"):
        px = v * h if name.endswith("Rel") else v
        return torch.stack([one, zero, zero, zero, one, px], 1)
    # Image.rotate(deg) about the centre (w / 2, h / 2), without expanding.
    angle = -v * (math.pi / 180)
    a, b = torch.cos(angle), torch.sin(angle)
    cx, cy = w / 2, h / 2
    return torch.stack([a, b, a * -cx + b * -cy + cx, -b, a, -b * -cx + a * -cy + cy], 1)


def _cubic_weights(d: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """PIL's transform bicubic (Geometry.c): cubic convolution with a = -1, taps at -1, 0, 1, 2."""
    d2, d3 = d * d, d * d * d
    return -d + 2 * d2 - d3, 1 - 2 * d2 + d3, d + d2 - d3, -d2 + d3


def warp_affine(x: torch.Tensor, matrix: torch.Tensor, fill: tuple[float, float, float]) -> torch.Tensor:
    """Image.transform(size, AFFINE, matrix, BICUBIC, fillcolor=fill) per sample: output pixel centre (x + 0.5,
    y + 0.5) maps to an input point; outside the image it is `fill`, inside the 4x4 neighbours (clamped to the image)
    are weighted with PIL's cubic and the result is truncated into 0..255, as PIL does."""
    b, h, w, c = x.shape
    dev = x.device
    # Source coordinates in float64, as PIL computes them: in float32 a point within ~1e-5 of the border could
    # land on the other side of PIL's inside test (fill colour vs an interpolated pixel).
    mat = matrix.double().view(b, 6, 1, 1)
    ys = (torch.arange(h, device=dev, dtype=torch.float64) + 0.5).view(1, h, 1)
    xs = (torch.arange(w, device=dev, dtype=torch.float64) + 0.5).view(1, 1, w)
    sx = mat[:, 0] * xs + mat[:, 1] * ys + mat[:, 2]
    sy = mat[:, 3] * xs + mat[:, 4] * ys + mat[:, 5]
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    fx, fy = torch.floor(sx - 0.5), torch.floor(sy - 0.5)
    wx, wy = _cubic_weights((sx - 0.5 - fx).float()), _cubic_weights((sy - 0.5 - fy).float())
    flat = x.reshape(b, h * w, c)
    out = torch.zeros_like(x)
    for j in range(4):
        row = (fy + (j - 1)).clamp(0, h - 1).long() * w
        acc = torch.zeros_like(x)
        for i in range(4):
            col = (fx + (i - 1)).clamp(0, w - 1).long()
            tap = flat.gather(1, (row + col).view(b, -1, 1).expand(-1, -1, c)).view(b, h, w, c)
            acc = acc + wx[i].unsqueeze(-1) * tap
        out = out + wy[j].unsqueeze(-1) * acc
    out = torch.floor(out.clamp(0, 255))
    return torch.where(inside.unsqueeze(-1), out, device_const(fill, dev, x.dtype))

"""`BatchAugment`: batched DeiT III augmentation after the primary crop, one implementation for every engine and
for the CPU as for a GPU.

Input: uint8 (B, H, W, 3) on any device (what an engine yields). Output: float (B, 3, H, W) in channels-last memory,
normalised, in the requested dtype. Internally everything is NHWC, so a pixel's three channels are adjacent (grey
values are one small matmul) and the channels-last output is a free permute. Training applies, per sample, as
the official `new_data_aug_generator`: horizontal flip -> exactly one of grayscale | solarize | Gaussian blur
(3-Augment) -> colour jitter (brightness, contrast, saturation in random order) -> normalise. The fine-tuning
recipes' RandAugment (`aug.auto_augment`, randaugment.py) comes right after the flip, as in timm's transform.

Each of these is an op (ops.py: `draw`, then `eager` and/or `pointwise` parts), composed in `train_ops`, one line
per op. Each op draws its parameters for a batch from its own generator, keyed by the batch key and the op's name
(ops.py states the contract): adding an op leaves every other op's draws unchanged. The parameters are returned as
`AugParams` (op name -> that op's parameters), so previews and tests can see which branch and which RandAugment
ops each sample took. The pixel maths itself is in pixels.py; values stay on the 0..255 scale until normalisation,
so thresholds and the integer grayscale formula are PIL's exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import IMAGENET_MEAN, IMAGENET_STD
from .ops import AugOp, AugParams, OpParams, draw
from .pixels import TV_GREY, flip, gaussian_blur, grayscale, per_sample, solarize, tv_blend, weighted_grey
from .randaugment import RandAugment

BRANCHES = ("grayscale", "solarize", "blur")
JITTER_OPS = ("brightness", "contrast", "saturation")


# ---- the ops -------------------------------------------------------------------------------------------------------


@dataclass
class FlipParams(OpParams):
    flip: torch.Tensor  # (B,) bool


class Flip(AugOp):
    name = "flip"

    def __init__(self, p: float):
        self.p = p

    def draw(self, batch: int, g: torch.Generator) -> FlipParams:
        return FlipParams(torch.rand(batch, generator=g, device=g.device) < self.p)

    def pointwise(self, x: torch.Tensor, p: FlipParams) -> torch.Tensor:
        return flip(x, p.flip)

    def describe(self, p: FlipParams, sample: int) -> str:
        return "+flip" if bool(p.flip[sample]) else ""


@dataclass
class ThreeAugmentParams(OpParams):
    branch: torch.Tensor  # (B,) long: index into BRANCHES
    sigma: torch.Tensor  # (B,) blur sigma (used where branch == blur)


class ThreeAugment(AugOp):
    """Exactly one of grayscale | solarize | blur per sample. The blur is the eager part: it runs before the flip, a
    symmetric kernel with symmetric edge padding commuting with it, and the branches exclude each other."""

    name = "three_augment"
    tally_key = "branches"

    def __init__(self, blur_sigma: tuple[float, float], solarize_threshold: float = 128):
        self.blur_sigma, self.threshold = tuple(blur_sigma), float(solarize_threshold)

    def draw(self, batch: int, g: torch.Generator) -> ThreeAugmentParams:
        u = torch.rand(batch, 2, generator=g, device=g.device)
        lo, hi = self.blur_sigma
        return ThreeAugmentParams(branch=(u[:, 0] * 3).long().clamp_(max=2), sigma=lo + (hi - lo) * u[:, 1])

    def eager(self, x: torch.Tensor, p: ThreeAugmentParams) -> torch.Tensor:
        return self.blur(x, p, subset=x.device.type == "cpu")

    def blur(self, x: torch.Tensor, p: ThreeAugmentParams, subset: bool) -> torch.Tensor:
        """Blur the samples whose branch is blur (only those with `subset`, a CPU: see per_sample)."""
        return per_sample(x, p.branch == 2, subset, lambda v, i: gaussian_blur(v, p.sigma[i], max(self.blur_sigma)))

    def pointwise(self, x: torch.Tensor, p: ThreeAugmentParams) -> torch.Tensor:
        x = torch.where((p.branch == 0).view(-1, 1, 1, 1), grayscale(x), x)
        return torch.where((p.branch == 1).view(-1, 1, 1, 1), solarize(x, self.threshold), x)

    def describe(self, p: ThreeAugmentParams, sample: int) -> str:
        return BRANCHES[int(p.branch[sample])]

    def tally(self, p: ThreeAugmentParams) -> dict[str, int]:
        return {b: int((p.branch == i).sum()) for i, b in enumerate(BRANCHES)}


@dataclass
class ColorJitterParams(OpParams):
    factors: torch.Tensor  # (B, 3) brightness, contrast, saturation factors
    order: torch.Tensor  # (B, 3) permutation of JITTER_OPS per sample


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Each sample gets its three adjustments in its own order (torchvision ColorJitter draws a permutation).

    All three are torchvision blends `clamp(f * x + (1 - f) * other)`, other = 0 (brightness), the mean of the
    grey image (contrast) or the grey image (saturation); so each step is one blend with a per-sample `other`,
    not every op on every sample."""
    for pos in range(3):
        op = order[:, pos].view(-1, 1, 1, 1)
        f = factors.gather(1, order[:, pos : pos + 1]).to(x.dtype).view(-1, 1, 1, 1)
        grey = weighted_grey(x, TV_GREY).unsqueeze(-1)
        other = torch.where(op == 1, grey.mean(dim=(1, 2), keepdim=True), grey) * (op != 0)
        x = tv_blend(x, other, f)
    return x


class ColorJitter(AugOp):
    """Brightness, contrast and saturation factors ~ U(1 - s, 1 + s), in a random order per sample."""

    name = "color_jitter"

    def __init__(self, strength: float):
        self.strength = strength

    def draw(self, batch: int, g: torch.Generator) -> ColorJitterParams:
        u = torch.rand(batch, 3, generator=g, device=g.device)
        order = torch.argsort(torch.rand(batch, 3, generator=g, device=g.device), dim=1)
        return ColorJitterParams(factors=1 + self.strength * (2 * u - 1), order=order)

    def pointwise(self, x: torch.Tensor, p: ColorJitterParams) -> torch.Tensor:
        return color_jitter(x, p.factors, p.order)


def train_ops(aug, compile: bool = False) -> list[AugOp]:
    """The training ops of `aug` in the official order, one line each. An op that is off is left out: it draws
    nothing and costs nothing, and the other ops draw what they would anyway (each has its own stream)."""
    # timm's create_transform: RandAugment translates relative to the crop and fills with the mean colour.
    fill = tuple(min(255, round(255 * m)) for m in aug.mean)
    ops: list[AugOp] = []
    if aug.hflip > 0:
        ops.append(Flip(aug.hflip))
    if aug.auto_augment:
        ops.append(RandAugment(aug.auto_augment, fill, translate_const=int(aug.img_size * 0.45), compile=compile))
    if aug.three_augment:
        ops.append(ThreeAugment(tuple(aug.blur_sigma), aug.solarize_threshold))
    if aug.color_jitter > 0:
        ops.append(ColorJitter(aug.color_jitter))
    return ops


def augment(x: torch.Tensor, ops, p: AugParams) -> torch.Tensor:
    """The reference composition on float (B, H, W, 3) in [0, 255]: each op in full (eager part, then pointwise part),
    one after the other, whole batch, nothing fused. BatchAugment computes the same, faster."""
    for op in ops:
        x = op.pointwise(op.eager(x, p[op.name]), p[op.name])
    return x


# ---- conversions ---------------------------------------------------------------------------------------------------


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, H, W, 3), the layout every operation works in."""
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


def normalize(
    x: torch.Tensor,
    dtype: torch.dtype,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    consts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    scale, shift = consts if consts is not None else scale_shift(mean, std, x.device)
    return to_model_layout((x * scale - shift).to(dtype))


# ---- the composition -----------------------------------------------------------------------------------------------


def fuse(ops):
    """One function applying the pointwise parts of `ops` in order, then normalising: what torch.compile fuses into a
    few passes over memory (each op's part is a closure over its settings; its parameters are arguments)."""
    ops = tuple(ops)

    def pointwise_normalized(
        x: torch.Tensor, params: list, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        for op, p in zip(ops, params):
            x = op.pointwise(x, p)
        return (x * scale - shift).to(dtype)

    return pointwise_normalized


class BatchAugment:
    """uint8 batch -> model-ready batch. Training augments with `ops` (default: `train_ops(aug)`); evaluation only
    converts and normalises. Runs on whatever device the batch is on.

    Nothing here waits for the device: constants are cached per device, parameters are drawn on it, and the blur
    branch and RandAugment select rather than gather on a GPU. With `compile=True` the fused pointwise part and
    RandAugment are compiled by torch.compile (inductor): about 3x faster on CPU and fewer kernel launches on GPU,
    for a one-off compilation of tens of seconds."""

    CPU_SLICE = 16

    def __init__(self, aug, train: bool, dtype: torch.dtype = torch.float32, compile: bool = False, ops=None):
        self.aug, self.train, self.dtype = aug, train, dtype
        self.ops: list[AugOp] = list(ops if ops is not None else train_ops(aug, compile)) if train else []
        names = [op.name for op in self.ops]
        if len(set(names)) != len(names):  # a shared name would be a shared random stream (ops.py)
            raise ValueError(f"two augmentation ops share a name (their random stream): {names}")
        # Ops up to the last barrier run in full, unfused, before it; from it on, eager parts then one fused pass.
        last = max((i for i, op in enumerate(self.ops) if op.barrier), default=0)
        self._head, self._tail = self.ops[:last], self.ops[last:]
        self._eager_fused = fuse(self._tail)
        self._fused = torch.compile(self._eager_fused, dynamic=False) if compile else self._eager_fused
        self._consts: dict = {}

    @property
    def compiled(self) -> bool:
        return self._fused is not self._eager_fused

    def op(self, name: str) -> AugOp | None:
        """The op called `name`, or None when this BatchAugment does not run it."""
        return next((op for op in self.ops if op.name == name), None)

    def _scale_shift(self, device):
        if device not in self._consts:
            self._consts[device] = scale_shift(self.aug.mean, self.aug.std, device)
        return self._consts[device]

    def draw(self, batch: int, key, device: torch.device) -> AugParams:
        """Every op's parameters for a batch of `batch` with batch key `key` (each op from its own stream)."""
        return draw(self.ops, batch, key, torch.device(device))

    def __call__(self, images: torch.Tensor, key=None):
        """`key`: the batch's key (the loader's keys.combine(epoch key, batch index)); unused in evaluation.
        Returns the batch and its AugParams (None in evaluation)."""
        if not self.train:
            return normalize(to_float(images), self.dtype, consts=self._scale_shift(images.device)), None
        p = self.draw(images.shape[0], key, images.device)
        scale, shift = self._scale_shift(images.device)
        # On a CPU the ~20 passes over a batch run from cache when it is cut into slices (about 2x faster);
        # a GPU takes the whole batch at once. The parameters are drawn for the whole batch either way.
        step = self.CPU_SLICE if images.device.type == "cpu" else len(images)
        out = torch.empty(images.shape, dtype=self.dtype, device=images.device)
        for s in range(0, len(images), step):
            q = p.slice(slice(s, s + step))
            x = to_float(images[s : s + step])
            for op in self._head:  # before a barrier (RandAugment after the flip, as timm orders them)
                x = op.pointwise(op.eager(x, q[op.name]), q[op.name])
            for op in self._tail:
                x = op.eager(x, q[op.name])
            out[s : s + step] = self._fused(x, [q[op.name] for op in self._tail], scale, shift, self.dtype)
        return to_model_layout(out), p

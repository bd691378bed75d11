"""A PNG grid of augmented training samples, captioned with what each augmentation op did to each (the 3-Augment
branch, the flip, the RandAugment ops; the ops describe and count their own parameters, ops.AugOp) and with the mix
the tile shows (its kind, lambda and partner, from the mixing's own draw, mix.MixDraw)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Smaller images are enlarged (by a whole factor, nearest neighbour: the model's pixels stay visible) to at least this
# many pixels a side, so that a caption of a few words fits under its tile.
MIN_TILE = 128
_FONT = ImageFont.load_default()
_LINE_H = 12


def denormalize(x: torch.Tensor, mean, std) -> np.ndarray:
    """Model input (B, 3, H, W) back to uint8 (B, H, W, 3)."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    img = (x.float().cpu() * s + m).clamp(0, 1) * 255
    return img.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _classes(t: torch.Tensor) -> str:
    if not t.ndim:
        return str(int(t))
    # Soft targets without a mixing draw: the classes above the smoothing floor, heaviest first.
    above = (t > t.min()).nonzero().flatten().tolist()
    return " + ".join(str(c) for c in sorted(above, key=lambda c: -float(t[c]))[:3])


def _mix_lines(mix, i: int) -> list[str]:
    """The tile's mix and its classes: own class starred, weighted lam, the partner's class 1 - lam. 'lam', not the
    Greek letter: PIL's default font has no glyph for it."""
    own = int(mix.labels[i])
    if mix.kind == "none":
        return ["no mix", f"y={own}"]
    j = int(mix.partner[i])
    other = int(mix.labels[j])
    classes = f"y={own}* (1.00)" if other == own else f"y={own}* ({mix.lam:.2f}) + {other} ({1 - mix.lam:.2f})"
    return [f"{mix.kind} lam={mix.lam:.2f} with #{j}", classes]


def captions(params, targets: torch.Tensor, ops=(), mix=None) -> list[str]:
    """Lines per sample: what each op of `ops` says it did to it (ops.AugOp.describe: the 3-Augment branch, the flip,
    the RandAugment ops with magnitudes), then, from `mix` (mix.MixDraw, None when nothing is mixed), the mix the tile
    shows, then its classes (`y=`, the sample's own class starred, each with its weight, when mixed)."""
    out = []
    for i in range(len(targets)):
        lines = []
        if params is not None:
            text = " ".join(d for d in (op.describe(params[op.name], i) for op in ops if op.name in params) if d)
            lines.append(text or "no op")
        lines += _mix_lines(mix, i) if mix is not None else [f"y={_classes(targets[i])}"]
        out.append("\n".join(lines))
    return out


def _wrap(text: str, width: int) -> list[str]:
    """`text`'s lines, each cut at spaces so that it fits `width` pixels (a single longer word stays whole)."""
    out = []
    for line in text.split("\n"):
        words, cur = line.split(" "), ""
        for w in words:
            trial = f"{cur} {w}" if cur else w
            if cur and _FONT.getlength(trial) > width:
                out.append(cur)
                cur = w
            else:
                cur = trial
        out.append(cur)
    return out


def grid(images: np.ndarray, texts: list[str], columns: int = 8) -> Image.Image:
    n, h, w, _ = images.shape
    scale = max(1, math.ceil(MIN_TILE / min(h, w)))
    th, tw = h * scale, w * scale
    lines = [_wrap(t, tw - 4) for t in texts]
    caption_h = max(len(x) for x in lines) * _LINE_H + 4
    rows = (n + columns - 1) // columns
    canvas = Image.new("RGB", (columns * tw, rows * (th + caption_h)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k in range(n):
        r, c = divmod(k, columns)
        x, y = c * tw, r * (th + caption_h)
        tile = Image.fromarray(images[k])
        canvas.paste(tile.resize((tw, th), Image.Resampling.NEAREST) if scale > 1 else tile, (x, y))
        for m, line in enumerate(lines[k]):
            draw.text((x + 2, y + th + 2 + m * _LINE_H), line, fill=(0, 0, 0), font=_FONT)
    return canvas


def make_preview(loader, mean, std, out_path: str, columns: int = 8) -> dict:
    x, y, params, mix = next(iter(loader.iter_with_params()))
    # The reference engine augments on the host and records nothing per sample: its grid has no captions of ops.
    ops = loader.augment.ops if loader.augment is not None else ()
    texts = captions(params, y, ops, mix)
    grid(denormalize(x, mean, std), texts, columns).save(out_path)
    # "branches" always (empty without 3-Augment), then each op's own counts under its tally_key.
    info: dict = {"path": out_path, "samples": len(x), "branches": {}, "mix": "none" if mix is None else mix.kind}
    if mix is not None and mix.kind != "none":
        info["lam"] = round(mix.lam, 4)
    if params is not None:
        info.update({op.tally_key: op.tally(params[op.name]) for op in ops if op.tally_key and op.name in params})
    info["captions"] = texts
    return info

"""A PNG grid of augmented training samples, captioned with what each augmentation op did to each (the 3-Augment
branch, the flip, the RandAugment ops); the ops describe and count their own parameters (ops.AugOp)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw


def denormalize(x: torch.Tensor, mean, std) -> np.ndarray:
    """Model input (B, 3, H, W) back to uint8 (B, H, W, 3)."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    img = (x.float().cpu() * s + m).clamp(0, 1) * 255
    return img.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def captions(params, targets: torch.Tensor, ops=()) -> list[str]:
    """One line per sample: what each op of `ops` says it did to it (ops.AugOp.describe: the 3-Augment branch, the
    flip, the RandAugment ops with magnitudes), then its target classes."""
    out = []
    for i in range(len(targets)):
        text = ""
        if params is not None:
            text = " ".join(d for d in (op.describe(params[op.name], i) for op in ops if op.name in params) if d)
            text = text or "no op"
        t = targets[i]
        # Soft targets: the classes above the smoothing floor (every class gets label_smoothing / classes).
        classes = [int(c) for c in (t > t.min()).nonzero().flatten()] if t.ndim else [int(t)]
        out.append(f"{text}\ny={','.join(map(str, classes[:3]))}")
    return out


def grid(images: np.ndarray, texts: list[str], columns: int = 8, caption_h: int = 26) -> Image.Image:
    n, h, w, _ = images.shape
    rows = (n + columns - 1) // columns
    canvas = Image.new("RGB", (columns * w, rows * (h + caption_h)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k in range(n):
        r, c = divmod(k, columns)
        canvas.paste(Image.fromarray(images[k]), (c * w, r * (h + caption_h)))
        draw.text((c * w + 2, r * (h + caption_h) + h + 1), texts[k], fill=(0, 0, 0))
    return canvas


def make_preview(loader, mean, std, out_path: str, columns: int = 8) -> dict:
    x, y, params = next(iter(loader.iter_with_params()))
    # The reference engine augments on the host and records nothing per sample: its grid has no captions of ops.
    ops = loader.augment.ops if loader.augment is not None else ()
    grid(denormalize(x, mean, std), captions(params, y, ops), columns).save(out_path)
    # "branches" always (empty without 3-Augment), then each op's own counts under its tally_key.
    info = {"path": out_path, "samples": len(x), "branches": {}}
    if params is not None:
        info.update({op.tally_key: op.tally(params[op.name]) for op in ops if op.tally_key and op.name in params})
    return info

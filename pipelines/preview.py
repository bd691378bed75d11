"""A PNG grid of augmented training samples, captioned with the 3-Augment branch and the RandAugment ops each one
took."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from .augment import BRANCHES


def denormalize(x: torch.Tensor, mean, std) -> np.ndarray:
    """Model input (B, 3, H, W) back to uint8 (B, H, W, 3)."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    img = (x.float().cpu() * s + m).clamp(0, 1) * 255
    return img.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def captions(params, targets: torch.Tensor, randaug=None) -> list[str]:
    """One line per sample: its 3-Augment branch, flip, RandAugment ops (with magnitudes) and target classes."""
    out = []
    for i in range(len(targets)):
        branch = int(params.branch[i]) if params is not None else -1
        text = BRANCHES[branch] if branch >= 0 else ("" if randaug is not None else "no 3-Aug")
        if params is not None and bool(params.flip[i]):
            text += " +flip"
        if randaug is not None and params is not None and params.randaug is not None:
            text = f"{text} {randaug.describe(params.randaug, i)}".strip()
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
    texts = captions(params, y, getattr(loader.stage, "randaug", None))
    grid(denormalize(x, mean, std), texts, columns).save(out_path)
    counts = {b: int((params.branch == i).sum()) for i, b in enumerate(BRANCHES)} if params is not None else {}
    info = {"path": out_path, "samples": len(x), "branches": counts}
    randaug = getattr(loader.stage, "randaug", None)
    if randaug is not None and params is not None:
        applied = params.randaug.op[params.randaug.apply]
        info["randaug"] = {n: int((applied == i).sum()) for i, n in enumerate(randaug.names) if (applied == i).any()}
    return info

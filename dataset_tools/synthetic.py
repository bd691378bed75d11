"""Small generated ImageFolder trees: the quickstart's embedded data set, and test data with every bad-input kind.

Each class is recognisable by colour and shape, so a small ViT can learn it in a few CPU minutes; sizes and
aspect ratios vary like photographs do, so crop and resize code paths are exercised.
"""

from __future__ import annotations

import colorsys
import os

import numpy as np
from PIL import Image, ImageDraw


def class_image(label: int, num_classes: int, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """An RGB image of class `label`: hue from the label, one of four shapes, noisy texture, random placement."""
    w, h = size
    hue = label / num_classes
    bg = np.array(colorsys.hsv_to_rgb(hue, 0.35 + 0.3 * rng.random(), 0.45 + 0.4 * rng.random())) * 255
    pixels = bg + rng.normal(0, 18, size=(h, w, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    fg = tuple(int(c * 255) for c in colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.9, 0.95))
    s = int(min(w, h) * (0.35 + 0.3 * rng.random()))
    x0, y0 = int(rng.integers(0, max(1, w - s))), int(rng.integers(0, max(1, h - s)))
    shape = label % 4
    if shape == 0:
        draw.ellipse([x0, y0, x0 + s, y0 + s], fill=fg)
    elif shape == 1:
        draw.rectangle([x0, y0, x0 + s, y0 + s], fill=fg)
    elif shape == 2:
        draw.polygon([(x0 + s // 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=fg)
    else:
        for k in range(0, s, max(2, s // 6)):
            draw.rectangle([x0 + k, y0, x0 + k + max(1, s // 12), y0 + s], fill=fg)
    return img


def make_imagefolder(
    root: str | os.PathLike,
    num_classes: int = 10,
    per_class: int = 20,
    *,
    seed: int = 0,
    min_side: int = 48,
    max_side: int = 160,
    quality: int = 92,
) -> list[str]:
    """Write `root/class_XX/img_YYYY.JPEG` and return the class names (sorted = label order)."""
    rng = np.random.default_rng(seed)
    classes = [f"class_{k:02d}" for k in range(num_classes)]
    for label, name in enumerate(classes):
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            size = (int(rng.integers(min_side, max_side + 1)), int(rng.integers(min_side, max_side + 1)))
            class_image(label, num_classes, rng, size).save(os.path.join(d, f"img_{i:04d}.JPEG"), quality=quality)
    return classes


def add_bad_inputs(root: str | os.PathLike, good_jpeg: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Add every bad-input kind deit3-convert must handle to an existing tree.

    Returns {"skipped": {relative path: reason fragment}, "converted": {relative path: source mode},
    "empty_classes": {...}}: what the report must say about each.
    """
    root = os.fspath(root)
    cls = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))[0]
    d = os.path.join(root, cls)
    data = open(good_jpeg, "rb").read()
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)

    def put(name: str, payload: bytes) -> str:
        with open(os.path.join(d, name), "wb") as f:
            f.write(payload)
        return f"{cls}/{name}"

    skipped = {
        put("zero_bytes.JPEG", b""): "empty file",
        put("truncated.JPEG", data[: len(data) // 2]): "truncated",
        put("not_an_image.JPEG", b"<html>this is not an image</html>" * 20): "not an image",
        put("garbage.JPEG", b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 3000, dtype=np.uint8))): "corrupt",
    }
    converted = {}
    for name, img, fmt, mode in [
        ("cmyk.JPEG", Image.fromarray(rgb).convert("CMYK"), "JPEG", "CMYK"),
        ("grey.JPEG", Image.fromarray(rgb).convert("L"), "JPEG", "L"),
        ("png_named.JPEG", Image.fromarray(rgb), "PNG", "RGB"),
        ("palette.png", Image.fromarray(rgb).convert("P"), "PNG", "P"),
        ("rgba.png", Image.fromarray(rgb).convert("RGBA"), "PNG", "RGBA"),
        ("grey16.png", Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG", "I;16"),
    ]:
        path = os.path.join(d, name)
        img.save(path, format=fmt)
        converted[f"{cls}/{name}"] = Image.open(path).mode or mode
    os.makedirs(os.path.join(root, "zz_empty_class"), exist_ok=True)
    return {"skipped": skipped, "converted": converted, "empty_classes": {"zz_empty_class": ""}}

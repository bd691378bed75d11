"""Decoding one source image into the RGB uint8 array that goes into a .beton, with every check on the way.

Source images are decoded by content, never by extension (ImageNet has a PNG named .JPEG and CMYK JPEGs).
Anything that cannot become a sane RGB image raises `BadImage` with a one-line reason for the report.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile

# A truncated file must fail, not decode into grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(Exception):
    """A source file that cannot be stored; `str(e)` is the reason shown to the user."""


@dataclass(frozen=True)
class SourceInfo:
    width: int  # of the source file, before any resizing
    height: int
    mode: str  # PIL mode as stored ("RGB", "L", "CMYK", "I;16", ...)
    format: str  # detected by content ("JPEG", "PNG", ...)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """RGB uint8 HWC from any PIL mode. 16/32-bit greys are rescaled, not clipped (PIL's convert would clip)."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        grey = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        grey = np.clip(np.rint(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    # L, LA, P, PA, RGBA, CMYK, YCbCr, 1, ...: PIL's conversion is what torchvision's ImageFolder loader does,
    # so training sees what the reference code would have seen.
    return np.asarray(img.convert("RGB"))


def stored_size(
    width: int, height: int, max_resolution: int | None = None, short_side: int | None = None
) -> tuple[int, int]:
    """(width, height) an image is stored at: never enlarged; the longer side at most `max_resolution` (FFCV's
    resizer: floor of ratio x size) and the shorter side at most `short_side` (exactly `short_side` when it binds,
    so a 256 short side is what the official eval transform's Resize(256) makes of the original)."""
    ratio, by_short = 1.0, False
    if max_resolution and max(width, height) > max_resolution:
        ratio = max_resolution / max(width, height)
    if short_side and min(width, height) * ratio > short_side:
        ratio, by_short = short_side / min(width, height), True
    if ratio >= 1.0:
        return width, height
    w, h = (np.array([width, height]) * ratio).astype(int)
    if by_short:
        w, h = (short_side, max(1, h)) if width <= height else (max(1, w), short_side)
    return max(1, int(w)), max(1, int(h))


def load_rgb(
    path: str | os.PathLike, max_resolution: int | None = None, short_side: int | None = None
) -> tuple[np.ndarray, SourceInfo]:
    """Decode `path` to RGB uint8 (H, W, 3), resized (area interpolation) to `stored_size`.

    JPEGs of 4x the stored size or more are decoded at a reduced DCT scale (libjpeg's 1/2, 1/4, 1/8) that leaves at
    least 2x the target, then area-resized to exactly `stored_size` of the full image: the stored size is unchanged
    while the decode does a fraction of the work.
    """
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise BadImage(f"unreadable: {e.strerror or e}") from None
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # DecompressionBombWarning and libjpeg "corrupt data" warnings are decided on below, not printed.
            warnings.simplefilter("ignore")
            img = Image.open(path)
            info = SourceInfo(img.size[0], img.size[1], img.mode, img.format or "unknown")
            if info.width < 1 or info.height < 1:
                raise BadImage(f"degenerate size {info.width}x{info.height}")
            target = stored_size(info.width, info.height, max_resolution, short_side)
            if img.format == "JPEG":
                # Keep >= 2x the target so the area resize still averages; at 1x, DCT scaling alone loses up
                # to ~8 dB PSNR on high-frequency ImageNet images, at 2x it stays within JPEG q90's own error.
                scale = 2 * max(target[0] / info.width, target[1] / info.height)
                if scale <= 0.5:
                    img.draft(
                        img.mode if img.mode in ("L", "CMYK") else "RGB",
                        (int(np.ceil(info.width * scale)), int(np.ceil(info.height * scale))),
                    )
            img.load()
            rgb = _to_rgb_array(img)
    except BadImage:
        raise
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (format not recognised from its content)") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large to decode safely: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PermissionError is an OSError too: keep its wording.
        if isinstance(e, PermissionError):
            raise BadImage(f"unreadable: {e.strerror}") from None
        raise BadImage(f"corrupt or truncated: {e}") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise BadImage(f"unsupported pixel layout {rgb.shape} {rgb.dtype} (mode {info.mode})")
    if rgb.shape[:2] != target[::-1]:
        # Drafted or not, the resize to the stored size of the full image happens here, so the stored size does
        # not depend on the decode shortcut.
        import cv2

        rgb = cv2.resize(rgb, target, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb), info

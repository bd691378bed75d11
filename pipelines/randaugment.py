"""RandAugment for the fine-tuning recipes (`aug.auto_augment: rand-m9-mstd0.5-inc1`), by timm, per sample, on the CPU.

The official fine-tuning transform is timm's create_transform(auto_augment=...), whose RandAugment works on PIL
images; we call the same timm function on each uint8 crop rather than re-implement its sixteen ops. It runs on the
host batch the engine decoded, before the batch is uploaded (the loader's host stage), so the device never waits
for it. timm draws from Python's `random` and numpy's global RNG: each batch seeds both from the batch's numpy
generator (the loader's per-batch key, so a resumed epoch draws the same ops) and restores them afterwards.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data.auto_augment import rand_augment_transform


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, with 0 bits meaning what it meant before Pillow 13 (every bit masked: a black image).
    PosterizeIncreasing at magnitude 10 asks for 0 bits (4 - 4), which Pillow 13 rejects with a ValueError."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


class RandAugment:
    def __init__(self, policy: str, img_size: int, mean):
        # The hparams timm's create_transform passes (translate relative to the crop, fill with the mean colour).
        hparams = {"translate_const": int(img_size * 0.45), "img_mean": tuple(int(round(255 * m)) for m in mean)}
        self.transform = rand_augment_transform(policy, hparams)
        for op in self.transform.ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize

    def __call__(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """uint8 (B, H, W, 3) host batch -> a new host batch, each sample through timm's RandAugment."""
        if images.device.type != "cpu":
            raise ValueError("RandAugment runs on the host batch, before the upload; got a batch on "
                             f"{images.device}")
        seed = int(rng.integers(2**31 - 1))
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            out = np.stack([np.asarray(self.transform(Image.fromarray(im))) for im in images.numpy()])
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return torch.from_numpy(out)

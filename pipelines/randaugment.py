"""RandAugment for the fine-tuning recipes (`aug.auto_augment: rand-m9-mstd0.5-inc1`), by timm, per sample, on the CPU.

The official fine-tuning transform is timm's create_transform(auto_augment=...), whose RandAugment works on PIL
images; we call the same timm function on each uint8 crop rather than re-implement its sixteen ops, so the batch
goes through host memory once (fine-tuning runs are 20 epochs, not 800). timm draws from Python's `random` and
numpy's global RNG: each batch seeds both from the loader's generator and restores them afterwards.
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

    def __call__(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=g.device))
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            host = images.cpu().numpy()
            out = np.stack([np.asarray(self.transform(Image.fromarray(im))) for im in host])
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return torch.from_numpy(out).to(images.device, non_blocking=True)

"""What the benchmark scripts share: the real image sample, unpacked and replicated by hard links."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGENET_SAMPLE_TAR = REPO.parent / "shared" / "data" / "imagenet-sample-1000.tar"


def unpack_imagenet_sample(dest: Path) -> Path:
    """The 1000-image ImageNet sample as an ImageFolder tree under dest."""
    if not IMAGENET_SAMPLE_TAR.exists():
        raise SystemExit(f"{IMAGENET_SAMPLE_TAR} is absent (it ships in the project's shared/data); pass --src")
    with tarfile.open(IMAGENET_SAMPLE_TAR) as t:
        t.extractall(dest, filter="data")
    return dest / "imagenet-sample-1000"


def replicate(src: Path, dst: Path, copies: int) -> int:
    """dst/<class>/<copy>_<name>: hard links, so the page cache holds one copy and every run reads the same bytes."""
    n = 0
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir()):
            for k in range(copies):
                os.link(f, dst / cls.name / f"{k}_{f.name}")
                n += 1
    return n

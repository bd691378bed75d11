import os
import subprocess
import sys
import tarfile
from pathlib import Path

# hypothesis is imported before any FFCV thread runs: CPython 3.11's AST depth counter is global, and a module
# parsed while a loader thread compiles can fail with "AST constructor recursion depth mismatch".
import hypothesis  # noqa: F401
import pytest

from dataset_tools.synthetic import add_bad_inputs, make_imagefolder

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DEIT3_SHARED_DATA", REPO.parent / "shared" / "data"))


def run_cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """A console script run the way a user runs it: a fresh process, captured output."""
    return subprocess.run([sys.executable, "-m", "dataset_tools.convert", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=kw.pop("cwd", REPO), **kw)


@pytest.fixture(scope="session")
def good_tree(tmp_path_factory) -> Path:
    """5 classes x 8 clean JPEGs."""
    root = tmp_path_factory.mktemp("good") / "src"
    make_imagefolder(root, num_classes=5, per_class=8, seed=0)
    return root


@pytest.fixture(scope="session")
def bad_tree(tmp_path_factory) -> tuple[Path, dict]:
    """3 classes x 6 clean JPEGs, plus every bad-input kind in class_00 and an empty class folder."""
    root = tmp_path_factory.mktemp("bad") / "src"
    make_imagefolder(root, num_classes=3, per_class=6, seed=1)
    expected = add_bad_inputs(root, root / "class_01" / "img_0000.JPEG")
    return root, expected


@pytest.fixture(scope="session")
def imagenet_sample(tmp_path_factory) -> Path:
    tar = SHARED_DATA / "imagenet-sample-1000.tar"
    if not tar.exists():
        pytest.skip(f"real ImageNet sample not available ({tar} is absent; it ships in the project's shared/data)")
    dest = tmp_path_factory.mktemp("imagenet")
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    return dest / "imagenet-sample-1000"


def make_splits(root: Path, splits: dict, page_size: int = 8 << 20, write_mode: str = "jpg",
                **imagefolder_kw) -> Path:
    """root/<split>.beton for each split: {name: (num_classes, per_class, seed)}, generated and converted."""
    from dataset_tools.convert import convert

    for split, (num_classes, per_class, seed) in splits.items():
        make_imagefolder(root / split, num_classes=num_classes, per_class=per_class, seed=seed, **imagefolder_kw)
        convert(str(root / split), str(root / f"{split}.beton"), workers=1, show_progress=False,
                page_size=page_size, write_mode=write_mode)
    return root


def no_leftovers(folder: Path, name: str) -> list[str]:
    """Files in `folder` that belong to an output called `name` (the file itself or any temporary of it)."""
    return sorted(p.name for p in folder.iterdir() if p.name == name or p.name.startswith(f".{name}"))

import gc
import os
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path

# hypothesis is imported before any FFCV thread runs: CPython 3.11's AST depth counter is global, and a module
# parsed while a loader thread compiles can fail with "AST constructor recursion depth mismatch".
import hypothesis  # noqa: F401
import pytest

from dataset_tools.synthetic import add_bad_inputs, make_imagefolder

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DEIT3_SHARED_DATA", REPO.parent / "shared" / "data"))
# Small .beton files made by `scripts/gpu-check.sh --prepare` (optional: deit3-convert needs no ffcv, so a GPU machine
# can also write them itself).
GPU_CHECK_DATA = os.environ.get("DEIT3_GPU_CHECK_DATA")


# What starts another Python (the CLIs, torchrun, conversions killed mid-write): each pays a fresh torch import,
# seconds apiece. Such a test is marked `cli` (make test-fast leaves them out; make test and CI run them).
_STARTS_A_PROCESS = ("subprocess.", "run_cli(", "start_convert(", "Popen(", "sys.executable")


def _starts_a_process(fn, module, depth: int = 1) -> bool:
    """Whether fn's source starts a process, or calls a function of its module (`cli(...)`, `_export(...)`) that
    does (`depth` levels down)."""
    import inspect

    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    if any(s in source for s in _STARTS_A_PROCESS):
        return True
    return depth > 0 and any(
        inspect.isfunction(f)
        and f is not fn
        and f.__module__ == module.__name__
        and f"{name}(" in source
        and _starts_a_process(f, module, depth - 1)
        for name, f in vars(module).items()
    )


def _mark_cli(items) -> None:
    for item in items:
        fn, module = getattr(item, "function", None), getattr(item, "module", None)
        if fn is not None and module is not None and _starts_a_process(fn, module):
            item.add_marker(pytest.mark.cli)


def pytest_collection_modifyitems(config, items):
    """`cli` on the tests that start another process; `cuda` tests run where a CUDA device is visible and are
    skipped, saying so, everywhere else."""
    import torch

    _mark_cli(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (scripts/gpu-check.sh runs these on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def env_without(folder: Path, *packages: str) -> dict:
    """The environment of a Python that cannot import `packages` (nor their submodules), as on a machine without
    them: a sitecustomize in `folder` puts an import blocker first on sys.meta_path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        f"BLOCKED = {tuple(packages)!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if any(name == p or name.startswith(p + '.') for p in BLOCKED):\n"
        "            raise ImportError(f'{name} is not installed here')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    return {**os.environ, "PYTHONPATH": f"{folder}:{REPO}"}


@contextmanager
def collector_off():
    """No automatic garbage collection inside the block (explicit gc.collect() still runs); the previous state
    after it. For tests of what must be freed by reference counting, or garbage that must outlive a fork."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class FakeCuda:
    """torch.cuda's streams and events on a CPU, installed for one test: stand-ins that log what the code under test
    asks of them, in order (a stream entered and left, one stream waiting for another, an event recorded on a stream
    and waited for by the host), for tests of stream ordering that must run without a GPU. The current stream is
    per thread, as torch's is; streams are named "main" (every thread's default), then "s1", "s2", ...; events are
    numbered."""

    def __init__(self, monkeypatch):
        import threading

        import torch

        self.log: list[tuple] = []
        self._made, self._events, self._local = 0, 0, threading.local()
        self.main = self.Stream()
        for name in ("Stream", "Event", "current_stream", "stream"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def Stream(self, device=None, priority=0):
        fake, name = self, f"s{self._made}" if self._made else "main"
        self._made += 1

        class Stream:
            def __init__(self):
                self.name, self.priority = name, priority

            def wait_stream(self, other):
                fake.log.append(("wait_stream", self.name, other.name))

        return Stream()

    def Event(self, *args, **kwargs):
        fake, number = self, self._events
        self._events += 1

        class Event:
            def record(self, stream=None):
                fake.log.append(("record", number, (stream or fake.current_stream()).name))

            def wait(self, stream=None):
                fake.log.append(("wait_event", (stream or fake.current_stream()).name, number))

            def synchronize(self):
                fake.log.append(("synchronize", number))

        return Event()

    def current_stream(self, device=None):
        return getattr(self._local, "stream", self.main)

    @contextmanager
    def stream(self, stream):
        before = self.current_stream()
        self._local.stream = stream
        self.log.append(("enter", stream.name))
        try:
            yield
        finally:
            self.log.append(("leave", stream.name))
            self._local.stream = before


def run_cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """A console script run the way a user runs it: a fresh process, captured output."""
    return subprocess.run(
        [sys.executable, "-m", "dataset_tools.convert", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=kw.pop("cwd", REPO),
        **kw,
    )


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


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """The tiny data set most trainer tests run on: train.beton (JPEG, 4 classes x 12, 32..64 px), val.beton
    (4 x 4) and raw.beton (raw pixels, 3 x 4); the copies in DEIT3_GPU_CHECK_DATA where that is set."""
    if GPU_CHECK_DATA:
        return Path(GPU_CHECK_DATA)
    return make_tiny_data(tmp_path_factory.mktemp("tiny_data"))


def make_tiny_data(root: Path, page_size: int = 8 << 20) -> Path:
    """The `data` fixture's files under root (also what scripts/gpu-check.sh --prepare brings to a GPU machine)."""
    make_splits(root / "src", {"train": (4, 12, 0), "val": (4, 4, 1)}, min_side=32, max_side=64, page_size=page_size)
    for split in ("train", "val"):
        for suffix in (".beton", ".beton.json", ".beton.sources.txt"):
            (root / "src" / f"{split}{suffix}").rename(root / f"{split}{suffix}")
    make_imagefolder(root / "src" / "raw", num_classes=3, per_class=4, seed=5, min_side=24, max_side=48)
    from dataset_tools.convert import convert

    convert(
        str(root / "src" / "raw"),
        str(root / "raw.beton"),
        workers=1,
        write_mode="raw",
        show_progress=False,
        page_size=page_size,
    )
    return root


def plain_loader(split: str, device="cpu", rank=None, world=None, **sets):
    """`pipelines.build_loader` from plain values, the way the data path is called without the trainer: `sets` name
    fields of `DataConfig` / `AugConfig` as "data.x" / "aug.y", plus "model.num_classes", "train.amp" (the batch
    dtype) and "train.compile"."""
    import dataclasses

    import torch

    from pipelines import build_loader
    from pipelines.config import AugConfig, DataConfig

    data, aug, kw = {}, {}, {"num_classes": 1000, "dtype": torch.float32, "compile": False}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for key, value in sets.items():
        section, _, name = key.partition(".")
        if section in ("data", "aug"):
            fields = {f.name for f in dataclasses.fields(DataConfig if section == "data" else AugConfig)}
            assert name in fields, f"no field {key}"
            value = str(value) if name in ("train", "val") else value
            (data if section == "data" else aug)[name] = tuple(value) if isinstance(value, list) else value
        elif key == "model.num_classes":
            kw["num_classes"] = value
        elif key == "train.amp":
            kw["dtype"] = dtypes[value]
        elif key == "train.compile":
            kw["compile"] = value
        else:
            raise AssertionError(f"{key} is not an input of the data path")
    return build_loader(DataConfig(**data), AugConfig(**aug), split, device=device, rank=rank, world=world, **kw)


def make_splits(root: Path, splits: dict, page_size: int = 8 << 20, write_mode: str = "jpg", **imagefolder_kw) -> Path:
    """root/<split>.beton for each split: {name: (num_classes, per_class, seed)}, generated and converted."""
    from dataset_tools.convert import convert

    for split, (num_classes, per_class, seed) in splits.items():
        make_imagefolder(root / split, num_classes=num_classes, per_class=per_class, seed=seed, **imagefolder_kw)
        convert(
            str(root / split),
            str(root / f"{split}.beton"),
            workers=1,
            show_progress=False,
            page_size=page_size,
            write_mode=write_mode,
        )
    return root


def no_leftovers(folder: Path, name: str) -> list[str]:
    """Files in `folder` that belong to an output called `name` (the file itself or any temporary of it)."""
    return sorted(p.name for p in folder.iterdir() if p.name == name or p.name.startswith(f".{name}"))

"""The loader engines by name: which class implements each, and what each can do. The one list of engines.

An engine is one module with one class that takes the shared constructor (`engine.py`) and one `register(...)`
entry below; `build_loader` builds any registered engine from here, the config schema and the command line take
their choices from `ENGINES`, and callers that must act differently per engine (staging, `profile --tune`, doctor)
ask the entry's capabilities, never the name. Modelled on FFCV's name maps (`ORDER_MAP`) and timm's reader factory.

No torch here, and no engine is imported until one is built (`EngineInfo.load`): the trainer's config schema
validates `data.engine` against this module, and --tune and doctor ask what is installed without importing FFCV
or DALI.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from importlib.util import find_spec

from .errors import DataError


@dataclass(frozen=True)
class EngineInfo:
    name: str  # data.engine's value
    target: str  # "module:Class", imported when the first loader with this engine is built
    reads_shard_sets: bool  # reads a shard set as one data set; else one .beton (data.stage_to merges shards)
    gpu_decode: bool  # decodes on the GPU when given one (else on CPU threads, whatever the device)
    workers_on_gpu: bool  # data.workers sizes its CPU threads on a GPU too (on a CPU every engine uses them)
    os_cache: bool  # takes data.os_cache (the page cache vs a process cache of the file)
    package: str | None = None  # the optional package it imports (None: only what the project always installs)
    install: str | None = None  # the command that installs `package`
    title: str | None = None  # how messages name it, where not "the NAME engine"
    # Augments, normalises and yields float batches itself (takes `aug`): the loader gets no batch augmentation.
    host_augment: bool = False
    reads_image_folders: bool = False  # reads an ImageFolder tree as it is (the others refuse it: convert first)

    @property
    def what(self) -> str:
        return self.title or f"the {self.name} engine"

    @property
    def installed(self) -> bool:
        """Whether its package is found. Cheap: looks for it without importing it, so a package that is there but
        fails at import (a missing native library) still counts; building the engine then says why."""
        return self.package is None or _found(self.package)

    def uses_workers(self, device_type: str) -> bool:
        """Whether data.workers changes anything on this device: settings that differ only in it are the same run."""
        return device_type != "cuda" or self.workers_on_gpu

    def decodes_on_cpu(self, device_type: str) -> bool:
        return device_type != "cuda" or not self.gpu_decode

    def load(self) -> type:
        """The engine's class (imports its module: a missing package is that module's one-line ImportError)."""
        module, _, cls = self.target.partition(":")
        return getattr(import_module(module), cls)


_REGISTRY: dict[str, EngineInfo] = {}
# The registered names in registration order: a live view, so what validates data.engine (the config schema, the
# command line's choices) sees every engine registered, whenever it was.
ENGINES = _REGISTRY.keys()


def register(info: EngineInfo) -> EngineInfo:
    """Add an engine. Its class takes `(path, epoch_order, batch_size, crop, device, *, workers, drop_last, seed,
    rank)`, plus `os_cache` when `info.os_cache`, and follows the `Engine` protocol (engine.py)."""
    if info.name in _REGISTRY:
        raise ValueError(f"an engine named {info.name!r} is registered already")
    if ":" not in info.target:
        raise ValueError(f"engine {info.name!r}: target {info.target!r} is not 'module:Class'")
    _REGISTRY[info.name] = info
    return info


def engine_info(name: str) -> EngineInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DataError(f"data.engine {name!r}: choose one of {', '.join(ENGINES)}") from None


def engine_names(**capabilities) -> list[str]:
    """The registered engines whose entries have every given value (`engine_names(gpu_decode=True)`), in
    registration order, which is also the order of preference where a message suggests one."""
    return [n for n, info in _REGISTRY.items() if all(getattr(info, k) == v for k, v in capabilities.items())]


def alternatives(name: str, **capabilities) -> list[str]:
    """The other engines than `name` that have the given capabilities, for a message suggesting a switch."""
    return [n for n in engine_names(**capabilities) if n != name]


def one_of(names) -> str:
    """`names` for a message: "a", "a or b", "a, b or c"."""
    names = list(names)
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


def _found(package: str) -> bool:
    try:  # a dotted name imports its parents to look inside them; a missing or blocked one raises
        return find_spec(package) is not None
    except (ImportError, ValueError):
        return False


# Registration order is the order of preference: the one a message suggests first.
register(
    EngineInfo(
        "ffcv",
        "pipelines.ffcv_engine:FFCVEngine",
        reads_shard_sets=False,
        gpu_decode=False,
        workers_on_gpu=True,
        os_cache=True,
        package="ffcv",
        install="pip install -e '.[ffcv]'",
        title="FFCV's loader",
    )
)
# DALI's "mixed" decoder does part of each decode on its CPU threads (parsing; Huffman decoding where the hardware
# decoder does not take the image), so data.workers still matters on a GPU.
register(
    EngineInfo(
        "dali",
        "pipelines.dali_engine:DaliEngine",
        reads_shard_sets=True,
        gpu_decode=True,
        workers_on_gpu=True,
        os_cache=False,
        package="nvidia.dali",
        install="pip install -e '.[dali]'",
    )
)
# nvJPEG decodes a whole batch in one call on the GPU: its CPU thread pool exists only on a CPU.
register(
    EngineInfo(
        "nvjpeg",
        "pipelines.nvjpeg_engine:NvjpegEngine",
        reads_shard_sets=True,
        gpu_decode=True,
        workers_on_gpu=False,
        os_cache=False,
    )
)
# The official per-sample PIL/torchvision/timm pipeline on the host: the yardstick parity compares against, and
# training on an ImageFolder before converting it.
register(
    EngineInfo(
        "reference",
        "pipelines.reference_engine:ReferenceEngine",
        reads_shard_sets=True,
        gpu_decode=False,
        workers_on_gpu=True,
        os_cache=False,
        host_augment=True,
        reads_image_folders=True,
        title="the reference engine",
    )
)

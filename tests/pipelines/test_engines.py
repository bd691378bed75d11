"""The engines over one .beton: the same samples in the same order with the same keyed crops, pixel-close; and the
registry that names them (a new engine is its own class and one entry)."""

import ast
import subprocess
import sys

import numpy as np
import pytest
import torch

from dataset_tools.beton import Beton
from dataset_tools.convert import convert
from dataset_tools.synthetic import make_imagefolder
from pipelines import DataError, registry
from pipelines.beton_source import BetonBatches
from pipelines.config import IMAGENET_MEAN, IMAGENET_STD

from ..conftest import REPO, FakeCuda, plain_loader


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    d = tmp_path_factory.mktemp("engines")
    make_imagefolder(d / "src", num_classes=6, per_class=10, seed=7, min_side=40, max_side=120)
    convert(str(d / "src"), str(d / "jpg.beton"), workers=2, show_progress=False)
    convert(str(d / "src"), str(d / "raw.beton"), workers=2, write_mode="raw", show_progress=False)
    convert(str(d / "src"), str(d / "shards"), shards=2, workers=2, show_progress=False, page_size=2 << 20)
    return d


def cfg_for(path, engine, **sets) -> dict:
    base = {
        "data.train": path,
        "data.val": path,
        "model.num_classes": 6,
        "data.batch_size": 12,
        "data.workers": 2,
        "data.repeats": 1,
        "aug.img_size": 40,
        "train.amp": "fp32",
        "data.engine": engine,
    }
    base.update(sets)
    return base


def build_loader(sets: dict, split: str, device="cpu"):
    return plain_loader(split, device, **sets)


def engine_epoch(cfg, split, epoch=1):
    loader = build_loader(cfg, split, "cpu")
    return [(x.clone(), y.clone()) for x, y in loader.raw_batches(epoch)]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["nvjpeg", "dali"])
@pytest.mark.parametrize("split, crop", [("train", "rrc"), ("train", "src"), ("val", "rrc")])
def test_engines_yield_the_same_samples_and_crops_as_ffcv(betons, engine, split, crop):
    """Same labels in the same order, and crops within JPEG-decoder and resampler differences: FFCV's decoder
    uses libjpeg-turbo's fast IDCT, torchvision's and DALI's the accurate one; DALI's cubic resize is PIL's to a
    grey level (mean |diff| < 1.5 grey levels, max <= 16)."""
    a = engine_epoch(cfg_for(betons / "jpg.beton", "ffcv", **{"aug.crop": crop}), split)
    b = engine_epoch(cfg_for(betons / "jpg.beton", engine, **{"aug.crop": crop}), split)
    assert len(a) == len(b) and len(a) == (5 if split == "train" else 4)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and xa.shape == xb.shape
        d = (xa.int() - xb.int()).abs()
        assert d.float().mean() < 1.5 and d.max() <= 16


def test_dali_matches_nvjpeg_closely_and_repeats_epochs(betons):
    """Both decode with accurate-IDCT libjpeg-turbo builds; the remaining gap is resampling (mean < 0.5). A second
    pass over the same epoch gives the same batches (the pipeline is reset cleanly at each epoch's end)."""
    cfg = cfg_for(betons / "jpg.beton", "dali")
    loader = build_loader(cfg, "train", "cpu")
    first = [(x.clone(), y.clone()) for x, y in loader.raw_batches(3)]
    again = [(x.clone(), y.clone()) for x, y in loader.raw_batches(3)]
    other = engine_epoch(cfg_for(betons / "jpg.beton", "nvjpeg"), "train", epoch=3)
    for (xa, ya), (xb, yb), (xc, yc) in zip(first, again, other):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ya, yc)
        assert (xa.int() - xc.int()).abs().float().mean() < 0.5


@pytest.mark.slow
@pytest.mark.parametrize("taken", [1, 2])
def test_ffcv_epoch_left_early_stops_its_thread(betons, taken):
    """A consumer that leaves an epoch part-way (a stop request, an error, a Slurm requeue's sys.exit) ends FFCV's
    decode thread before its buffers are freed: one left running aborted a requeued job at exit. Taking 2 of 4 val
    batches leaves the thread handing the epoch's end into a full queue (2 slots), a wait that never ends alone.
    The next epoch is whole and the same as a fresh loader's."""
    import threading
    from ffcv.loader.epoch_iterator import EpochIterator

    cfg = cfg_for(betons / "jpg.beton", "ffcv")
    loader = build_loader(cfg, "val", "cpu")
    it = loader.raw_batches(1)
    for _ in range(taken):
        next(it)
    it.close()
    assert not [t for t in threading.enumerate() if isinstance(t, EpochIterator)]
    again = [(x.clone(), y.clone()) for x, y in loader.raw_batches(1)]
    fresh = engine_epoch(cfg, "val")
    assert len(again) == len(fresh) == 4
    for (xa, ya), (xb, yb) in zip(again, fresh):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.slow
def test_an_error_in_the_batch_augmentation_stops_the_ffcv_thread(betons, monkeypatch):
    """The loader's own error (out of memory in the batch augmentation) ends the engine's epoch at once, while the error
    is still being handled (its traceback keeps the loader's frames alive)."""
    import threading
    from ffcv.loader.epoch_iterator import EpochIterator

    loader = build_loader(cfg_for(betons / "jpg.beton", "ffcv"), "train", "cpu")
    real = loader.augment

    def augment(images, key):
        if augment.calls == 1:
            raise RuntimeError("out of memory")
        augment.calls += 1
        return real(images, key)

    augment.calls = 0
    monkeypatch.setattr(loader, "augment", augment)
    try:
        for _ in loader:
            pass
    except RuntimeError:
        assert not [t for t in threading.enumerate() if isinstance(t, EpochIterator) and t.is_alive()]
    else:
        raise AssertionError("the augmentation's error did not propagate")


def test_ffcv_waits_on_the_host_for_a_slots_copy_before_decoding_into_the_slot_again(betons, monkeypatch):
    """FFCV decodes batch k into pinned slot k % 4 and queues its copy to the device on the slot's stream; batch
    k + 4 is decoded into the same slot, and nothing in FFCV makes the host wait for the copy first: a GPU a few
    batches behind would copy batch k + 4's pixels and labels as batch k's. Run with stand-ins for CUDA's streams
    and events (FFCV told it has a GPU): each write of a slot but the first comes after the host waited for an event
    recorded on the slot's stream once the slot's last batch (its copies included) was queued."""
    from ffcv.loader import epoch_iterator

    cuda = FakeCuda(monkeypatch)
    monkeypatch.setattr(epoch_iterator, "IS_CUDA", True)
    loader = build_loader(cfg_for(betons / "jpg.beton", "ffcv", **{"data.batch_size": 4}), "train", "cpu")
    assert sum(1 for _ in loader.raw_batches(1)) == 15
    log = list(cuda.log)
    writes = [i for i, e in enumerate(log) if e[0] == "enter"]  # FFCV runs a batch's pipeline in its slot's stream
    assert len(writes) == 15 and len({log[i][1] for i in writes}) == 4
    for before, i in zip(writes, writes[4:]):
        slot = log[i][1]
        assert log[before][1] == slot
        queued = log.index(("leave", slot), before)
        recorded = [e[1] for e in log[queued:i] if e[0] == "record" and e[2] == slot]
        assert recorded, f"no event after the copy of slot {slot}"
        assert ("synchronize", recorded[-1]) in log[queued:i], f"slot {slot} rewritten before its copy was waited for"


@pytest.mark.slow
def test_nvjpeg_reads_raw_pixels_exactly_like_ffcv(betons):
    """Raw-mode files have no decoder in between: the two engines' crops are equal."""
    a = engine_epoch(cfg_for(betons / "raw.beton", "ffcv"), "train")
    b = engine_epoch(cfg_for(betons / "raw.beton", "nvjpeg"), "train")
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_nvjpeg_epoch_is_exact_and_model_ready(betons):
    cfg = cfg_for(betons / "jpg.beton", "nvjpeg")
    loader = build_loader(cfg, "val", "cpu")
    labels = torch.cat([y for _, y in loader])
    np.testing.assert_array_equal(labels.numpy(), Beton(betons / "jpg.beton").labels())
    x, y = next(iter(build_loader(cfg, "train", "cpu")))
    assert x.shape == (12, 3, 40, 40) and x.is_contiguous(memory_format=torch.channels_last) and y.shape == (12, 6)


def test_nvjpeg_works_without_ffcv(betons):
    code = (
        "import sys; sys.modules['ffcv'] = None\n"
        "from pipelines import build_loader\nfrom pipelines.config import AugConfig, DataConfig\n"
        f"data = DataConfig(val='{betons / 'jpg.beton'}', engine='nvjpeg')\n"
        "loader = build_loader(data, AugConfig(img_size=32), 'val', num_classes=6, device='cpu')\n"
        "print(sum(len(y) for _, y in loader))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "60"


def test_dali_refuses_raw_files_and_a_missing_dali_is_one_message(betons):
    with pytest.raises(DataError, match="raw pixels"):
        build_loader(cfg_for(betons / "raw.beton", "dali"), "train", "cpu")
    code = "import sys; sys.modules['nvidia.dali'] = None\nfrom pipelines import dali_engine\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "pip install -e '.[dali]'" in r.stderr and "nvjpeg" in r.stderr


# A finalizer that parses, run by collections that the churn below makes frequent: what CPython 3.11's shared AST
# depth counter cannot survive during DALI's import (thousands of ast.literal_eval calls), as in a failed CI run.
_PARSING_FINALIZERS = """
import ast, gc, sys
class Parses:
    def __del__(self):
        ast.literal_eval("(1, 2)")
class Cycle:
    def __init__(self):
        self.me, self.parses = self, Parses()
plain = ast.literal_eval
def literal_eval(text):
    Cycle()  # garbage for the next collection, which can come in the middle of the parse below
    return plain(text)
ast.literal_eval = literal_eval
gc.set_threshold(50)
"""


def test_dali_imports_whole_when_a_collection_would_parse_in_the_middle():
    pytest.importorskip("pipelines.dali_engine")
    guarded = subprocess.run(
        [sys.executable, "-c", _PARSING_FINALIZERS + "from pipelines import dali_engine\n"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert guarded.returncode == 0, guarded.stderr
    if sys.version_info[:2] == (3, 11):  # the hazard itself, shown on the Python CI runs: a bare import dies of it
        bare = subprocess.run(
            [sys.executable, "-c", _PARSING_FINALIZERS + "import nvidia.dali\n"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert bare.returncode != 0 and "recursion depth mismatch" in bare.stderr


@pytest.mark.slow
def test_a_dead_ffcv_thread_is_an_error_not_a_hang(betons, monkeypatch):
    """FFCV's own __next__ waits for good on the queue of a decode thread that died (an error in its compiled
    pipeline, seen as a numba KeyError): the run would hang on every rank. The engine says so within a second."""
    import threading

    from ffcv.loader.epoch_iterator import EpochIterator

    real = EpochIterator.run_pipeline

    def run_pipeline(self, b_ix, *args):
        if b_ix == 1:
            raise KeyError("an error in the decode thread")
        return real(self, b_ix, *args)

    monkeypatch.setattr(EpochIterator, "run_pipeline", run_pipeline)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the test's thread error is expected
    loader = build_loader(cfg_for(betons / "jpg.beton", "ffcv"), "val", "cpu")
    outcome = []

    def consume():
        try:
            outcome.append(sum(1 for _ in loader.raw_batches(1)))
        except DataError as e:
            outcome.append(e)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(300)  # numba compiles the decode pipeline first: tens of seconds on a loaded 2-core machine
    assert not consumer.is_alive(), "the epoch waited for good on a dead decode thread"
    assert isinstance(outcome[0], DataError) and "FFCV's decode thread stopped with an error" in str(outcome[0])


@pytest.mark.slow
def test_ffcv_leaves_numbas_shared_types_as_they_were(betons):
    """FFCV's os_cache reader set `.mutable = False` on numba's one shared uint8[::1] type, changing its hash under
    every compiled function's table of overloads: numba then raised KeyError from them ("Exception ignored" as each
    loader was freed, and in a decode thread that compiled against a spoilt table). The engine's reader does not."""
    import numba

    shared = numba.uint8[::1]
    assert shared.mutable
    cached, paged = (
        engine_epoch(cfg_for(betons / "jpg.beton", "ffcv", **{"data.os_cache": c}), "val") for c in (True, False)
    )
    assert shared.mutable and numba.uint8[::1] is shared
    assert len(cached) == len(paged) == 4  # the reader still reads: the same batches either way
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(cached, paged))


class GreyEngine(BetonBatches):
    """A fourth engine in a few lines: every image mid-grey; the samples, their order and labels read as the real
    engines read them (beton_source). Registered as not taking data.os_cache, so its constructor has no such
    argument: a builder that passed it anyway fails here."""

    def __init__(self, path, epoch_order, batch_size, crop, device, *, workers, drop_last, seed=0, rank=0):
        super().__init__(path, epoch_order, batch_size, crop, device, drop_last=drop_last, seed=seed, rank=rank)
        self.workers = workers

    def batches(self, epoch, start=0):
        size = self.crop.size
        for idx, _ in self.index_batches(epoch, start):
            yield (
                torch.full((len(idx), size, size, 3), 128, dtype=torch.uint8, device=self.device),
                self.labels_of(idx),
            )


class CachedGreyEngine(GreyEngine):
    def __init__(self, *args, os_cache, **options):
        super().__init__(*args, **options)
        self.os_cache = os_cache


@pytest.fixture
def grey_engines():
    added = [
        registry.register(
            registry.EngineInfo(
                "grey",
                f"{__name__}:GreyEngine",
                reads_shard_sets=False,
                gpu_decode=False,
                workers_on_gpu=True,
                os_cache=False,
            )
        ),
        registry.register(
            registry.EngineInfo(
                "grey_cached",
                f"{__name__}:CachedGreyEngine",
                reads_shard_sets=True,
                gpu_decode=False,
                workers_on_gpu=True,
                os_cache=True,
            )
        ),
    ]
    yield added
    for info in added:  # the registry is the process's: the tests after this one see the real engines only
        del registry._REGISTRY[info.name]


def test_a_new_engine_is_its_class_and_one_registry_entry(betons, grey_engines):
    """What the coming engines need (the official PIL pipeline, `reference`): their own class and one `register`.
    build_loader then builds it into a working loader, data.engine's choices include it, and its capabilities
    decide what it is given (data.os_cache only where it takes it) and refused (a shard set, naming the engines
    that read one)."""
    assert "grey" in registry.ENGINES and "grey_cached" in registry.ENGINES  # the config schema's and CLI's choices
    val = build_loader(cfg_for(betons / "jpg.beton", "grey"), "val")
    assert val.samples == 60 and len(val) == 4  # batches of 1.5 x 12
    labels = torch.cat([y for _, y in val.raw_batches(0)])
    np.testing.assert_array_equal(labels.numpy(), Beton(betons / "jpg.beton").labels()[val.sample_indices(0)])
    x, y = next(iter(val))
    grey = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert x.shape == (18, 3, 40, 40) and torch.allclose(x, grey.view(1, 3, 1, 1).expand_as(x), atol=1e-6)
    x, y = next(iter(build_loader(cfg_for(betons / "jpg.beton", "grey"), "train")))
    assert x.shape == (12, 3, 40, 40) and x.is_contiguous(memory_format=torch.channels_last) and y.shape == (12, 6)

    cached = build_loader(cfg_for(betons / "shards", "grey_cached", **{"data.os_cache": False}), "train")
    assert cached.engine.os_cache is False and cached.engine.workers == 2
    with pytest.raises(
        DataError,
        match=r"shards is a shard set; the grey engine reads one file: set data.stage_to "
        r".* or use data.engine: dali, nvjpeg or grey_cached \(they read shard",
    ):
        build_loader(cfg_for(betons / "shards", "grey"), "train")


def _names_an_engine(node) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return "engine" in name.lower()


def _is_text(node) -> bool:
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts) and all(map(_is_text, node.elts))
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def test_no_module_of_the_trainer_compares_an_engine_name():
    """Outside pipelines/, what differs per engine is asked of the registry's capabilities (`engine_info(name)`):
    each comparison with a name (`cfg.data.engine == "ffcv"`, `engine in ("dali", "nvjpeg")`) is a place a new
    engine would have to be found and added. Read from the source, without importing deit3_fast."""
    found = []
    for path in sorted((REPO / "deit3_fast").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(map(_names_an_engine, sides)) and any(map(_is_text, sides)):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)

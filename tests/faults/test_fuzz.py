"""Fuzzing, for a bounded time: the .beton reader on mutated copies of a real file, and the config loader on random YAML
documents, files and `--set` overrides. The only allowed outcomes are success or the tool's own error (`BetonError`
/ `DataError` / `ConfigError`, which the command lines print as one line): never another exception, never a hang
(each example runs under a 10 s alarm).
"""

import contextlib
import dataclasses
import os
import signal
import time
import typing

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataset_tools.beton import FIELD_DESC, HEADER, Beton, BetonError
from dataset_tools.inspect_beton import inspect_beton
from deit3_fast.config import Config, ConfigError, apply_override, load_config
from pipelines.build import DataError, check_data

from ..conftest import make_splits

# 150 examples per test, the same ones every run (CI stays deterministic). DEIT3_FUZZ_EXAMPLES=5000 explores more,
# with fresh random examples each run.
EXAMPLES = int(os.environ.get("DEIT3_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize="DEIT3_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@contextlib.contextmanager
def alarm(seconds: int = 10):
    """A hang is a failure: SIGALRM interrupts the example with a TimeoutError."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    pending = signal.alarm(seconds)  # an outer alarm (pytest-timeout's signal method) is re-armed afterwards
    started = time.monotonic()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if pending:
            signal.alarm(max(1, pending - int(time.monotonic() - started)))


# --- the .beton reader -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_beton(tmp_path_factory):
    """A real 2-class .beton (8 JPEG and raw images) and its regions: header, field descriptors, metadata rows, image
    payloads, allocation table."""
    root = make_splits(tmp_path_factory.mktemp("fuzz_beton"), {"train": (2, 4, 0)}, min_side=16, max_side=40)
    path = root / "train.beton"
    data = path.read_bytes()
    b = Beton(path)
    desc_end = HEADER.itemsize + len(b.fields) * FIELD_DESC.itemsize
    payloads = [(int(p), int(p) + int(s)) for p, s in zip(b.alloc_table["ptr"], b.alloc_table["size"])]
    regions = {
        "header": [(0, HEADER.itemsize)],
        "fields": [(HEADER.itemsize, desc_end)],
        "metadata": [(desc_end, desc_end + len(b) * b.row_dtype.itemsize)],
        "payload": payloads,
        "alloc_table": [(b.alloc_table_ptr, len(data))],
    }
    label_at = desc_end + b.row_dtype.fields["label"][1]  # sample 0's label
    del b
    return data, regions, label_at


def _read_everything(path) -> None:
    """What a run and `--inspect` do with a .beton: validate, read labels and metadata, decode every image."""
    try:
        b = Beton(path)
        image, label = b.field("rgb_image"), b.field("int")
        b.labels(label)
        for i in range(len(b)):
            b.decode(i, image)
    except BetonError:
        pass
    for num_classes in (2, 1000):
        try:
            check_data(str(path), "train", num_classes)
        except DataError:
            pass
    try:
        inspect_beton(str(path), samples=16)
    except BetonError:
        pass


@st.composite
def mutations(draw, regions):
    """A list of (offset, new bytes) edits, each inside one region, or a truncation length."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(sorted(regions)))
        lo, hi = draw(st.sampled_from(regions[name]))
        at = draw(st.integers(lo, max(lo, hi - 1)))
        kind = draw(st.sampled_from(["bytes", "u16", "u64", "zero", "ones"]))
        if kind == "bytes":
            new = draw(st.binary(min_size=1, max_size=16))
        elif kind == "u16":
            new = draw(st.integers(0, 2**16 - 1)).to_bytes(2, "little")
        elif kind == "u64":
            new = draw(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1, 2**32]))).to_bytes(
                8, "little"
            )
        else:
            new = (b"\0" if kind == "zero" else b"\xff") * draw(st.integers(1, 64))
        edits.append((at, new))
    return edits


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_fuzz_beton_bytes(real_beton, tmp_path, data):
    original, regions, _ = real_beton
    mutated = bytearray(original)
    for at, new in data.draw(mutations(regions)):
        mutated[at : at + len(new)] = new[: max(0, len(original) - at)]
    path = tmp_path / "fuzz.beton"
    path.write_bytes(bytes(mutated))
    with alarm():
        _read_everything(path)


@FUZZ
@given(data=st.data())
def test_fuzz_beton_truncated(real_beton, tmp_path, data):
    original, regions, _ = real_beton
    bounds = sorted({x for spans in regions.values() for span in spans for x in span})
    cut = data.draw(
        st.one_of(
            st.integers(0, len(original)),
            st.sampled_from(bounds).flatmap(lambda b: st.integers(max(0, b - 32), b + 32)),
        )
    )
    path = tmp_path / "fuzz.beton"
    path.write_bytes(original[:cut])
    with alarm():
        _read_everything(path)


def test_fuzz_found_cases(real_beton, tmp_path):
    """Mutations that broke the reader before it was fixed, kept as fixed examples: each is now a BetonError at the
    step named (before: cv2.error, a silent read past the table, ValueError, MemoryError/OOM kill)."""
    original, regions, label_at = real_beton
    table_at = regions["alloc_table"][0][0]
    first_ptr = regions["payload"][0][0]
    cases = {  # name: (edits, the step that must raise BetonError, message fragment)
        # an image's allocation size of 0: an empty JPEG buffer (cv2.imdecode asserted: cv2.error)
        "empty_payload": ([(table_at + 16, (0).to_bytes(8, "little"))], "decode", "does not decode"),
        # pointer + size wrap around uint64 to a small end (the bounds check passed; reads ran to the file's end)
        "wrapping_size": (
            [(table_at + 16, (2**64 - first_ptr + 8).to_bytes(8, "little"))],
            "open",
            "allocation table points outside",
        ),
        # the second field renamed to the first's name (numpy refused the duplicate: ValueError)
        "duplicate_field": (
            [(HEADER.itemsize + FIELD_DESC.itemsize + 1, b"image\0")],
            "open",
            "two fields are named 'image'",
        ),
        # a label of 2**32 and no report beside the file: --inspect sized a bincount by it (32 GiB)
        "huge_label": ([(label_at, (2**32).to_bytes(8, "little"))], "inspect", "not class indices"),
    }
    for name, (edits, step, fragment) in cases.items():
        mutated = bytearray(original)
        for at, new in edits:
            mutated[at : at + len(new)] = new
        path = tmp_path / f"{name}.beton"
        path.write_bytes(bytes(mutated))
        with alarm(), pytest.raises(BetonError, match=fragment):
            if step == "inspect":
                inspect_beton(str(path), samples=16)
            b = Beton(path)
            if step == "decode":
                for i in range(len(b)):
                    b.decode(i)
        with alarm():
            _read_everything(path)


# --- the config loader -----------------------------------------------------------------------------------------------


def _dotted_keys(cls=Config, prefix="") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        out += _dotted_keys(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else [prefix + f.name]
    return out


KEYS = _dotted_keys()
SECTIONS = sorted({k.split(".")[0] for k in KEYS})
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["bf16", "fp8", "lamb", "rrc", "ce", "1e-3", "nan", "-0", "8", ""]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
leaf_names = sorted({k.split(".")[-1] for k in KEYS})
documents = st.dictionaries(
    st.one_of(st.sampled_from(SECTIONS + ["loss"]), st.text(max_size=8), st.integers(), st.none()),
    st.one_of(st.dictionaries(st.one_of(st.sampled_from(leaf_names), st.text(max_size=8)), values, max_size=6), values),
    max_size=6,
)
overrides = st.lists(
    st.one_of(
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.one_of(scalars.map(str), st.text(max_size=16))),
        st.text(max_size=24),
    ),
    max_size=4,
)


def _load(path, sets) -> None:
    with alarm():
        try:
            load_config(str(path), sets)
        except ConfigError:
            pass


@FUZZ
@given(doc=documents, sets=overrides)
def test_fuzz_config_documents(tmp_path, doc, sets):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    _load(path, sets)


@FUZZ
@given(
    text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))),
    raw=st.binary(max_size=64),
    sets=overrides,
)
def test_fuzz_config_raw_files(tmp_path, text, raw, sets):
    """Arbitrary text (mostly not YAML) and arbitrary bytes (mostly not UTF-8) as a config file."""
    for name, payload in (("text.yaml", text.encode("utf-8", "surrogatepass")), ("raw.yaml", raw)):
        path = tmp_path / name
        path.write_bytes(payload)
        _load(path, sets)


@FUZZ
@given(assignment=st.text(max_size=40), tree=documents)
def test_fuzz_set_overrides(assignment, tree):
    """`--set` on any tree a YAML file can hold, then the schema check."""
    with alarm():
        try:
            apply_override(tree, assignment)
            load_config(None, [assignment])
        except ConfigError:
            pass


def test_fuzz_real_recipes_with_random_overrides():
    """Every shipped recipe accepts or cleanly refuses a batch of random overrides."""
    rng = np.random.default_rng(0)
    pool = ["0", "-1", "1e9", "null", "[]", "{}", "[1, 2, 3]", "true", "'x'", "nan", "inf", "[", "a: b"]
    for name in ("quickstart", "vit_s_in1k", "vit_b_in1k_ft224", "vit_h_in21k"):
        for key in KEYS:
            with alarm():
                try:
                    load_config(name, [f"{key}={rng.choice(pool)}"])
                except ConfigError:
                    pass

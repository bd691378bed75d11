"""The numpy .beton reader against FFCV's own reader and loader, and --inspect on good and broken files."""

import json
import shutil

import numpy as np
import pytest

from dataset_tools.beton import Beton, BetonError
from dataset_tools.convert import convert

from ..conftest import run_cli


@pytest.fixture(scope="module")
def beton_with_skips(bad_tree, tmp_path_factory):
    """A .beton whose writer skipped bad files, i.e. whose metadata was compacted."""
    root, _ = bad_tree
    out = tmp_path_factory.mktemp("beton") / "skips.beton"
    report = convert(str(root), str(out), workers=2, show_progress=False)
    assert report["num_skipped"] == 4
    return out


@pytest.mark.slow
def test_reader_agrees_with_ffcv_reader(beton_with_skips):
    from ffcv.reader import Reader

    ours, theirs = Beton(beton_with_skips), Reader(str(beton_with_skips))
    assert len(ours) == theirs.num_samples
    assert [f.name for f in ours.fields] == theirs.field_names == ["image", "label"]
    np.testing.assert_array_equal(ours.labels(), theirs.metadata["f1"])
    for key in ("mode", "width", "height", "data_ptr"):
        np.testing.assert_array_equal(ours.image_meta()[key], theirs.metadata["f0"][key])
    np.testing.assert_array_equal(np.sort(ours.alloc_table, order="ptr"), np.sort(theirs.alloc_table, order="ptr"))


@pytest.mark.slow
def test_ffcv_loader_reads_compacted_file(beton_with_skips):
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption

    b = Beton(beton_with_skips)
    loader = Loader(
        str(beton_with_skips),
        batch_size=4,
        num_workers=1,
        order=OrderOption.SEQUENTIAL,
        pipelines={"image": [CenterCropRGBImageDecoder((24, 24), 1.0)], "label": [IntDecoder()]},
    )
    labels, images = [], []
    for x, y in loader:
        labels.append(np.asarray(y).ravel().copy())
        images.append(np.asarray(x).copy())
    np.testing.assert_array_equal(np.concatenate(labels), b.labels())
    assert np.concatenate(images).shape == (len(b), 24, 24, 3)


def test_decode_matches_stored_size(beton_with_skips):
    b = Beton(beton_with_skips)
    for i in range(len(b)):
        m = b.image_meta()[i]
        assert b.decode(i).shape == (m["height"], m["width"], 3)


def _broken_copies(src, tmp_path):
    data = src.read_bytes()
    table_at = Beton(src).alloc_table_ptr
    cases = {
        "empty": b"",
        "tiny": data[:10],
        "truncated_tail": data[:-100],
        "truncated_half": data[: len(data) // 2],
        "random": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
        "text": b"hello, this is not a beton\n" * 100,
        "bad_version": b"\x07\x00" + data[2:],
        "bad_alloc_ptr": data[:16] + (len(data) * 2).to_bytes(8, "little") + data[24:],
        "bad_field_type": data[:24] + b"\x63" + data[25:],
    }
    # An allocation-table entry pointing past the end of the data.
    corrupt = bytearray(data)
    corrupt[table_at + 8 : table_at + 16] = (len(data) + 10**6).to_bytes(8, "little")
    cases["bad_alloc_entry"] = bytes(corrupt)
    paths = {}
    for name, payload in cases.items():
        p = tmp_path / f"{name}.beton"
        p.write_bytes(payload)
        paths[name] = p
    return paths


def test_broken_files_are_one_clear_error(beton_with_skips, tmp_path):
    for name, path in _broken_copies(beton_with_skips, tmp_path).items():
        with pytest.raises(BetonError, match="not a valid .beton|cannot open") as e:
            Beton(path)
        assert str(path) in str(e.value), name


def test_inspect_good_file(beton_with_skips):
    r = run_cli("--inspect", beton_with_skips, "--json", "--samples", "100")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    b = Beton(beton_with_skips)
    assert info["num_samples"] == len(b) and info["decoded"] == len(b) and info["decode_failures"] == 0
    assert info["num_classes"] == 4 and info["classes_from_report"] and info["report_matches"] is True
    assert info["empty_classes"] == 1
    r = run_cli("--inspect", beton_with_skips)
    assert r.returncode == 0 and "decode check" in r.stdout


def test_inspect_broken_files_exit_2_without_traceback(beton_with_skips, tmp_path):
    paths = _broken_copies(beton_with_skips, tmp_path)
    for name in ("truncated_half", "random", "text", "empty"):
        r = run_cli("--inspect", paths[name])
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "not a valid .beton" in r.stderr
    r = run_cli("--inspect", tmp_path / "absent.beton")
    assert r.returncode == 2 and "cannot open" in r.stderr


def test_inspect_catches_corrupt_image_data(beton_with_skips, tmp_path):
    """Layout intact, JPEG payloads overwritten: the decode check fails and exits 2."""
    bad = tmp_path / "scrambled.beton"
    shutil.copy(beton_with_skips, bad)
    b = Beton(bad)
    data = bytearray(bad.read_bytes())
    for ptr, size in zip(b.alloc_table["ptr"], b.alloc_table["size"]):
        data[int(ptr) : int(ptr) + int(size)] = bytes(int(size))
    del b
    bad.write_bytes(bytes(data))
    r = run_cli("--inspect", bad, "--json")
    assert r.returncode == 2
    info = json.loads(r.stdout)
    assert info["decode_failures"] == info["decoded"] > 0

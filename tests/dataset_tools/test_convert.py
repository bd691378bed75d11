"""deit3-convert on synthetic trees: counts, labels, the report, bad inputs, subsets, class lists, exit codes."""

import gc
import json
import os

import numpy as np
import pytest
from PIL import Image

from dataset_tools import writer
from dataset_tools.beton import Beton
from dataset_tools.convert import convert
from dataset_tools.errors import ConversionError, SourceError

from ..conftest import collector_off, no_leftovers, run_cli


def _image_files(root, cls):
    return sorted(os.listdir(root / cls))


def test_clean_tree_labels_follow_sorted_class_folders(good_tree, tmp_path):
    out = tmp_path / "train.beton"
    report = convert(str(good_tree), str(out), workers=2, show_progress=False)
    b = Beton(out)
    assert report["classes"] == sorted(os.listdir(good_tree))
    assert report["num_written"] == len(b) == 40 and report["num_skipped"] == 0
    # Samples are stored class by class in sorted order: label i is the i-th class folder.
    assert b.labels().tolist() == [label for label in range(5) for _ in range(8)]
    assert report["class_counts"] == [8] * 5
    assert json.loads((tmp_path / "train.beton.json").read_text()) == report
    for key in ("options", "source", "version", "elapsed_s", "images_per_s", "skipped", "source_size"):
        assert key in report
    # Stored images are the sources' sizes (all below the max resolution).
    w, h = Image.open(good_tree / "class_00" / "img_0000.JPEG").size
    assert (b.image_meta()["width"][0], b.image_meta()["height"][0]) == (w, h)


def test_every_bad_input_is_skipped_or_converted_and_reported(bad_tree, tmp_path):
    root, expected = bad_tree
    out = tmp_path / "bad.beton"
    report = convert(str(root), str(out), workers=2, write_mode="raw", show_progress=False)
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == set(expected["skipped"])
    for path, fragment in expected["skipped"].items():
        assert fragment in skipped[path], (path, skipped[path])
    assert report["empty_classes"] == ["zz_empty_class"]
    assert report["classes"][-1] == "zz_empty_class" and report["class_counts"][-1] == 0
    good_in_class0 = 6 + len(expected["converted"])
    assert report["class_counts"] == [good_in_class0, 6, 6, 0]
    assert report["num_written"] == len(Beton(out)) == good_in_class0 + 12
    assert report["converted_to_rgb"] == {"L": 1, "CMYK": 1, "P": 1, "RGBA": 1, "I;16": 1}
    assert report["num_skipped"] == len(report["skipped"]) == len(expected["skipped"])

    # Raw mode stores the converted pixels exactly: compare each with its reference conversion.
    b = Beton(out)
    written = [f for f in _image_files(root, "class_00") if f"class_00/{f}" not in expected["skipped"]]
    for idx, name in enumerate(written):
        src = Image.open(root / "class_00" / name)
        got = b.decode(idx)
        if src.mode == "I;16":
            ref = np.repeat(np.rint(np.asarray(src, dtype=np.float64) / 257.0).astype(np.uint8)[..., None], 3, 2)
        else:
            ref = np.asarray(src.convert("RGB"))  # torchvision ImageFolder's loader
        np.testing.assert_array_equal(got, ref, err_msg=name)


def test_png_named_jpeg_is_decoded_by_content(bad_tree, tmp_path):
    root, _ = bad_tree
    report = convert(str(root), str(tmp_path / "o.beton"), workers=1, show_progress=False)
    assert not any("png_named" in s["path"] for s in report["skipped"])


def test_strict_stops_on_first_bad_file_and_leaves_nothing(bad_tree, tmp_path):
    root, _ = bad_tree
    r = run_cli(root, tmp_path / "s.beton", "--strict", "--workers", "2")
    assert r.returncode == 2
    assert "--strict" in r.stderr and "class_00/" in r.stderr
    assert no_leftovers(tmp_path, "s.beton") == []
    with pytest.raises(ConversionError):
        convert(str(root), str(tmp_path / "s2.beton"), strict=True, workers=1, show_progress=False)


@pytest.mark.parametrize(
    "case",
    [
        "missing_src",
        "src_is_file",
        "no_class_folders",
        "all_classes_empty",
        "all_files_bad",
        "out_folder_missing",
        "out_is_folder",
    ],
)
def test_fatal_input_is_one_line_and_exit_2(case, tmp_path):
    src, out = tmp_path / "src", tmp_path / "o.beton"
    if case == "src_is_file":
        src.write_text("x")
    elif case == "no_class_folders":
        src.mkdir()
        (src / "loose.JPEG").write_bytes(b"")
    elif case == "all_classes_empty":
        (src / "a").mkdir(parents=True)
        (src / "b").mkdir()
    elif case == "all_files_bad":
        (src / "a").mkdir(parents=True)
        (src / "a" / "x.JPEG").write_bytes(b"")
        (src / "a" / "y.JPEG").write_bytes(b"not an image")
    elif case in ("out_folder_missing", "out_is_folder"):
        (src / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(src / "a" / "x.JPEG")
        out = tmp_path / "nope" / "o.beton" if case == "out_folder_missing" else tmp_path
    r = run_cli(src, out, "--workers", "1")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deit3-convert: error: "), r.stderr
    assert "Traceback" not in r.stderr
    if case != "out_is_folder":
        assert no_leftovers(out.parent if out.parent.exists() else tmp_path, "o.beton") == []


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--jpeg-quality", "0"], "--jpeg-quality"),
        (["--fraction", "1.5"], "--fraction"),
        (["--max-per-class", "0"], "--max-per-class"),
        (["--workers", "0"], "--workers"),
        (["--max-resolution", "2"], "--max-resolution"),
        (["--compress-probability", "2"], "--compress-probability"),
    ],
)
def test_bad_option_values_name_the_option(good_tree, tmp_path, args, fragment):
    r = run_cli(good_tree, tmp_path / "o.beton", *args)
    assert r.returncode == 2 and fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_subsets_are_deterministic_and_per_class(good_tree, tmp_path):
    def picked(name, **kw):
        rep = convert(str(good_tree), str(tmp_path / name), workers=1, show_progress=False, **kw)
        return rep, Beton(tmp_path / name)

    rep_a, a = picked("a.beton", max_per_class=3, seed=1)
    rep_b, b = picked("b.beton", max_per_class=3, seed=1)
    rep_c, c = picked("c.beton", max_per_class=3, seed=2)
    assert rep_a["class_counts"] == [3] * 5
    pix = lambda bt: [bt.decode(i).tobytes() for i in range(len(bt))]  # noqa: E731
    assert pix(a) == pix(b)
    assert pix(a) != pix(c)
    rep_f, f = picked("f.beton", fraction=0.5, seed=0)
    assert rep_f["class_counts"] == [4] * 5
    rep_fk, _ = picked("fk.beton", fraction=0.5, max_per_class=2)
    assert rep_fk["class_counts"] == [2] * 5
    assert rep_f["files_found_per_class"] == [8] * 5


def test_classes_file_keeps_labels_of_another_split(good_tree, tmp_path):
    train = tmp_path / "train.beton"
    convert(str(good_tree), str(train), workers=1, show_progress=False)
    val = tmp_path / "val"
    for cls in ("class_01", "class_03"):  # a split that lacks some classes
        (val / cls).mkdir(parents=True)
        Image.open(good_tree / cls / "img_0000.JPEG").save(val / cls / "v.JPEG")
    out = tmp_path / "val.beton"
    rep = convert(str(val), str(out), classes_file=str(train) + ".json", workers=1, show_progress=False)
    assert rep["classes"] == json.loads((tmp_path / "train.beton.json").read_text())["classes"]
    assert Beton(out).labels().tolist() == [1, 3]
    # The same list as plain text works too; an unknown class folder is refused.
    (tmp_path / "classes.txt").write_text("class_01\nclass_03\n")
    assert convert(str(val), str(out), classes_file=str(tmp_path / "classes.txt"), workers=1, show_progress=False)[
        "class_counts"
    ] == [1, 1]
    (val / "class_99").mkdir()
    with pytest.raises(SourceError, match="class_99"):
        convert(str(val), str(out), classes_file=str(tmp_path / "classes.txt"), workers=1, show_progress=False)


def test_symlinks_followed_loops_and_broken_links_reported(good_tree, tmp_path):
    src = tmp_path / "src"
    (src / "a" / "sub").mkdir(parents=True)
    Image.open(good_tree / "class_00" / "img_0000.JPEG").save(src / "a" / "sub" / "x.JPEG")
    os.symlink(good_tree / "class_00" / "img_0001.JPEG", src / "a" / "linked.JPEG")
    os.symlink(src / "a", src / "a" / "sub" / "loop")
    os.symlink(tmp_path / "missing.JPEG", src / "a" / "broken.JPEG")
    (src / "a" / ".hidden.JPEG").write_bytes(b"")
    rep = convert(str(src), str(tmp_path / "o.beton"), workers=1, show_progress=False)
    assert rep["num_written"] == 2
    reasons = {s["path"]: s["reason"] for s in rep["skipped"]}
    assert reasons == {
        "a/broken.JPEG": "broken symbolic link",
        "a/sub/loop": "symbolic link loop: folder already visited",
    }
    assert rep["num_skipped"] == 2  # problems met while walking count as skipped files too


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of their permissions")
def test_unreadable_file_is_skipped(good_tree, tmp_path):
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    Image.open(good_tree / "class_00" / "img_0000.JPEG").save(src / "ok.JPEG")
    (src / "secret.JPEG").write_bytes((src / "ok.JPEG").read_bytes())
    os.chmod(src / "secret.JPEG", 0)
    rep = convert(str(src.parent), str(tmp_path / "o.beton"), workers=1, show_progress=False)
    assert [s["reason"] for s in rep["skipped"]] == ["unreadable: Permission denied"]


def test_write_modes(good_tree, tmp_path):
    raw = convert(str(good_tree), str(tmp_path / "raw.beton"), write_mode="raw", workers=1, show_progress=False)
    assert raw["num_written"] == 40 and (Beton(tmp_path / "raw.beton").image_meta()["mode"] == 1).all()
    modes = []
    for name in ("p1.beton", "p2.beton"):
        convert(
            str(good_tree),
            str(tmp_path / name),
            write_mode="proportion",
            compress_probability=0.5,
            seed=3,
            workers=2,
            show_progress=False,
        )
        modes.append(Beton(tmp_path / name).image_meta()["mode"].copy())
    np.testing.assert_array_equal(modes[0], modes[1])  # same seed, same per-sample choice, any worker count
    assert 0 < (modes[0] == 0).sum() < 40


def test_max_resolution_resizes_longer_side(good_tree, tmp_path):
    rep = convert(str(good_tree), str(tmp_path / "r.beton"), max_resolution=64, workers=1, show_progress=False)
    meta = Beton(tmp_path / "r.beton").image_meta()
    assert max(meta["width"].max(), meta["height"].max()) == 64
    assert rep["stored_size"]["width"]["max"] <= 64 and rep["source_size"]["width"]["max"] > 64


def test_cli_success_prints_summary_and_report(good_tree, tmp_path):
    r = run_cli(good_tree, tmp_path / "o.beton", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "images written" in r.stdout and "40 of 40" in r.stdout
    assert json.loads((tmp_path / "o.beton.json").read_text())["num_written"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.beton", "o.beton.json", "o.beton.sources.txt"]


def test_class_order_is_torchvisions_case_sensitive_sort(tmp_path):
    """ImageFolder sorts class folders by name, case-sensitively ("B" < "C" < "a"): the same labels here."""
    from torchvision.datasets.folder import find_classes

    from dataset_tools.imagefolder import scan_imagefolder

    for name in ("a", "B", "C", "b_lower", "Z9", "10", "9"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "x.JPEG")
    scan = scan_imagefolder(tmp_path)
    assert scan.classes == find_classes(str(tmp_path))[0] == ["10", "9", "B", "C", "Z9", "a", "b_lower"]
    assert [label for _, label in scan.samples] == list(range(7))


def test_fraction_keeps_round_half_up_of_each_class_and_at_least_one(tmp_path):
    """--fraction F keeps floor(F * n + 0.5) images of a class of n (at least 1): 0.3 of 5 is 2, of 7 is 2, of 9
    is 3, of 1 is 1; 0.5 of 3 is 2."""
    from dataset_tools.imagefolder import scan_imagefolder

    for n in (1, 3, 5, 7, 9):
        (tmp_path / f"c{n}").mkdir()
        for i in range(n):
            Image.new("RGB", (8, 8)).save(tmp_path / f"c{n}" / f"{i}.JPEG")
    counts = lambda f: [
        sum(1 for _, label in scan_imagefolder(tmp_path, fraction=f).samples if label == k)  # noqa: E731
        for k in range(5)
    ]
    assert counts(0.3) == [1, 1, 2, 2, 3]
    assert counts(0.5) == [1, 2, 3, 4, 5]
    assert counts(1.0) == [1, 3, 5, 7, 9]


class _FinalizedInAWorker:
    """Cyclic garbage whose finalizer leaves a mark if it runs in another process than the one that made it."""

    def __init__(self, mark):
        self.me, self.mark, self.maker = self, mark, os.getpid()

    def __del__(self):
        if os.getpid() != self.maker:
            self.mark.touch()


def test_workers_never_run_the_callers_finalizers(good_tree, tmp_path, monkeypatch):
    """Garbage the caller has not collected yet when convert forks its workers is never collected in a worker: its
    finalizer would run there (a dropped DALI pipeline's destructor hung a worker, destroying the caller's executor)."""
    real_worker = writer._worker

    def collecting_worker(*args):
        gc.collect()  # what a worker's allocations make the collector do sooner or later
        real_worker(*args)

    monkeypatch.setattr(writer, "_worker", collecting_worker)
    mark = tmp_path / "finalized-in-a-worker"
    with collector_off():  # so that the garbage is still there when the workers fork
        for _ in range(10):
            _FinalizedInAWorker(mark)
        convert(str(good_tree), str(tmp_path / "out.beton"), workers=2, show_progress=False)
    assert not mark.exists()

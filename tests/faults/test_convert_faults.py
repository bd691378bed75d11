"""Faults during conversion, each injected for real: bad files, link loops, files the process may not read, a class
folder deleted while the writers run, a full disk (tmpfs) and a file-size limit, a writer process killed, and a kill
on the temp-file fallback path. Every outcome is either a written .beton whose report lists what was skipped (exit 0),
or one line on stderr with exit 2 and nothing left behind; a re-run then succeeds.

Covered elsewhere with the same real injection (not repeated here):
  tests/dataset_tools/test_interrupts.py::test_interrupt_leaves_nothing_and_rerun_succeeds
      Ctrl-C, SIGTERM, SIGKILL mid-write
  tests/dataset_tools/test_interrupts.py::test_existing_output_survives_a_failed_run
      an older OUT is kept when a run fails
  tests/dataset_tools/test_convert.py::test_every_bad_input_is_skipped_or_converted_and_reported
      pixels of CMYK/16-bit/palette...
  tests/dataset_tools/test_convert.py::test_strict_stops_on_first_bad_file_and_leaves_nothing
      --strict on a bad file
  tests/dataset_tools/test_convert.py::test_fatal_input_is_one_line_and_exit_2
      missing/empty source, bad output path
"""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from dataset_tools.convert import convert
from dataset_tools.synthetic import add_bad_inputs, make_imagefolder

from ..conftest import REPO, no_leftovers, run_cli
from .conftest import (
    CONVERT,
    drop_root_file_access,
    file_size_limit,
    link_tree,
    permission_faults_possible,
    resize_tmpfs,
    start_convert,
    tmpfs,
    wait_gone,
    writer_processes,
)


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deit3-convert: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def _report(out) -> dict:
    return json.loads(open(f"{out}.json").read())


def test_bad_files_and_link_loops_are_skipped_and_listed(tmp_path):
    """Zero-byte, truncated, corrupt, non-image, CMYK, 16-bit PNG, PNG named .JPEG, palette/RGBA, file link loops,
    a folder link loop and a broken link, all in one tree, through the command line."""
    src = tmp_path / "src"
    make_imagefolder(src, num_classes=2, per_class=3, seed=3, max_side=64)
    expected = add_bad_inputs(src, src / "class_01" / "img_0000.JPEG")
    d = src / "class_01"
    os.symlink("loop_b.JPEG", d / "loop_a.JPEG")  # a -> b -> a
    os.symlink("loop_a.JPEG", d / "loop_b.JPEG")
    os.symlink("self.JPEG", d / "self.JPEG")  # a link to itself
    os.symlink(d, d / "again")  # a folder link back to its own class folder
    os.symlink(tmp_path / "gone.JPEG", d / "broken.JPEG")
    out = tmp_path / "o.beton"
    r = run_cli(src, out, "--workers", "2")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    reasons = {s["path"]: s["reason"] for s in _report(out)["skipped"]}
    for path, fragment in expected["skipped"].items():
        assert fragment in reasons.pop(path)
    assert reasons == {
        "class_01/loop_a.JPEG": "unreadable: Too many levels of symbolic links",
        "class_01/loop_b.JPEG": "unreadable: Too many levels of symbolic links",
        "class_01/self.JPEG": "unreadable: Too many levels of symbolic links",
        "class_01/again": "symbolic link loop: folder already visited",
        "class_01/broken.JPEG": "broken symbolic link",
    }
    rep = _report(out)
    assert rep["num_written"] == 6 + len(expected["converted"]) and rep["empty_classes"] == ["zz_empty_class"]
    assert set(rep["converted_to_rgb"]) == {"L", "CMYK", "P", "RGBA", "I;16"}
    for path in ("zero_bytes.JPEG", "loop_a.JPEG", "broken.JPEG"):  # the summary names each skipped file
        assert f"skipped: class_00/{path}" in r.stdout or f"skipped: class_01/{path}" in r.stdout
    r = run_cli("--inspect", out, "--samples", "100")  # what was written decodes
    assert r.returncode == 0 and "decode check" in r.stdout, r.stderr


@pytest.fixture
def as_user():
    """Run the converter so that permission bits apply to it (root drops its bypass; anyone else already obeys)."""
    why = permission_faults_possible()
    if why:
        pytest.skip(why)
    return {"preexec_fn": drop_root_file_access} if os.geteuid() == 0 else {}


def test_unreadable_files_and_folders_are_skipped(tmp_path, as_user):
    src = tmp_path / "src"
    make_imagefolder(src, num_classes=3, per_class=2, seed=4, max_side=48)
    (src / "class_00" / "secret.JPEG").write_bytes((src / "class_00" / "img_0000.JPEG").read_bytes())
    os.chmod(src / "class_00" / "secret.JPEG", 0)
    (src / "class_01" / "locked").mkdir()
    shutil.copy(src / "class_01" / "img_0000.JPEG", src / "class_01" / "locked" / "x.JPEG")
    os.chmod(src / "class_01" / "locked", 0)
    os.chmod(src / "class_02", 0)  # a whole class folder: its label is kept, it is reported empty
    out = tmp_path / "o.beton"
    try:
        r = run_cli(src, out, "--workers", "1", "--quiet", **as_user)
        assert r.returncode == 0, r.stderr
        rep = _report(out)
        assert {s["path"]: s["reason"] for s in rep["skipped"]} == {
            "class_00/secret.JPEG": "unreadable: Permission denied",
            "class_01/locked": "unreadable folder: Permission denied",
            "class_02": "unreadable folder: Permission denied",
        }
        assert rep["class_counts"] == [2, 2, 0] and rep["empty_classes"] == ["class_02"]

        # Fatal: the source itself cannot be listed; the output folder cannot be written.
        os.chmod(src, 0o311)
        r = run_cli(src, tmp_path / "o2.beton", **as_user)
        assert r.returncode == 2 and "cannot be read: Permission denied" in _one_error_line(r.stderr)
        os.chmod(src, 0o755)
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        r = run_cli(src, ro / "o.beton", **as_user)
        assert r.returncode == 2 and "is not writable" in _one_error_line(r.stderr)
        assert list(ro.iterdir()) == []
    finally:
        for p in (src, src / "class_02", src / "class_01" / "locked", src / "class_00" / "secret.JPEG"):
            os.chmod(p, 0o755)


@pytest.mark.parametrize("strict", [False, True])
def test_class_folder_vanishes_mid_run(tmp_path, big_jpeg, strict):
    """The scan lists class_2; the writer is frozen (SIGSTOP) while still on class_0, class_2 is deleted, and the writer
    resumes. Without --strict its files are skipped as unreadable and the class is reported empty; with --strict the
    run stops with one line and writes nothing."""
    src = link_tree(tmp_path / "src", big_jpeg, {"class_0": 12})
    make_imagefolder(tmp_path / "small", num_classes=2, per_class=3, seed=5, max_side=48)
    os.rename(tmp_path / "small" / "class_00", src / "class_1")
    os.rename(tmp_path / "small" / "class_01", src / "class_2")
    out = tmp_path / "o.beton"
    proc = start_convert(
        src, out, "--workers", "1", "--max-resolution", "1600", "--quiet", *(["--strict"] if strict else [])
    )
    (writer,) = writer_processes(proc, 1)
    writer.suspend()
    shutil.rmtree(src / "class_2")
    writer.resume()
    _, err = proc.communicate(timeout=300)
    if strict:
        assert proc.returncode == 2
        line = _one_error_line(err)
        assert "class_2" in line and "No such file or directory" in line and "--strict" in line
        assert no_leftovers(tmp_path, "o.beton") == []
    else:
        assert proc.returncode == 0, err
        rep = _report(out)
        assert rep["classes"] == ["class_0", "class_1", "class_2"] and rep["class_counts"] == [12, 3, 0]
        assert rep["files_found_per_class"] == [12, 3, 3] and rep["empty_classes"] == ["class_2"]
        assert [s["reason"] for s in rep["skipped"]] == ["unreadable: No such file or directory"] * 3
        assert all(s["path"].startswith("class_2/") for s in rep["skipped"])


def test_disk_full_leaves_nothing_and_rerun_succeeds(tmp_path, good_tree):
    """A 4 MiB tmpfs: the first 8 MiB data page does not fit. After making room the same command succeeds."""
    with tmpfs(tmp_path / "disk", "4m") as disk:
        r = run_cli(good_tree, disk / "o.beton", "--workers", "2")
        assert r.returncode == 2
        assert "writing failed: No space left on device" in _one_error_line(r.stderr)
        assert list(disk.iterdir()) == [] and shutil.disk_usage(disk).used == 0
        resize_tmpfs(disk, "64m")
        r = run_cli(good_tree, disk / "o.beton", "--workers", "2", "--quiet")
        assert r.returncode == 0, r.stderr
        assert sorted(p.name for p in disk.iterdir()) == ["o.beton", "o.beton.json", "o.beton.sources.txt"]


def test_disk_full_at_the_report_leaves_nothing(tmp_path, good_tree):
    """The disk holds exactly the .beton, so the very last write (the JSON report) fails."""
    ref = tmp_path / "ref.beton"
    convert(str(good_tree), str(ref), workers=1, show_progress=False)  # the same command's output: its exact size
    pages = -(-ref.stat().st_blocks * 512 // 4096)  # the padding before the first page is a hole: not on disk
    with tmpfs(tmp_path / "disk", f"{pages * 4}k") as disk:
        r = run_cli(good_tree, disk / "o.beton", "--workers", "1", "--quiet")
        assert r.returncode == 2, r.stderr
        assert "No space left on device" in _one_error_line(r.stderr)
        assert list(disk.iterdir()) == []


@pytest.mark.parametrize("failing", ["o.beton.json", "o.beton.sources.txt", "o.beton"])
def test_a_failed_reconversion_leaves_the_previous_output_whole(tmp_path, good_tree, monkeypatch, failing):
    """Converting again over OUT, a full disk at the last writes (the report's or the source list's bytes, or naming
    the new .beton, which needs a directory entry) leaves the previous .beton and both its sidecars byte for byte,
    and no staged file."""
    from dataset_tools import atomic
    from dataset_tools.errors import ConversionError

    out = tmp_path / "o.beton"
    convert(str(good_tree), str(out), workers=1, show_progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_write, real_link = atomic.AtomicOutput.write_text, atomic._linkat_follow

    def full(name):
        if os.path.basename(name) in (failing, f".{failing}.partial-{os.getpid()}"):
            raise OSError(28, "No space left on device", name)

    monkeypatch.setattr(atomic.AtomicOutput, "write_text", lambda self, t: (full(self.final), real_write(self, t)))
    monkeypatch.setattr(atomic, "_linkat_follow", lambda src, dst: (full(dst), real_link(src, dst)))
    with pytest.raises(
        ConversionError,
        match=rf"writing .*{re.escape(failing)} failed: No space left on device; "
        "nothing was written",
    ):
        convert(str(good_tree), str(out), workers=1, show_progress=False, seed=1)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_many_shards_within_a_small_open_file_limit(tmp_path, good_tree):
    """40 shards under a limit of 100 open files: a staged report or source list holds no descriptor."""

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    r = run_cli(good_tree, tmp_path / "out", "--shards", "40", "--workers", "1", "--quiet", preexec_fn=limit)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "out").glob("*.beton.sources.txt"))) == 40


def test_file_size_limit_leaves_nothing(tmp_path, good_tree):
    """RLIMIT_FSIZE (a quota, or a full disk where tmpfs cannot be mounted): writes fail with EFBIG. The source tree
    is only ever read: every file keeps its bytes and mtime."""
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in good_tree.rglob("*") if p.is_file()}
    r = run_cli(good_tree, tmp_path / "o.beton", "--workers", "2", preexec_fn=file_size_limit(1 << 20))
    assert r.returncode == 2
    assert "writing failed: File too large" in _one_error_line(r.stderr)
    assert list(tmp_path.iterdir()) == []
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in good_tree.rglob("*") if p.is_file()} == before


def test_killed_writer_process_stops_the_run(tmp_path, big_jpeg):
    """One writer SIGKILLed (what the OOM killer does): the converter stops with one line instead of waiting forever,
    its other writer goes too, and nothing is written."""
    src = link_tree(tmp_path / "src", big_jpeg, {"a": 40, "b": 40})
    proc = start_convert(src, tmp_path / "o.beton", "--workers", "2", "--max-resolution", "1600", "--quiet")
    writers = writer_processes(proc, 2)
    writers[0].kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "a writer process died (exit code -9" in _one_error_line(err)
    assert wait_gone(writers)
    assert no_leftovers(tmp_path, "o.beton") == []


@pytest.mark.slow
def test_sigkill_on_the_temp_file_fallback_path(tmp_path, big_jpeg):
    """Where O_TMPFILE is unavailable (NFS, Lustre; here the converter runs without it) a SIGKILL leaves the hidden
    `.OUT.partial-PID`, but never OUT; the next run sweeps the stale file and succeeds.

    Not timing-dependent: the converter and its writers are frozen (SIGSTOP to the process group) as soon as the
    writers are seen, so a loaded machine cannot let the write finish between the check and the kill."""
    src = link_tree(tmp_path / "src", big_jpeg, {"a": 100, "b": 100})
    out = tmp_path / "o.beton"
    no_tmpfile = "import os, sys; del os.O_TMPFILE; from dataset_tools.convert import main; sys.exit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", no_tmpfile, str(src), str(out), "--workers", "2", "--max-resolution", "1600", "--quiet"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    writers = writer_processes(proc, 2)
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        assert no_leftovers(tmp_path, "o.beton") == [f".o.beton.partial-{proc.pid}"]
        proc.send_signal(signal.SIGKILL)
    finally:
        os.killpg(proc.pid, signal.SIGCONT)  # the writers, stopped, must run to receive their parent's death
    proc.communicate(timeout=60)
    assert wait_gone(writers), "writer processes outlived the converter"
    assert no_leftovers(tmp_path, "o.beton") == [f".o.beton.partial-{proc.pid}"]  # never a half OUT
    r = subprocess.run(
        [*CONVERT, str(src), str(out), "--workers", "2", "--max-per-class", "2", "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert no_leftovers(tmp_path, "o.beton") == ["o.beton"]

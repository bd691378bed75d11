"""scripts/gpu-check.sh: what one call on a lent GPU machine brings back. Its quick mode runs every step on the CPU at
toy sizes, here with ffcv, DALI and submitit unimportable as on that machine."""

import json
import subprocess
import sys
from xml.etree import ElementTree

import pytest

from .conftest import REPO, env_without

pytestmark = pytest.mark.slow  # ~30-40 s on 2 cores: eight fresh Pythons, each importing torch

SCRIPT = REPO / "scripts" / "gpu-check.sh"
# What a device call may bring back, and what one call may run for (the call's limit is 10 minutes).
MAX_FILES, MAX_SECONDS = 8, 480


def plan(**env) -> list[tuple[str, int]]:
    out = subprocess.run(["bash", SCRIPT, "--plan"], capture_output=True, text=True, check=True, env=env or None)
    return [(name, int(limit)) for name, limit in (line.split() for line in out.stdout.splitlines())]


def test_the_steps_fit_one_call_with_the_compiling_tests_last():
    steps = plan()
    assert sum(limit for _, limit in steps) <= MAX_SECONDS, steps
    assert [name for name, _ in steps][:2] == ["data", "doctor"] and steps[-1][0] == "cuda_compile_tests"


def test_a_quick_run_brings_back_a_summary_a_log_and_junit_and_a_timed_out_step_does_not_stop_the_rest(tmp_path):
    out = tmp_path / "out"
    env = env_without(tmp_path / "site", "ffcv", "nvidia.dali", "submitit")
    env.update(PYTHON=sys.executable, GPU_CHECK_LIMITS="doctor=1", TMPDIR=str(tmp_path))
    r = subprocess.run(["bash", SCRIPT, "--quick", out], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert [(name, s["limit_s"]) for name, s in steps.items()] == plan(**env)
    # The doctor, interrupted at 1 s, is recorded as timed out; every step after it ran and passed.
    assert steps["doctor"]["status"] == "timeout" and steps["doctor"]["exit"] in (124, 137), r.stdout[-3000:]
    for name, step in steps.items():
        if name != "doctor":
            assert step["status"] == "ok" and step["exit"] == 0, (name, r.stdout[-3000:])
        assert step["seconds"] >= 0
    assert r.returncode == 1 and summary["mode"] == "quick" and summary["finished"]

    # Each step's numbers: the benchmarks' JSON and the tests' outcomes, in the summary itself.
    for bench in ("bench_s224", "bench_b192"):
        (row,) = steps[bench]["numbers"]["rows"]
        assert row["model_img_per_s"] > 0 and row["engine_alone"]["nvjpeg"][0] > 0
        # A loaded CPU may fail the measurement (profile.implausible): then no MFU, and the row says why.
        assert (0 < row["mfu"] < 1) if row["mfu"] is not None else row.get("measurement_failed"), row
        assert row["engines"]["nvjpeg"] > 0
    assert steps["lamb"]["numbers"]["ms_per_step"].keys() == {"timm Lamb", "ours (eager)"}
    (parity,) = steps["parity"]["numbers"].values()
    assert parity["labels_equal"] and parity["images"] > 0 and parity["max_abs_diff"] <= 1
    for name, xml in (("cuda_tests", "cuda-tests.xml"), ("cuda_compile_tests", "cuda-compile-tests.xml")):
        numbers = steps[name]["numbers"]
        assert numbers["skipped"] == len(numbers["tests"]) > 0  # no CUDA here: every cuda test skips, saying why
        assert ElementTree.parse(out / xml).getroot().iter("testcase")
    assert not steps["cuda_tests"]["numbers"]["tests"].keys() & steps["cuda_compile_tests"]["numbers"]["tests"].keys()

    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES and {"summary.json", "gpu-check.log", "cuda-tests.xml"} <= set(files), files
    log = (out / "gpu-check.log").read_text()
    assert "== doctor: timeout" in log and "== cuda_compile_tests: ok" in log

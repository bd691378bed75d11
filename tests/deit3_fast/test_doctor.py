"""`deit3-fast doctor` on a machine without a GPU: it runs, says so for every GPU item, and measures what it can."""

import json
import subprocess
import sys

import pytest

from ..conftest import REPO, env_without


def doctor(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "deit3_fast", "doctor", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def beton(data):
    return data / "train.beton"


def test_doctor_json_without_a_gpu(beton):
    r = doctor("--json", "--data-train", beton, "--engine", "nvjpeg", "--steps", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    for name in ("python", "torch", "torchvision", "timm", "numpy", "CPU cores", "matmul", "loader vs model"):
        assert name in checks, name
    assert report["gpu"] is False and report["broken"] == [] and report["jpeg_decoder"] == "CPU (libjpeg-turbo)"
    assert checks["GPU"]["status"] == "missing" and "CUDA_VISIBLE_DEVICES" in checks["GPU"]["fix"]
    assert checks["nvJPEG decode"]["status"] == "skipped" and checks["all-reduce"]["status"] == "skipped"
    assert "TFLOP/s bf16" in checks["matmul"]["detail"]
    assert "nvjpeg engine" in checks["loader vs model"]["detail"] and "img/s" in checks["loader vs model"]["detail"]
    assert all(c["status"] in ("ok", "missing", "broken", "skipped", "info") for c in report["checks"])


def test_doctor_require_gpu_exits_1_and_the_table_names_fixes():
    r = doctor("--require-gpu", "--no-throughput")
    assert r.returncode == 1
    assert "no usable GPU" in r.stderr and "GPU" in r.stdout and "missing" in r.stdout


@pytest.mark.slow
def test_a_missing_optional_package_is_missing_with_its_fix(monkeypatch):
    from deit3_fast import doctor as d

    real = d._version
    monkeypatch.setattr(d, "_version", lambda m: None if m in ("ffcv", "nvidia.dali", "submitit") else real(m))
    checks = {c.name: c for c in d.versions()}
    assert checks["ffcv"].status == "missing" and checks["ffcv"].fix == "pip install -e '.[ffcv]'"
    assert checks["DALI"].status == "missing" and "[dali]" in checks["DALI"].fix
    assert checks["submitit"].status == "missing" and "Slurm" in checks["submitit"].detail
    assert not any(c.status == "broken" for c in checks.values())
    # Conversion needs no ffcv: the throughput check writes its own .beton and reads it with the nvjpeg engine.
    throughput = d.throughput(__import__("torch").device("cpu"), None, None, 1)
    assert throughput.status not in ("skipped", "broken") and "nvjpeg" in throughput.detail


def test_the_cli_works_on_a_bare_gpu_machine_without_ffcv_dali_or_submitit(tmp_path, beton):
    """What a lent GPU machine has: torch, torchvision, timm, numba, but no ffcv, DALI or submitit. doctor, train
    and eval with the nvjpeg engine must work there; submit says what is missing in one line."""
    env = env_without(tmp_path / "block", "ffcv", "submitit", "nvidia.dali")

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "deit3_fast", *map(str, args)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )

    r = cli("doctor", "--json", "--data-train", beton, "--steps", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    checks = {c["name"]: c["status"] for c in json.loads(r.stdout)["checks"]}
    assert checks["ffcv"] == checks["DALI"] == checks["submitit"] == "missing" and checks["loader vs model"] != "broken"
    r = cli(
        "train",
        "--cfg",
        "quickstart",
        "--data-train",
        beton,
        "--data-val",
        beton,
        "--engine",
        "nvjpeg",
        "--set",
        "model.num_classes=4",
        "--set",
        "schedule.epochs=1",
        "--out",
        tmp_path / "run",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("submit", "--cfg", "quickstart", "--local", "--out", tmp_path / "job")
    assert r.returncode == 2 and "pip install submitit" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_doctors_verdict_is_profiles_plausibility_check(beton, monkeypatch):
    """doctor's loader-vs-model row flipped between identical runs the way profile's verdict did: it reads
    profile's verdict, so numbers that cannot be (end to end at 262% of the model alone) are a failed measurement
    there too, never `ok`/compute-bound, and a plausible measurement keeps its verdict."""
    import torch

    import deit3_fast.profile as prof
    from deit3_fast import doctor as d

    def fake(model, end_to_end):
        def measure(run, device, steps, repeats):
            return prof.Measurements(
                engine=(1000.0,) * 3,
                engine_cpu_cores=1.0,
                device_stage=(2000.0,) * 3,
                loader=(900.0,) * 3,
                model=(model,) * 3,
                end_to_end=(end_to_end,) * 3,
                micro_batch_ms=10.0,
                end_to_end_micro_batch_ms=10.0,
                optimizer_step_ms=1.0,
                peak_tflops=(1.0,) * 3,
            )

        return measure

    monkeypatch.setattr(prof, "measure", fake(100.0, 262.0))
    check = d.throughput(torch.device("cpu"), str(beton), "nvjpeg", 1)
    assert check.status == "info" and "measurement failed (end-to-end 262% of model-alone" in check.detail
    assert "compute-bound" not in check.detail and "rerun on an idle machine" in check.fix
    monkeypatch.setattr(prof, "measure", fake(100.0, 99.0))
    check = d.throughput(torch.device("cpu"), str(beton), "nvjpeg", 1)
    assert check.status == "ok" and "(99%)" in check.detail and ": compute-bound" in check.detail and check.fix is None

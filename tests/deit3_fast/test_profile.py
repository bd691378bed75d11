"""`deit3-fast profile`: the measurements a user reads to tell input-bound from compute-bound, and the verdict."""
import json
import os
import subprocess
import sys

import pytest

from deit3_fast.config import load_config
from deit3_fast.profile import matmul_peak_tflops, verdict

from ..conftest import REPO


def test_profile_json_on_cpu(data):
    r = subprocess.run([sys.executable, "-m", "deit3_fast", "profile", "--cfg", "quickstart", "--device", "cpu",
                        "--data-train", str(data / "train.beton"), "--set", "model.num_classes=4", "--steps", "3",
                        "--json"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("loader_img_per_s", "model_img_per_s", "end_to_end_img_per_s", "engine_img_per_s",
                "device_stage_img_per_s", "mfu", "achieved_tflops", "peak_tflops"):
        assert result[key] > 0, key
    # deit3_nano at 32 px: 2 blocks of dim 64 over 65 tokens; forward + backward is about 3x the forward's
    # 2 * params * tokens multiply-adds, plus attention: between 20 and 100 MFLOP per image.
    assert 0.02 < result["gflop_per_image"] < 0.1
    assert 0 < result["mfu"] < 1
    assert result["verdict"] in ("input-bound", "compute-bound")
    assert result["ratio"] == pytest.approx(result["end_to_end_img_per_s"] / result["model_img_per_s"], rel=1e-2)
    # The CPU stage per busy core, and the cores a GPU needs at its nominal rate (40% MFU) for this model's FLOPs.
    per_core = result["cpu_stage_img_per_s_per_core"]
    assert per_core >= result["engine_img_per_s"] / os.cpu_count() * 0.5
    cores = result["cores_per_gpu"]
    assert list(cores) == ["V100 fp16 @ 40% MFU", "A100 bf16 @ 40% MFU", "H100 bf16 @ 40% MFU"]
    h100 = 989e12 * 0.4 / (result["gflop_per_image"] * 1e9)
    assert cores["H100 bf16 @ 40% MFU"] == pytest.approx(h100 / per_core, rel=1e-2)  # the JSON rounds


def test_cores_per_gpu_is_the_gpus_rate_over_the_per_core_rate():
    from deit3_fast.profile import cores_per_gpu

    # ViT-S@224 trains at ~27.6 GFLOP/image: an H100 at 40% MFU takes ~14,300 img/s; at 200 img/s per core (the
    # official pipeline here) that is ~72 cores, at 2,000 (ours) ~7.
    gpu, cores = cores_per_gpu(27.6, 200.0, 989.0, 0.4)
    assert gpu == pytest.approx(14333, rel=1e-3) and cores == pytest.approx(71.7, rel=1e-2)
    assert cores_per_gpu(27.6, 2000.0, 989.0, 0.4)[1] == pytest.approx(cores / 10)


def test_profile_table_and_bad_input(data, tmp_path):
    r = subprocess.run([sys.executable, "-m", "deit3_fast", "profile", "--cfg", "quickstart", "--device", "cpu",
                        "--data-train", str(tmp_path / "missing.beton"), "--steps", "2"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.beton" in r.stderr


def test_tune_tries_only_settings_that_change_the_run(monkeypatch):
    """A knob an engine ignores on the device keeps the config's value: on a GPU nvjpeg decodes a batch in one
    nvJPEG call and has no CPU threads, so three worker counts would be one run measured three times; os_cache is
    tried both ways only where the engine takes it. What each engine does is the registry's, as --tune reads it."""
    from deit3_fast.tune import candidates
    from pipelines.registry import engine_info

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    cfg = load_config("quickstart", ["data.workers=5"])
    for device in ("cuda", "cpu"):
        tried = candidates(cfg, device)
        assert len({tuple(sorted(t.items())) for t in tried}) == len(tried)
        for engine in {t["data.engine"] for t in tried}:
            info, mine = engine_info(engine), [t for t in tried if t["data.engine"] == engine]
            workers = {t["data.workers"] for t in mine}
            assert workers == ({4, 8, 16} if info.uses_workers(device) else {5})
            assert {t["data.os_cache"] for t in mine} == ({True, False} if info.os_cache else {cfg.data.os_cache})
            assert len(mine) == len(workers) * (2 if info.os_cache else 1)
    on_gpu = [t for t in candidates(cfg, "cuda") if t["data.engine"] == "nvjpeg"]
    assert [t["data.workers"] for t in on_gpu] == [5]
    assert len([t for t in candidates(cfg, "cpu") if t["data.engine"] == "nvjpeg"]) == 3


def _result(**rates):
    base = {"engine_img_per_s": 1000.0, "device_stage_img_per_s": 1000.0, "model_img_per_s": 500.0,
            "end_to_end_img_per_s": 490.0}
    base.update(rates)
    base["ratio"] = base["end_to_end_img_per_s"] / base["model_img_per_s"]
    return base


def test_verdict_names_the_slowest_stage_and_the_fix():
    cfg = load_config("quickstart")
    assert verdict(_result(), cfg)["verdict"] == "compute-bound"  # 98% of the model alone
    slow_decode = verdict(_result(engine_img_per_s=200.0, end_to_end_img_per_s=190.0), cfg)
    assert slow_decode["verdict"] == "input-bound" and slow_decode["slowest_stage"] == "engine"
    assert "data.workers" in slow_decode["advice"] and "--engine dali" in slow_decode["advice"]
    slow_aug = verdict(_result(device_stage_img_per_s=300.0, end_to_end_img_per_s=280.0), cfg)
    assert slow_aug["slowest_stage"] == "device_stage" and "train.compile" in slow_aug["advice"]
    contended = verdict(_result(end_to_end_img_per_s=400.0), cfg)  # each stage is fast enough alone
    assert contended["verdict"] == "input-bound" and "share" in contended["advice"]


def test_matmul_peak_is_measured():
    import torch

    peak = matmul_peak_tflops(torch.device("cpu"), torch.float32)
    assert 1e-4 < peak < 100  # a CPU does between 0.1 GFLOP/s and 100 TFLOP/s


def test_profile_numbers_are_possible_with_accumulation_and_one_step(data):
    """The report that gave "mfu": 3.08 and end-to-end 0.06x model-alone: one timed step, accumulation over 4
    micro-batches. Windows hold one kind of call after warm-up, so a window cannot catch a one-time cost or the
    optimiser step's share; MFU is against this dtype's matmul rate at the model's GEMM and never above 100%."""
    r = subprocess.run([sys.executable, "-m", "deit3_fast", "profile", "--cfg", "quickstart", "--device", "cpu",
                        "--data-train", str(data / "train.beton"), "--set", "model.num_classes=4", "--set",
                        "data.batch_size=4", "--set", "train.global_batch=16", "--set", "train.amp=bf16",
                        "--steps", "1", "--json"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["accum"] == 4 and res["amp"] == "bf16"
    assert 0 < res["mfu"] <= 1 and res["peak_tflops"] >= res["achieved_tflops"]
    # The faulty windows gave 0.06: one-time costs and a different share of optimiser steps in each.
    assert res["ratio"] > 0.2, res
    expected = 16 / (4 * res["micro_batch_ms"] + res["optimizer_step_ms"]) * 1e3
    assert res["model_img_per_s"] == pytest.approx(expected, rel=1e-3)


def test_model_gemm_and_peak_use_the_models_shape_and_dtype():
    import torch

    from deit3_fast.models import create_model
    from deit3_fast.profile import model_gemm, nominal_tflops

    with torch.device("meta"):
        m = create_model("deit3_huge", img_size=160)
    assert model_gemm(m, 64, torch.device("cuda")) == (64 * 122, 1280, 5120)  # 11 x 11 patches + class token
    assert model_gemm(m, 64, torch.device("cpu"))[0] == 2048
    assert matmul_peak_tflops(torch.device("cpu"), torch.bfloat16, 256, 128, 512) > 0
    assert nominal_tflops(torch.device("cpu"), "bf16") is None


def test_tune_tries_settings_within_its_budget_and_writes_usable_overrides(data, tmp_path):
    """profile --tune on the quickstart: each installed engine and worker count (and compile on the best), a table
    line each, the winner as an override YAML that --overrides applies; it ends within its budget."""
    import json
    import subprocess
    import sys

    import yaml

    from ..conftest import REPO

    out = tmp_path / "tuned.yaml"
    common = ["--cfg", "quickstart", "--data-train", str(data / "train.beton"), "--set", "model.num_classes=4",
              "--set", "data.batch_size=8", "--set", "train.global_batch=8", "--set", "data.repeats=1",
              "--device", "cpu"]
    r = subprocess.run([sys.executable, "-m", "deit3_fast", "profile", *common, "--tune", "--budget-s", "40",
                        "--steps", "1", "--tune-out", str(out), "--json"], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(result["tried"]) >= 2 and result["seconds"] <= 40 * 1.5
    best, ran = result["best"], [t for t in result["tried"] if "error" not in t]
    bound = [t for t in ran if t["ratio"] >= 0.95]
    assert result["compute_bound"] == bool(bound)
    assert best == max(bound or ran, key=lambda t: t["end_to_end_img_per_s"])  # the fastest that keeps up
    written = yaml.safe_load(out.read_text())
    assert written == result["overrides"] and written["data"]["engine"] == best["data.engine"]
    dry = subprocess.run([sys.executable, "-m", "deit3_fast", "train", *common, "--overrides", str(out),
                          "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    cfg = json.loads(dry.stdout)
    assert (cfg["data"]["engine"], cfg["data"]["workers"], cfg["train"]["compile"]) == \
        (written["data"]["engine"], written["data"]["workers"], written["train"]["compile"])

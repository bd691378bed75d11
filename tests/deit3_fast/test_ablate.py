"""`deit3-fast ablate`: grid parsing, naming and validation; warm-up scaling; a tiny grid end to end (results, skip,
resume, divergence, refusal of a foreign run dir, submitit's local executor); and learning on a real CIFAR-10 subset."""

import csv
import datetime
import json
import math
import tarfile

import pytest
import torch
import yaml
from PIL import Image

from deit3_fast import trainer
from deit3_fast.ablate import DONE, AblateJob, load_grid, run_variant
from deit3_fast.checkpoint import load
from deit3_fast.cli import main
from deit3_fast.config import ConfigError, load_config, to_dict
from deit3_fast.losses import RecipeLoss
from deit3_fast.models import create_model
from deit3_fast.trainer import TrainingDiverged, train

from ..conftest import SHARED_DATA

CIFAR10 = SHARED_DATA / "cifar10-jpg.tar.gz"


def write_grid(path, grid: dict):
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return str(path)


# --- the grid file (no training) -------------------------------------------------------------------------------


def test_axes_product_gives_named_validated_variants(tmp_path):
    g = load_grid(
        write_grid(
            tmp_path / "g.yaml",
            {
                "base": "quickstart",
                "sets": {"data.workers": 1},
                "axes": {"aug.three_augment": [True, False], "loss": ["bce", "ce"], "schedule.epochs": [30, 100]},
            },
        )
    )
    names = [v.name for v in g.variants]
    assert len(names) == 8 and len(set(names)) == 8
    assert names[0] == "three_augment=true,loss=bce,epochs=30"
    assert names[-1] == "three_augment=false,loss=ce,epochs=100"
    v = g.variants[-1]
    assert (v.config.aug.three_augment, v.config.loss, v.config.schedule.epochs) == (False, "ce", 100)
    assert v.config.data.workers == 1 and v.cfg == "quickstart"
    assert v.shown[:3] == ["aug.three_augment=false", "loss=ce", "schedule.epochs=100"]


def test_named_variants_cross_axes_and_may_start_from_their_own_config(tmp_path):
    g = load_grid(
        write_grid(
            tmp_path / "g.yaml",
            {
                "base": "quickstart",
                "variants": [{"name": "ref"}, {"name": "s", "cfg": "vit_s_in1k", "sets": ["aug.crop=src"]}],
                "axes": {"optim.lr": [1e-3, 2e-3], "aug.rrc_scale": [[0.35, 1.0]]},
            },
        ),
        ["train.seed=3"],
    )
    assert [v.name for v in g.variants] == [
        "ref,lr=0.001,rrc_scale=0.35-1",
        "ref,lr=0.002,rrc_scale=0.35-1",
        "s,lr=0.001,rrc_scale=0.35-1",
        "s,lr=0.002,rrc_scale=0.35-1",
    ]
    s = g.variants[3].config
    assert (s.model.name, s.aug.crop, s.optim.lr, s.aug.rrc_scale, s.train.seed) == (
        "deit3_small",
        "src",
        2e-3,
        (0.35, 1.0),
        3,
    )
    assert g.variants[0].config.model.name == "deit3_nano"


def test_axes_sharing_a_last_key_part_are_named_by_full_key(tmp_path):
    g = load_grid(
        write_grid(
            tmp_path / "g.yaml", {"base": "quickstart", "axes": {"data.seed": [0], "train.seed": [1], "loss": ["ce"]}}
        )
    )
    assert [v.name for v in g.variants] == ["data.seed=0,train.seed=1,loss=ce"]


@pytest.mark.parametrize("epochs, warmup", [(40, 2), (10, 1), (3, 1), (100, 5), (50, 3), (30, 2)])
def test_warmup_scales_with_the_epoch_budget(tmp_path, epochs, warmup):
    # quickstart: 40 epochs, 2 of warm-up. 50 epochs: 2.5 rounds half up to 3; 3 epochs: 0.15, at least 1.
    g = load_grid(write_grid(tmp_path / "g.yaml", {"base": "quickstart", "axes": {"schedule.epochs": [epochs]}}))
    s = g.variants[0].config.schedule
    assert (s.epochs, s.warmup_epochs) == (epochs, warmup)


def test_warmup_set_explicitly_or_zero_is_not_scaled(tmp_path):
    g = load_grid(
        write_grid(
            tmp_path / "g.yaml",
            {
                "base": "quickstart",
                "variants": [{"name": "a", "sets": {"schedule.warmup_epochs": 4}}, {"name": "b"}],
                "axes": {"schedule.epochs": [10]},
            },
        )
    )
    assert [v.config.schedule.warmup_epochs for v in g.variants] == [4, 1]
    zero = load_grid(
        write_grid(
            tmp_path / "z.yaml",
            {"base": "quickstart", "sets": ["schedule.warmup_epochs=0"], "axes": {"schedule.epochs": [10]}},
        )
    )
    assert zero.variants[0].config.schedule.warmup_epochs == 0
    # an epoch budget given on the command line for the whole grid scales too: the CIFAR recipes' 5 of 100
    cifar = load_grid("cifar10_grid", ["schedule.epochs=50"])
    assert {(v.config.schedule.epochs, v.config.schedule.warmup_epochs) for v in cifar.variants} == {(50, 3)}
    # and so does a progressive-resolution ramp (35 -> 85 of 100 epochs: 18 -> 43 of 50), so it still ends at 32 px
    r = {v.name: v.config for v in cifar.variants}["progressive"].schedule.resolution
    assert (r.start_epoch, r.end_epoch, r.start, r.end) == (18, 43, 16, 32)
    # a budget shorter than the ramp still ends it before the last epoch, which trains at 32 px
    r = {v.name: v.config for v in load_grid("cifar10_grid", ["schedule.epochs=3"]).variants}["progressive"]
    assert (r.schedule.resolution.start_epoch, r.schedule.resolution.end_epoch) == (1, 2)
    # a ramp given with the budget is taken as given, though it does not fit the base's 40 epochs
    g = load_grid(
        write_grid(
            tmp_path / "r.yaml",
            {
                "base": "quickstart",
                "axes": {"schedule.epochs": [50]},
                "sets": {"schedule.resolution": {"start": 16, "step": 8, "start_epoch": 0, "end_epoch": 45}},
            },
        )
    )
    s = g.variants[0].config.schedule
    assert (s.epochs, s.warmup_epochs, s.resolution.start_epoch, s.resolution.end_epoch) == (50, 3, 0, 45)


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"base": "quickstart", "axis": {"loss": ["ce"]}}, "unknown grid key 'axis' (did you mean 'axes'?)"),
        ({"base": "quickstart", "axes": {"loss": "ce"}}, "axis 'loss' must be a non-empty list"),
        ({"base": "quickstart", "axes": {"loss": []}}, "axis 'loss' must be a non-empty list"),
        (
            {"base": "quickstart", "axes": {"aug.three_augmnt": [True]}},
            "variant 'three_augmnt=true': unknown config key 'aug.three_augmnt' (did you mean 'three_augment'?)",
        ),
        ({"base": "quickstart", "axes": {"loss": ["mse"]}}, "variant 'loss=mse': loss: 'mse' is not one of bce, ce"),
        ({"base": "no_such_recipe", "axes": {"loss": ["ce"]}}, "config 'no_such_recipe' not found"),
        ({"base": "quickstart", "variants": [{"name": "a"}, {"name": "a"}]}, "two variants are called 'a'"),
        ({"base": "quickstart", "variants": [{"sets": {"loss": "ce"}}]}, "variants[0] needs a 'name'"),
        (
            {"base": "quickstart", "variants": [{"name": "a", "set": {"loss": "ce"}}]},
            "variant 'a': unknown key 'set' (did you mean 'sets'?)",
        ),
        ({"base": "quickstart", "variants": [{"name": "a/b"}]}, "not usable as a folder name"),
        ({"variants": [{"name": "a"}]}, "variant 'a' has no config"),
        ({"base": "quickstart"}, "a grid needs 'variants', 'axes' or both"),
        ({"base": "quickstart", "sets": "loss=ce", "axes": {"loss": ["ce"]}}, "sets: expected a mapping"),
        (
            {"base": "quickstart", "variants": [{"name": "a", "sets": {"train.seed": datetime.date(2024, 1, 1)}}]},
            "variant 'a': sets: train.seed: datetime.date(2024, 1, 1) is not a config value; quote it",
        ),
        (
            {"base": "quickstart", "axes": {"train.seed": [datetime.date(2024, 1, 1)]}},
            "axis: train.seed: datetime.date",
        ),
        ({"base": "quickstart", "axes": {"aug.hflip": [float("nan")]}}, "aug.hflip: nan is not a config value"),
    ],
)
def test_grid_errors_are_one_line_config_errors(tmp_path, grid, message):
    with pytest.raises(ConfigError) as e:
        load_grid(write_grid(tmp_path / "g.yaml", grid))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_reports_a_bad_grid_in_one_line_before_running(tmp_path, capsys):
    bad = write_grid(tmp_path / "g.yaml", {"base": "quickstart", "axes": {"optim.lrr": [1e-3]}})
    assert main(["ablate", "--grid", bad, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deit3-fast: error: ") and err.count("\n") == 1 and "optim.lrr" in err
    assert main(["ablate", "--grid", "cifar10_gird", "--out", str(tmp_path / "out")]) == 2
    assert "did you mean 'cifar10_grid'" in capsys.readouterr().err
    # a variant whose data is missing fails before the first variant starts, not after it
    missing = write_grid(
        tmp_path / "m.yaml",
        {"base": "quickstart", "sets": {"data.train": str(tmp_path / "no.beton")}, "axes": {"loss": ["bce", "ce"]}},
    )
    assert main(["ablate", "--grid", missing, "--out", str(tmp_path / "out")]) == 2
    assert "no.beton does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_shipped_cifar10_ablation_follows_its_recipes():
    g = load_grid("cifar10_grid")
    by = {v.name: v.config for v in g.variants}
    assert list(by) == ["deit3", "deit_style", "no_3aug", "no_layerscale", "progressive"]
    d3 = by["deit3"]
    assert (d3.model.name, d3.aug.img_size, d3.model.num_classes) == ("deit3_cifar", 32, 10)
    assert (d3.optim.name, d3.loss, d3.aug.three_augment, d3.aug.color_jitter, d3.aug.auto_augment) == (
        "lamb",
        "bce",
        True,
        0.3,
        None,
    )
    assert (d3.model.layer_scale_init, d3.aug.mixup, d3.aug.cutmix, d3.aug.label_smoothing, d3.aug.crop) == (
        1e-4,
        0.8,
        1.0,
        0.0,
        "rrc",
    )
    st = by["deit_style"]
    assert (
        st.optim.name,
        st.optim.lr,
        st.loss,
        st.aug.label_smoothing,
        st.aug.auto_augment,
        st.aug.three_augment,
        st.aug.color_jitter,
    ) == ("adamw", 5e-4 * st.train.global_batch / 512, "ce", 0.1, "rand-m9-mstd0.5-inc1", False, 0.0)

    def changed(a, b):
        return [k for k in a if a[k] != b[k]]

    flat = {name: _flat(to_dict(c)) for name, c in by.items()}
    assert changed(flat["no_3aug"], flat["deit3"]) == ["aug.three_augment"]
    assert changed(flat["no_layerscale"], flat["deit3"]) == ["model.layer_scale_init"]
    assert by["no_layerscale"].model.layer_scale_init is None
    assert changed(flat["progressive"], flat["deit3"]) == [
        f"schedule.resolution.{k}" for k in ("start", "end", "start_epoch", "end_epoch", "step")
    ]
    assert set(changed(flat["deit_style"], flat["deit3"])) == {
        "aug.three_augment",
        "aug.color_jitter",
        "aug.auto_augment",
        "aug.label_smoothing",
        "optim.name",
        "optim.lr",
        "loss",
    }


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_no_layerscale_is_expressible_and_builds_plain_blocks():
    cfg = load_config("cifar10_no_layerscale")
    plain = create_model(cfg.model.name, num_classes=10, img_size=32, layer_scale_init=cfg.model.layer_scale_init)
    scaled = create_model("deit3_cifar", num_classes=10, img_size=32, layer_scale_init=1e-4)
    assert not [n for n, _ in plain.named_parameters() if ".ls" in n]
    gammas = [p for n, p in scaled.named_parameters() if n.endswith("ls1.gamma")]
    assert len(gammas) == 12 and all(torch.all(g == 1e-4) for g in gammas)
    assert plain(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert load_config("quickstart", ["model.layer_scale_init=null"]).model.layer_scale_init is None


def test_submit_dry_run_describes_one_job_per_unfinished_variant(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "deit3").mkdir(parents=True)
    (out / "deit3" / DONE).write_text('{"status": "done"}')
    assert (
        main(
            [
                "ablate",
                "--grid",
                "cifar10_grid",
                "--out",
                str(out),
                "--submit",
                "--dry-run",
                "--nodes",
                "1",
                "--gpus-per-node",
                "2",
                "--partition",
                "p1",
                "--set",
                "data.batch_size=256",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "deit3: done, skipped" in text
    jobs = [json.loads("{" + chunk) for chunk in text.split("\n{")[1:]]
    assert [j["variant"] for j in jobs] == ["deit_style", "no_3aug", "no_layerscale", "progressive"]
    assert jobs[0]["parameters"]["name"] == "ablate-cifar10_grid-deit_style"
    assert jobs[0]["parameters"]["slurm_partition"] == "p1" and jobs[0]["world_size"] == 2
    assert jobs[0]["command"][3:6] == ["cifar10_deit_style", "--out", str(out / "deit_style")]
    # global batch 512 from 256 per process on 3 GPUs is impossible: refused before anything is submitted
    assert (
        main(
            [
                "ablate",
                "--grid",
                "cifar10_grid",
                "--out",
                str(out),
                "--submit",
                "--dry-run",
                "--gpus-per-node",
                "3",
                "--set",
                "data.batch_size=256",
            ]
        )
        == 2
    )
    assert "cannot be split over 3 processes" in capsys.readouterr().err


# --- run_variant: what ends an attempt -------------------------------------------------------------------------


def test_a_diverged_variant_is_a_result_and_an_interrupted_one_is_not_finished(tmp_path):
    cfg = load_config("quickstart", ["schedule.epochs=2"])

    def diverges():
        raise TrainingDiverged("loss is nan at epoch 0, step 1")

    run_variant(tmp_path / "a", cfg, diverges)
    assert json.loads((tmp_path / "a" / DONE).read_text())["status"] == "diverged"

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_variant(tmp_path / "b", cfg, interrupted)
    assert not (tmp_path / "b" / DONE).exists()
    attempt = json.loads((tmp_path / "b" / "ablate-attempts.jsonl").read_text())
    assert attempt["epochs_after"] == 0 and attempt["seconds"] >= 0 and attempt["gpus"] == 0


def test_a_requeued_job_is_again_an_ablate_job():
    job = AblateJob("quickstart", ["loss=ce"], "runs/x", "cpu")
    again = job.checkpoint().function  # what submitit runs after a preemption or time-limit requeue
    assert isinstance(again, AblateJob) and vars(again) == vars(job)


# --- a tiny grid end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data):
    """A 2-variant grid (loss bce | ce) over the tiny 4-class data, 2 epochs each, run once."""
    root = tmp_path_factory.mktemp("ablate")
    sets = {
        "data.train": str(data / "train.beton"),
        "data.val": str(data / "val.beton"),
        "model.num_classes": 4,
        "data.workers": 1,
        "data.batch_size": 8,
        "train.global_batch": 8,
        "schedule.epochs": 2,
        "schedule.warmup_epochs": 1,
        "train.amp": "fp32",
    }
    grid = write_grid(root / "tiny.yaml", {"base": "quickstart", "sets": sets, "axes": {"loss": ["bce", "ce"]}})
    out = root / "out"
    assert main(["ablate", "--grid", grid, "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    return grid, out, sets


@pytest.mark.slow
def test_grid_run_writes_results_for_every_variant(tiny):
    _, out, _ = tiny
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["variant"] for r in rows] == ["loss=bce", "loss=ce"]
    for r in rows:
        assert r["status"] == "done" and r["epochs"] == "2" and r["config"] == "quickstart"
        assert 0 <= float(r["final_top1"]) <= 100 and float(r["best_top1"]) >= float(r["final_top1"])
        assert float(r["final_top5"]) >= float(r["final_top1"])
        assert float(r["img_per_s"]) > 0 and float(r["wall_s"]) > 0 and float(r["gpu_hours"]) == 0
        metrics = [json.loads(x) for x in (out / r["variant"] / "metrics.jsonl").read_text().splitlines()]
        assert float(r["final_top1"]) == pytest.approx(metrics[-1]["val_acc1"])
    md = (out / "results.md").read_text()
    assert "| loss=bce | done | quickstart | loss=bce | 2 |" in md and "GPU-hours (0 on CPU)" in md
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rerun_skips_finished_variants(tiny, capsys):
    grid, out, _ = tiny
    before = {p: p.read_bytes() for p in out.glob("*/metrics.jsonl")}
    assert main(["ablate", "--grid", grid, "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "loss=bce: done, skipped" in text and "loss=ce: done, skipped" in text
    assert {p: p.read_bytes() for p in out.glob("*/metrics.jsonl")} == before
    assert all(len((out / v / "ablate-attempts.jsonl").read_text().splitlines()) == 1 for v in ("loss=bce", "loss=ce"))
    (out / "results.md").unlink()
    assert main(["ablate", "--grid", grid, "--out", str(out), "--collect"]) == 0  # tables only
    assert "| loss=ce | done |" in (out / "results.md").read_text()
    assert {p: p.read_bytes() for p in out.glob("*/metrics.jsonl")} == before


@pytest.mark.slow
def test_interrupted_variant_resumes_to_the_uninterrupted_result(tiny, tmp_path, capsys):
    grid, out, sets = tiny
    # the first epoch of loss=bce ran, then the process died: a checkpoint, one metrics row, no done.json
    cfg = load_config("quickstart", [f"{k}={v}" for k, v in sets.items()] + ["loss=bce"])
    train(cfg, tmp_path / "loss=bce", torch.device("cpu"), quiet=True, stop_after_epoch=0)
    assert main(["ablate", "--grid", grid, "--out", str(tmp_path), "--device", "cpu", "--quiet"]) == 0
    assert "loss=bce: resuming after epoch 1" in capsys.readouterr().out
    rows = [json.loads(x)["epoch"] for x in (tmp_path / "loss=bce" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1]
    a, b = load(tmp_path / "loss=bce" / "checkpoint-last.pt"), load(out / "loss=bce" / "checkpoint-last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_a_run_dir_of_another_config_is_refused(tiny, capsys):
    grid, out, _ = tiny
    assert main(["ablate", "--grid", grid, "--out", str(out), "--set", "optim.lr=1e-3"]) == 2
    assert "holds a run of a different config (optim.lr)" in capsys.readouterr().err


@pytest.mark.slow
def test_a_diverging_or_crashing_variant_does_not_stop_the_grid(tiny, tmp_path, monkeypatch, capsys):
    grid, _, _ = tiny
    real = RecipeLoss.__call__

    def nan_for_bce(self, x, y):
        return real(self, x, y) * (math.nan if self.kind == "bce" else 1.0)

    monkeypatch.setattr(RecipeLoss, "__call__", nan_for_bce)
    assert main(["ablate", "--grid", grid, "--out", str(tmp_path / "a"), "--device", "cpu", "--quiet"]) == 0
    rows = {r["variant"]: r for r in csv.DictReader(open(tmp_path / "a" / "results.csv"))}
    assert rows["loss=bce"]["status"] == "diverged" and rows["loss=ce"]["status"] == "done"

    def crash_for_bce(self, x, y):
        if self.kind == "bce":
            raise ValueError("bits must be between or equal to 1 and 8")
        return real(self, x, y)

    monkeypatch.setattr(RecipeLoss, "__call__", crash_for_bce)
    capsys.readouterr()
    assert main(["ablate", "--grid", grid, "--out", str(tmp_path / "b"), "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "variant 'loss=bce' failed: ValueError: bits must be" in err
    rows = {r["variant"]: r for r in csv.DictReader(open(tmp_path / "b" / "results.csv"))}
    assert rows["loss=bce"]["status"] == "failed after 0 epochs (ValueError: bits must be between or equal to 1 and 8)"
    assert rows["loss=ce"]["status"] == "done"
    # fixed: the next run retries the failed variant only
    monkeypatch.setattr(RecipeLoss, "__call__", real)
    assert main(["ablate", "--grid", grid, "--out", str(tmp_path / "b"), "--device", "cpu", "--quiet"]) == 0
    assert [r["status"] for r in csv.DictReader(open(tmp_path / "b" / "results.csv"))] == ["done", "done"]
    assert not (tmp_path / "b" / "loss=bce" / "failed.json").exists()


@pytest.mark.slow
def test_sigterm_stops_the_grid_instead_of_skipping_to_the_next_variant(tiny, tmp_path, monkeypatch, capsys):
    grid, _, _ = tiny

    def preempted(self, x, y):
        raise trainer.Preempted(tmp_path / "checkpoint-last.pt", 0, 0, 6)

    monkeypatch.setattr(RecipeLoss, "__call__", preempted)
    assert main(["ablate", "--grid", grid, "--out", str(tmp_path), "--device", "cpu", "--quiet"]) == 0
    assert "SIGTERM" in capsys.readouterr().err
    assert not (tmp_path / "loss=bce" / "failed.json").exists() and not (tmp_path / "loss=ce").exists()


@pytest.mark.slow  # submitit starts a fresh Python process
def test_submitted_local_job_marks_its_variant_done(tiny, tmp_path, capsys):
    _, _, sets = tiny
    grid = write_grid(
        tmp_path / "one.yaml",
        {"base": "quickstart", "sets": {**sets, "schedule.epochs": 1}, "variants": [{"name": "job"}]},
    )
    args = ["ablate", "--grid", grid, "--out", str(tmp_path / "out"), "--device", "cpu", "--submit", "--local"]
    assert main(args) == 0
    run_dir = tmp_path / "out" / "job"
    job = json.loads((run_dir / "ablate-job.json").read_text())
    assert job["executor"] == "local" and job["job_id"]
    assert json.loads((run_dir / DONE).read_text())["status"] == "done"  # written by the job itself
    attempt = json.loads((run_dir / "ablate-attempts.jsonl").read_text())
    assert (attempt["world_size"], attempt["gpus"], attempt["epochs_after"]) == (1, 0, 1)
    assert [r["status"] for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))] == ["done"]
    capsys.readouterr()
    assert main(args) == 0
    assert "job: done, skipped" in capsys.readouterr().out


# --- real data: CIFAR-10 --------------------------------------------------------------------------------------


def cifar10_subset(dest, train_per_class: int, test_per_class: int):
    """The first N images of each class of each split, extracted from the shared tar, in ImageFolder layout."""
    if not CIFAR10.exists():
        pytest.skip(f"CIFAR-10 not available ({CIFAR10} is absent; it ships in the project's shared/data)")
    wanted, counts = {"train": train_per_class, "test": test_per_class}, {}
    with tarfile.open(CIFAR10) as t:
        for m in t:
            parts = m.name.split("/")  # cifar10/<split>/<class>/NNNN.jpg
            key = tuple(parts[1:3])
            if not m.isfile() or len(parts) != 4 or counts.get(key, 0) >= wanted.get(parts[1], 0):
                continue
            counts[key] = counts.get(key, 0) + 1
            target = dest.joinpath(*parts[1:])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(t.extractfile(m).read())
    return dest


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    """1,000 train images per class (10,000) and 100 test images per class, converted as docs/training.md
    (Ablations) says."""
    from dataset_tools.convert import convert

    root = tmp_path_factory.mktemp("cifar10")
    src = cifar10_subset(root / "src", 1000, 100)
    convert(str(src / "train"), str(root / "train.beton"), write_mode="raw", workers=2, show_progress=False)
    convert(
        str(src / "test"),
        str(root / "test.beton"),
        write_mode="raw",
        workers=2,
        show_progress=False,
        classes_file=str(root / "train.beton.json"),
    )
    return root


@pytest.mark.slow  # about a minute on 2 cores (3 when other jobs share them)
def test_cifar10_deit3_recipe_learns_on_a_subset(cifar10, tmp_path, capsys):
    # The shipped recipe with a CPU-sized budget: the nano ViT (patch 4, dim 64, 2 blocks) for 3 epochs on 10k
    # images at batch 32; warm-up scales from 5 of 100 epochs to 1 of 3. Measured on 2 cores: 22.6% top-1 on the
    # 1,000 test images (chance 10%; 18% is 8 standard errors above chance), ~40 s of training.
    grid = write_grid(tmp_path / "g.yaml", {"base": "cifar10_deit3", "variants": [{"name": "deit3"}]})
    sets = [
        f"data.train={cifar10 / 'train.beton'}",
        f"data.val={cifar10 / 'test.beton'}",
        "data.workers=2",
        "model.name=deit3_nano",
        "data.batch_size=32",
        "train.global_batch=32",
        "schedule.epochs=3",
        "train.amp=fp32",
    ]
    assert (
        main(
            [
                "ablate",
                "--grid",
                grid,
                "--out",
                str(tmp_path / "out"),
                "--device",
                "cpu",
                "--quiet",
                *[x for s in sets for x in ("--set", s)],
            ]
        )
        == 0
    )
    row = next(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert row["status"] == "done" and "schedule.warmup_epochs=1 (scaled)" in row["overrides"]
    assert float(row["best_top1"]) > 18.0, row


def test_a_budget_one_variant_cannot_run_names_it_and_how_to_go_on_without_it():
    """`--set schedule.epochs=1` on the CIFAR grid: the progressive variant's ramp cannot end before the last epoch.
    The one-line error names that variant, why, and how to run the rest (drop it, or change the --set)."""
    with pytest.raises(ConfigError) as e:
        load_grid("cifar10_grid", ["schedule.epochs=1"])
    message = str(e.value)
    assert "variant 'progressive': schedule.resolution: end_epoch 1 must be below schedule.epochs 1" in message
    assert "drop its entry under 'variants'" in message and "change the --set" in message and "\n" not in message


def _two_variant_grid(tmp_path, data, b_val) -> str:
    shared = {"data.train": str(data / "train.beton"), "data.val": str(data / "val.beton"), "model.num_classes": 4}
    return write_grid(
        tmp_path / "g.yaml",
        {"base": "quickstart", "sets": shared, "variants": [{"name": "a"}, {"name": "b", "sets": {"data.val": b_val}}]},
    )


def test_dry_run_checks_every_variants_data_and_writes_nothing(tmp_path, data, capsys):
    """`ablate --dry-run` opens each variant's train and val as its engine would: a missing, unreadable or
    unconvertible one is a one-line error naming the variant, the key and the path, exit 2, and nothing is written."""
    out = tmp_path / "out"
    not_a_beton = tmp_path / "notes.beton"
    not_a_beton.write_text("not a beton\n")
    folder = tmp_path / "images" / "cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "0.jpg")
    cases = [
        (tmp_path / "no.beton", "does not exist"),
        (not_a_beton, "not a valid .beton"),
        (tmp_path / "images", "convert it first with deit3-convert"),  # ffcv reads what deit3-convert wrote
        (data / "raw.beton", None),  # 3 classes: fine for the 4-class model
    ]
    for path, why in cases:
        grid = _two_variant_grid(tmp_path, data, str(path))
        code = main(["ablate", "--grid", grid, "--out", str(out), "--dry-run"])
        std = capsys.readouterr()
        if why is None:
            assert code == 0, std.err
            continue
        assert code == 2 and std.out == ""
        assert std.err.startswith(f"deit3-fast: error: variant 'b': data.val {path}") or std.err.startswith(
            f"deit3-fast: error: variant 'b': data.val: {path}"
        ), std.err
        assert why in std.err and std.err.count("\n") == 1
        assert not out.exists()
    # labels beyond the model's classes: the variant whose --set makes the head too small
    grid = _two_variant_grid(tmp_path, data, str(data / "val.beton"))
    assert main(["ablate", "--grid", grid, "--out", str(out), "--dry-run", "--set", "model.num_classes=2"]) == 2
    assert "variant 'a': data.train: " in capsys.readouterr().err and not out.exists()


def test_dry_run_lists_each_variants_overrides(tmp_path, data, capsys):
    grid = _two_variant_grid(tmp_path, data, str(data / "raw.beton"))
    args = ["ablate", "--grid", grid, "--out", str(tmp_path / "out"), "--dry-run", "--set", "schedule.epochs=4"]
    assert main(args) == 0
    text = capsys.readouterr().out
    a, b = (part + "\n" for part in text.rstrip("\n").split("\nb: "))
    assert a.startswith("a: not run; quickstart\n")
    for part in (a, b):
        assert f"  data.train={data / 'train.beton'} (grid)\n" in part and "  model.num_classes=4 (grid)\n" in part
        assert "  schedule.epochs=4 (--set)\n" in part and "  schedule.warmup_epochs=1 (scaled)\n" in part
    assert f"  data.val={data / 'raw.beton'}\n" in b and f"data.val={data / 'raw.beton'}" not in a
    assert not (tmp_path / "out").exists()

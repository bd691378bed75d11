"""`deit3-fast parity`: what a variant names, the conversion cache, that every run really trains its variant's engine
on its variant's data with its seed, and the verdict written from the run dirs (the statistics themselves:
test_parity_stats.py)."""

import json
import os

import pytest

from dataset_tools.convert import convert, is_current
from dataset_tools.synthetic import make_imagefolder
from deit3_fast import rundir
from deit3_fast.cli import main
from deit3_fast.config import ConfigError
from deit3_fast.parity.report import markdown, summarize_runs
from deit3_fast.parity.run import seeds_of
from deit3_fast.parity.variants import Storage, parse_storage, parse_variants

DEFAULT = Storage(max_resolution=256)

# ---------------------------------------------------------------------------------------------------------------
# Variants and storages


def test_a_storage_has_one_canonical_name_and_converts_with_its_options():
    s = parse_storage("raw+short64+q95")
    assert s.name == "short64+q95+raw" and parse_storage(s.name) == s
    assert s.convert_options() == {"max_resolution": None, "short_side": 64, "jpeg_quality": 95, "write_mode": "raw"}
    assert parse_storage("max256").convert_options()["max_resolution"] == 256
    assert parse_storage("beton", DEFAULT) == DEFAULT


@pytest.mark.parametrize(
    "spec, words",
    [
        ("max", "not a storage part"),
        ("max256+short448", "already set"),
        ("q0", "not in 1-100"),
        ("short4", "under 8 pixels"),
        ("raw+raw", "already set"),
    ],
)
def test_a_bad_storage_names_the_parts_it_takes(spec, words):
    with pytest.raises(ConfigError, match=words):
        parse_storage(spec, DEFAULT)


def test_variants_read_folders_only_where_the_engine_can():
    ref, ffcv, both = parse_variants("reference,ffcv,reference@beton", DEFAULT)
    assert (ref.engine, ref.storage) == ("reference", None)  # the official pipeline on the original files
    assert (ffcv.engine, ffcv.storage) == ("ffcv", DEFAULT)
    assert (both.name, both.storage) == ("reference@beton", DEFAULT)  # same pipeline, our storage
    assert parse_variants("ffcv@short448,nvjpeg", DEFAULT)[0].storage == Storage(short_side=448)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("reference,ffvc", "not an engine.*ffcv"),
        ("reference,ffcv@folder", "reads .beton files, not folders"),
        ("reference,reference", "given twice"),
        ("reference", "at least two variants"),
        ("reference,,ffcv", "empty entry"),
    ],
)
def test_bad_variants_are_one_message_with_the_fix(spec, words):
    with pytest.raises(ConfigError, match=words):
        parse_variants(spec, DEFAULT)


def test_seeds_are_a_count_or_a_list():
    assert seeds_of("3") == [0, 1, 2] and seeds_of("0,5,7") == [0, 5, 7]
    for bad in ("0", "x", "1,1", "-1,2"):
        with pytest.raises(ConfigError, match="--seeds"):
            seeds_of(bad)


# ---------------------------------------------------------------------------------------------------------------
# The verdict from constructed results


def _row(variant, top1, status="done", img_per_s=100.0):
    return {
        "variant": variant,
        "status": status,
        "final_top1": top1,
        "best_top1": top1 + 1 if top1 is not None else None,
        "img_per_s": img_per_s,
        "wall_s": 60.0,
    }


PLAN = {
    "cfg": "recipe.yaml",
    "epochs": 20,
    "seeds": [0, 1, 2],
    "baseline": "reference",
    "variants": [
        {"name": "reference", "engine": "reference", "storage": "folder"},
        {"name": "ffcv", "engine": "ffcv", "storage": "max256"},
        {"name": "slow", "engine": "nvjpeg", "storage": "max256"},
    ],
}


def test_the_summary_finds_a_known_difference_and_calls_an_equal_pair_indistinguishable():
    rows = [_row(f"reference,seed={s}", v, img_per_s=50.0) for s, v in enumerate([60.0, 61.0, 62.0])]
    rows += [_row(f"ffcv,seed={s}", v, img_per_s=200.0) for s, v in enumerate([61.5, 60.5, 61.0])]
    rows += [_row(f"slow,seed={s}", v) for s, v in enumerate([50.0, 51.0, 52.0])]
    summary = summarize_runs(PLAN, rows)
    ref, ffcv, slow = summary["variants"]
    assert ref["final_top1"]["mean"] == pytest.approx(61.0) and ref["final_top1"]["std"] == pytest.approx(1.0)
    assert ffcv["best_top1"]["mean"] == pytest.approx(62.0)
    assert ffcv["speed_vs_baseline"] == pytest.approx(4.0) and ref["speed_vs_baseline"] == pytest.approx(1.0)
    by = {c["variant"]: c for c in summary["comparisons"]}
    assert by["ffcv"]["delta"] == pytest.approx(0.0) and by["ffcv"]["low"] < 0 < by["ffcv"]["high"]
    assert "indistinguishable" in by["ffcv"]["verdict"]
    assert by["slow"]["delta"] == pytest.approx(-10.0) and by["slow"]["high"] < 0
    assert "lower by 10" in by["slow"]["verdict"]
    text = markdown(summary)
    assert "| ffcv | ffcv | max256 | 3/3 | 61.00 ± 0.50 |" in text and "4.00x" in text
    assert json.loads(json.dumps(summary)) == summary  # --json prints it as it is


def test_unfinished_runs_are_listed_and_left_out_of_the_means():
    rows = [_row(f"reference,seed={s}", 60.0 + s) for s in range(3)]
    rows += [_row("ffcv,seed=0", 61.0), _row("ffcv,seed=1", 40.0, status="partial (5/20 epochs)")]
    summary = summarize_runs(PLAN, rows)
    ffcv = summary["variants"][1]
    assert ffcv["finished"] == 1 and ffcv["final_top1"]["values"] == [61.0]
    assert ffcv["unfinished"] == ["seed 1: partial (5/20 epochs)", "seed 2: not run"]
    assert "Not in the numbers yet: ffcv seed 1: partial (5/20 epochs); ffcv seed 2: not run" in markdown(summary)
    assert "no interval" in {c["variant"]: c for c in summary["comparisons"]}["ffcv"]["verdict"]


# ---------------------------------------------------------------------------------------------------------------
# The cache of conversions


def test_a_conversion_is_current_until_its_source_or_options_change(tmp_path):
    src = tmp_path / "src"
    make_imagefolder(src, num_classes=2, per_class=3, seed=0, min_side=16, max_side=24)
    out = str(tmp_path / "a.beton")
    assert not is_current(str(src), out)
    convert(str(src), out, workers=1, show_progress=False, write_mode="raw")
    assert is_current(str(src), out, write_mode="raw")
    assert not is_current(str(src), out)  # jpg
    assert not is_current(str(src), out, write_mode="raw", short_side=16)
    extra = next((src / "class_01").iterdir())
    os.link(extra, extra.with_name("copy_" + extra.name))
    assert not is_current(str(src), out, write_mode="raw")


# ---------------------------------------------------------------------------------------------------------------
# End to end: two engines x two seeds, one epoch each


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    make_imagefolder(root / "train", num_classes=3, per_class=6, seed=1, min_side=20, max_side=28)
    make_imagefolder(root / "val", num_classes=3, per_class=2, seed=2, min_side=20, max_side=28)
    return root


SMALL = [
    "--set=model.name=deit3_nano",
    "--set=model.num_classes=3",
    "--set=aug.img_size=16",
    "--set=data.batch_size=6",
    "--set=train.global_batch=6",
    "--set=data.workers=0",
]


def _parity(folders, out, *extra, capsys=None):
    args = [
        "parity",
        "--cfg",
        "cifar10_vit_tiny",
        "--train-folder",
        str(folders / "train"),
        "--val-folder",
        str(folders / "val"),
        "--variants",
        "reference,ffcv",
        "--storage",
        "raw",
        "--val-storage",
        "beton",
        "--seeds",
        "2",
        "--epochs",
        "1",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
        *SMALL,
        *extra,
    ]
    return main(args)


@pytest.fixture(scope="module")
def parity_run(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "exp"
    assert _parity(folders, out) == 0
    return out


@pytest.mark.slow
def test_every_run_trains_its_variants_engine_on_its_data_with_its_seed(parity_run, folders):
    cache = parity_run.parent / "exp-data"
    for variant, train, val in (
        ("reference", folders / "train", folders / "val"),
        ("ffcv", cache / "train-max256+raw.beton", cache / "val-max256+raw.beton"),
    ):
        for seed in (0, 1):
            run = parity_run / f"{variant},seed={seed}"
            cfg = rundir.read_config(run)
            assert cfg["data"]["engine"] == variant
            assert (cfg["data"]["train"], cfg["data"]["val"]) == (str(train.resolve()), str(val.resolve()))
            assert cfg["train"]["seed"] == cfg["data"]["seed"] == seed
            assert cfg["model"]["name"] == "deit3_nano" and cfg["schedule"]["epochs"] == 1  # --set and --epochs
            assert (run / "done.json").exists() and len(rundir.read_metrics(run)) == 1
    # Both splits labelled by the training folder's class list; the raw .beton holds the source pixels.
    report = json.loads((cache / "train-max256+raw.beton.json").read_text())
    assert report["classes"] == ["class_00", "class_01", "class_02"]
    assert report["options"]["write_mode"] == "raw"


@pytest.mark.slow
def test_the_verdict_is_written_from_the_runs(parity_run):
    summary = json.loads((parity_run / "parity.json").read_text())
    assert [v["variant"] for v in summary["variants"]] == ["reference", "ffcv"]
    assert all(v["finished"] == 2 for v in summary["variants"])
    for v in summary["variants"]:
        finals = [rundir.read_metrics(parity_run / f"{v['variant']},seed={s}")[-1]["val_acc1"] for s in (0, 1)]
        assert v["final_top1"]["values"] == finals
    (c,) = summary["comparisons"]
    assert c["variant"] == "ffcv" and c["reference"] == "reference" and c["verdict"].startswith("ffcv: ")
    assert "Verdicts:" in (parity_run / "parity.md").read_text()


@pytest.mark.slow
def test_a_second_run_converts_nothing_and_trains_nothing(parity_run, folders, capsys):
    cache = parity_run.parent / "exp-data"
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    metrics = (parity_run / "ffcv,seed=0" / rundir.METRICS).read_text()
    capsys.readouterr()
    assert _parity(folders, parity_run, "--json") == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["comparisons"][0]["variant"] == "ffcv"  # stdout is the verdict alone
    assert "skipped" in out.err
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps
    assert (parity_run / "ffcv,seed=0" / rundir.METRICS).read_text() == metrics


@pytest.mark.slow
def test_collect_writes_the_verdict_without_the_folders(parity_run, capsys):
    (parity_run / "parity.json").unlink()
    assert main(["parity", "--out", str(parity_run), "--collect", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["baseline"] == "reference"
    assert (parity_run / "parity.json").exists()


@pytest.mark.slow
def test_a_folder_of_other_runs_is_refused_and_keeps_its_plan(parity_run, folders, capsys):
    plan = (parity_run / "parity-plan.json").read_text()
    capsys.readouterr()
    assert _parity(folders, parity_run, "--set=optim.lr=0.1") == 2
    assert "holds a run of a different config (optim.lr)" in capsys.readouterr().err
    assert (parity_run / "parity-plan.json").read_text() == plan


def test_a_baseline_not_among_the_variants_and_unlike_folders_are_refused(folders, tmp_path, capsys):
    common = ["parity", "--cfg", "cifar10_vit_tiny", "--train-folder", str(folders / "train")]
    assert main([*common, "--val-folder", str(folders / "val"), "--variants", "ffcv,nvjpeg",
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "--baseline reference: not among --variants ffcv,nvjpeg" in capsys.readouterr().err
    odd = tmp_path / "val"
    make_imagefolder(odd, num_classes=4, per_class=1, seed=0, min_side=16, max_side=16)
    assert main([*common, "--val-folder", str(odd), "--out", str(tmp_path / "y")]) == 2
    assert "class_03 are not in --train-folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "y-data").exists()


@pytest.mark.slow
def test_submitted_runs_are_jobs_of_their_own_and_the_verdict_follows(folders, tmp_path, capsys):
    """--submit --local: each variant x seed is a submitit job (ablate's), which trains that run; the verdict is
    written once the jobs are done."""
    out = tmp_path / "sub"
    assert _parity(folders, out, "--seeds", "1", "--submit", "--local") == 0
    for variant in ("reference", "ffcv"):
        run = out / f"{variant},seed=0"
        job = json.loads((run / "ablate-job.json").read_text())
        assert job["executor"] == "local" and job["job_id"]
        assert json.loads((run / "done.json").read_text())["status"] == "done"  # written by the job itself
        assert rundir.read_config(run)["data"]["engine"] == variant
    summary = json.loads((out / "parity.json").read_text())
    assert [v["finished"] for v in summary["variants"]] == [1, 1]
    assert "no interval" in summary["comparisons"][0]["verdict"]  # one seed a side: a difference, no interval

"""Runs that check themselves against the official curves: which recipe a run follows, the gap and its one warning,
the readable epoch line, and the official curve in the run dir."""

import json
import shutil

import pytest
import torch

from deit3_fast import reference
from deit3_fast.config import CONFIG_DIR, load_config
from deit3_fast.reference import Gap, follows, official_curve, recipes
from deit3_fast.rundir import epoch_line
from deit3_fast.trainer import train

from ..conftest import SHARED_DATA


def test_the_shipped_curves_are_the_official_logs_of_all_18_recipes():
    assert len(recipes()) == 18 and all((CONFIG_DIR / f"{r}.yaml").exists() for r in recipes())
    shared = SHARED_DATA / "official-curves.csv"
    if shared.exists():
        assert (CONFIG_DIR / "reference" / "official-curves.csv").read_text() == shared.read_text()
    s = official_curve("vit_s_in1k")
    assert s[0] == 0.1 and max(s) == 800 and s[800] > 80  # epochs completed: 0 (chance) ... 800


@pytest.mark.parametrize("name", sorted(reference.recipes()))
def test_a_recipe_follows_itself_wherever_its_data_lives(name):
    assert follows(load_config(name)) == name
    moved = load_config(
        name,
        [
            "data.train=/elsewhere/t.beton",
            "data.val=/elsewhere/v",
            "data.engine=nvjpeg",
            "data.workers=3",
            "train.log_every=7",
            "model.checkpoint=null",
        ],
    )
    assert follows(moved) == name


@pytest.mark.parametrize(
    "change",
    [
        "optim.lr=1e-3",
        "schedule.epochs=300",
        "aug.img_size=160",
        "loss=ce",
        "train.global_batch=1024",
        "data.repeats=1",
        "aug.three_augment=false",
    ],
)
def test_a_changed_defining_key_is_no_longer_the_recipe(change):
    assert follows(load_config("vit_b_in1k", [change])) is None


def test_gap_warns_once_after_two_consecutive_official_points_behind():
    g = Gap("vit_b_in1k_ft224", 2.0)  # official after 5, 10, 15, 20 epochs: 83.71, 83.788, 83.826, 83.802
    # Row k is the accuracy after k + 1 epochs: rows 4, 9, 14, 19 meet official points.
    rows = [{"epoch": k, "val_acc1": v} for k, v in [(4, 80.0), (5, 10.0), (9, 83.0), (14, 80.0), (19, 80.0)]]
    said = [g.update(r) for r in rows]
    assert rows[0]["gap"] == pytest.approx(80.0 - 83.71) and rows[0]["official_acc1"] == 83.71
    assert "gap" not in rows[1]  # after 6 epochs: no official point
    assert said[:4] == [None, None, None, None]  # behind after 5, not after 10 (-0.79): the count restarts
    assert said[4] is not None and "vit_b_in1k_ft224" in said[4] and "epoch 20" in said[4]  # behind at 15 and 20
    assert g.update({"epoch": 19, "val_acc1": 70.0}) is None  # once
    resumed = Gap("vit_b_in1k_ft224", 2.0, rows)
    assert resumed.update({"epoch": 19, "val_acc1": 70.0}) is None  # a resumed run that has warned: not again
    fresh = Gap("vit_b_in1k_ft224", 2.0, rows[:4])
    assert fresh.update({"epoch": 19, "val_acc1": 70.0}) is not None  # the count carries over a resume


def test_epoch_line_is_readable():
    row = {
        "epoch": 11,
        "train_loss": 0.41234,
        "lr": 0.0031,
        "val_acc1": 45.123,
        "val_acc5": 70.0,
        "gap": -1.25,
        "official_acc1": 46.373,
        "img_per_s": 1234.5,
        "data_wait_frac": 0.031,
        "max_mem_mb": 12345.6,
    }
    line = epoch_line(row, 800, 3 * 86400 + 4 * 3600 + 60)
    assert line == (
        "epoch 12/800  loss 0.4123  lr 3.10e-03  val 45.12/70.00  gap -1.25 (official 46.37)  "
        "1,234 img/s  data wait 3%  mem 12,346 MB  ETA 3d 4h"
    )
    assert epoch_line({**row, "val_acc1": None, "gap": None}, 800, 125).endswith("MB  ETA 2m 05s")


@pytest.mark.slow
def test_training_against_a_reference_logs_the_gap_warns_once_and_plots_it(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reference, "official_curve", lambda name: {0: 0.1, 1: 99.0, 2: 99.0, 3: 99.0})
    sets = {
        "data.train": data / "train.beton",
        "data.val": data / "val.beton",
        "model.num_classes": 4,
        "data.batch_size": 8,
        "train.global_batch": 16,
        "schedule.epochs": 3,
        "schedule.warmup_epochs": 1,
        "data.workers": 1,
        "train.reference": "vit_s_in1k",
    }
    cfg = load_config("quickstart", [f"{k}={v}" for k, v in sets.items()])
    rows = train(cfg, tmp_path / "run", torch.device("cpu"))
    out, err = capsys.readouterr()
    assert [r["official_acc1"] for r in rows] == [99.0] * 3
    assert all(r["gap"] == pytest.approx(r["val_acc1"] - 99.0) for r in rows)
    assert err.count("points behind the official vit_s_in1k curve") == 1
    assert "epoch 3/3" in out and "gap " in out and not any(line.startswith('{"epoch"') for line in out.splitlines())
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["gap"] for r in logged] == pytest.approx([r["gap"] for r in rows])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["reference"] == "vit_s_in1k"
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    # The quickstart follows no recipe: nothing is compared, nothing is added.
    cfg = load_config(
        "quickstart", [f"{k}={v}" for k, v in {**sets, "train.reference": "auto", "schedule.epochs": 1}.items()]
    )
    rows = train(cfg, tmp_path / "plain", torch.device("cpu"), quiet=True)
    assert "gap" not in rows[0] and json.loads((tmp_path / "plain" / "run.json").read_text())["reference"] is None


def test_compare_aligns_runs_and_the_reference_by_epochs_completed(tmp_path, capsys):
    """Two run dirs (as train writes them) against the ft224 curve: the table's rows are the official epochs, each
    run's top-1 at that epoch and its gap; JSON has every row; the plot is written; ablate shows the last gap."""
    from deit3_fast import cli
    from deit3_fast.ablate.results import result_row

    for name, offset in (("a", 0.0), ("b", -3.0)):
        d = tmp_path / name
        d.mkdir()
        (d / "run.json").write_text(json.dumps({"reference": "vit_b_in1k_ft224"}))
        curve = official_curve("vit_b_in1k_ft224")
        rows = [
            {"epoch": k, "val_acc1": curve.get(k + 1, 80.0) + offset, "train_loss": 1.0, "img_per_s": 9.0}
            for k in range(12)
        ]
        for r in rows:
            g = curve.get(r["epoch"] + 1)
            if g is not None:
                r["gap"] = r["val_acc1"] - g
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json", "--out", str(tmp_path / "c.png")]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["reference"] == "vit_b_in1k_ft224" and [r["epoch"] for r in result["rows"]] == [5, 10]
    assert result["rows"][1]["acc1"]["b"] == pytest.approx(83.788 - 3.0) and result["rows"][1]["gaps"][
        "b"
    ] == pytest.approx(-3.0)
    assert (tmp_path / "c.png").stat().st_size > 0
    # A run dir named like a column keeps its numbers apart from the epoch and the official curve.
    shutil.copytree(tmp_path / "b", tmp_path / "official")
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "official"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][1]
    assert row["official"] == pytest.approx(83.788) and row["acc1"]["official"] == pytest.approx(83.788 - 3.0)
    # Without a reference every epoch is a row; an unknown reference name is one clear error.
    assert cli.main(["compare", str(tmp_path / "a"), "--json", "--reference", "none"]) == 0
    assert len(json.loads(capsys.readouterr().out)["rows"]) == 12
    assert cli.main(["compare", str(tmp_path / "a"), "--reference", "vit_x"]) == 2
    assert "no official curve named 'vit_x'" in capsys.readouterr().err
    # ablate's results row: the gap at the last official epoch reached.

    class V:
        name, cfg, shown = "b", "vit_b_in1k_ft224", []
        config = load_config("vit_b_in1k_ft224")

    assert result_row(V, tmp_path / "b")["gap"] == pytest.approx(-3.0)
    # Runs short of the curve's first official epoch (5): the empty table says which epochs each side has.
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "metrics.jsonl").write_text(json.dumps({"epoch": 2, "val_acc1": 1.0}) + "\n")
    assert cli.main(["compare", str(tmp_path / "short"), "--reference", "vit_s_in1k"]) == 0
    err = capsys.readouterr().err
    assert "no run has reached an epoch of the official vit_s_in1k curve (it has epochs 5, 10, ..., 800)" in err
    assert "epochs completed: short 3" in err and "--reference none" in err
    # Runs with no epoch yet: no plot, and --out says so instead of saying nothing.
    for name in ("c", "d"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("")
    assert cli.main(["compare", str(tmp_path / "c"), str(tmp_path / "d"), "--out", str(tmp_path / "e.png")]) == 0
    assert "no run has finished an epoch yet: no plot written to" in capsys.readouterr().err
    assert not (tmp_path / "e.png").exists()

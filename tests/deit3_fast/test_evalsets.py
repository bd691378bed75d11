"""Evaluation as the paper reports it: ImageNet-V2's index-named folders, source names per sample, ReaL by file
name, ImageNet-A/-R logit masks, several sets in one eval and during training, and the model-zoo counts."""

import json
import os

import numpy as np
import pytest
import torch

from dataset_tools.beton import Beton
from dataset_tools.convert import convert
from dataset_tools.shards import source_names
from dataset_tools.synthetic import make_imagefolder
from deit3_fast.config import ConfigError
from deit3_fast.evalsets import class_mask, parse_sets, real_top1

from ..conftest import REPO, run_cli


@pytest.fixture(scope="module")
def v2_tree(tmp_path_factory):
    """12 classes in folders 0 ... 11, as ImageNet-V2 lays them out: as strings they sort 0, 1, 10, 11, 2, ..."""
    root = tmp_path_factory.mktemp("v2") / "src"
    make_imagefolder(root, num_classes=12, per_class=2, seed=4, min_side=24, max_side=40)
    for i in range(12):
        os.rename(root / f"class_{i:02d}", root / str(i))
    return root


def test_folder_labels_index_labels_each_folder_by_its_number(v2_tree, tmp_path):
    out = tmp_path / "v2.beton"
    r = run_cli(v2_tree, out, "--folder-labels", "index", "--workers", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    labels, names = Beton(out).labels(), source_names(out)
    assert [int(n.split("/")[0]) for n in names] == labels.tolist()  # each sample's folder is its label
    assert sorted(set(labels.tolist())) == list(range(12))
    # Names (the default) would sort the folders as strings: the mislabelling this option exists to avoid.
    convert(str(v2_tree), str(tmp_path / "by_name.beton"), workers=1, show_progress=False)
    by_name = Beton(tmp_path / "by_name.beton").labels()
    folders = [int(n.split("/")[0]) for n in source_names(tmp_path / "by_name.beton")]
    assert sum(f != y for f, y in zip(folders, by_name)) == 20  # all but folders 0 and 1 (4 samples) are wrong
    # With a class list (the training split's), folder i gets class i's name and label.
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"n{i:08d}\n" for i in range(15)))
    convert(
        str(v2_tree),
        str(tmp_path / "named.beton"),
        workers=1,
        show_progress=False,
        classes_file=str(classes),
        folder_labels="index",
    )
    report = json.loads(open(f"{tmp_path / 'named.beton'}.json").read())
    assert report["classes"][:12] == [f"n{i:08d}" for i in range(12)] and report["class_counts"][12:] == [0] * 3
    named = Beton(tmp_path / "named.beton").labels()
    assert [int(n.split("/")[0]) for n in source_names(tmp_path / "named.beton")] == named.tolist()


@pytest.mark.parametrize(
    "rename, fragment",
    [
        ("x", "folder 'x' in"),
        ("12", "is class 12, but the --classes list has 12 classes"),
        ("07", "folders '07' and '7'"),
    ],
)
def test_folder_labels_index_refuses_folders_that_are_not_class_indices(v2_tree, tmp_path, rename, fragment):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(v2_tree, src)
    if rename == "07":
        shutil.copytree(src / "7", src / "07")
    else:
        os.rename(src / "11", src / rename)
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"c{i}\n" for i in range(12)))
    r = run_cli(src, tmp_path / "o.beton", "--folder-labels", "index", "--classes", classes, "--quiet")
    assert r.returncode == 2 and fragment in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "o.beton").exists()


def test_real_top1_by_file_name_skips_empty_entries_and_refuses_other_files():
    real = [[], [3], [1, 2], [0], [], [5]]
    sources = [
        "n01/ILSVRC2012_val_00000002.JPEG",
        "n02/ILSVRC2012_val_00000003.JPEG",
        "n03/ILSVRC2012_val_00000001.JPEG",
        "n04/ILSVRC2012_val_00000004.JPEG",
        "n05/ILSVRC2012_val_00000006.JPEG",
    ]
    top1 = np.array([3, 2, 7, 1, 5])
    # Counted: entries 2 (3 in [3]: hit), 3 (2 in [1, 2]: hit), 4 (1 not in [0]), 6 (5 in [5]: hit); entry 1 is empty.
    assert real_top1(top1, sources, real) == {"acc1": 75.0, "n": 4}
    with pytest.raises(ConfigError, match="ReaL labels are indexed by ImageNet validation file names"):
        real_top1(top1[:1], ["v2/0/abc.jpeg"], real)
    with pytest.raises(ConfigError, match="ILSVRC2012_val_00000009.JPEG"):
        real_top1(top1[:1], ["x/ILSVRC2012_val_00000009.JPEG"], real)


def test_imagenet_a_and_r_masks_are_their_200_classes_in_the_label_order():
    from timm.data import ImageNetInfo

    wnids = ImageNetInfo().label_names()  # the sorted-wnid order of ImageNet-1k training labels
    for name in ("a", "imagenet-r"):
        mask = class_mask(name, wnids, 1000)
        subset = (REPO / "configs" / "reference" / f"imagenet_{name[-1]}_wnids.txt").read_text().split()
        assert mask.sum() == 200 and [wnids[i] for i in mask.nonzero().ravel()] == sorted(subset)
    # Our copies are timm's lists (timm ships them as package data, not API).
    import timm

    info = os.path.join(os.path.dirname(timm.__file__), "data", "_info")
    for s in ("a", "r"):
        assert (REPO / "configs" / "reference" / f"imagenet_{s}_wnids.txt").read_text().split() == open(
            os.path.join(info, f"imagenet_{s}_synsets.txt")
        ).read().split()
    assert class_mask("v2", wnids, 1000) is None
    with pytest.raises(ConfigError, match="are not in the class list"):
        class_mask("a", wnids[:500], 500)
    # A set converted with only its own 200 classes has labels that are not the model's outputs: refused.
    with pytest.raises(ConfigError, match="was converted with 200 classes, the model has 1000"):
        class_mask("a", sorted(subset), 1000)


def test_a_masked_evaluation_never_predicts_a_class_outside_the_set():
    from deit3_fast.trainer import evaluate

    class Fixed(torch.nn.Module):  # logits: class 0 best everywhere, then class 3, then the rest
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            logits = torch.zeros(len(x), 6) + self.w
            logits[:, 0], logits[:, 3] = 10.0, 5.0
            return logits

    x, y = torch.zeros(4, 3, 8, 8), torch.tensor([3, 3, 4, 0])
    plain = evaluate(Fixed(), [(x, y)], "fp32")
    mask = torch.tensor([False, False, False, True, True, True])
    masked = evaluate(Fixed(), [(x, y)], "fp32", mask=mask)
    assert plain["acc1"] == 25.0 and masked["acc1"] == 50.0  # unmasked: class 0 wins; masked: class 3
    assert masked["acc5"] == 75.0  # only three classes remain: sample 4's class 0 is never among them


def test_parse_sets():
    assert [(s.name, s.path) for s in parse_sets(["V2=/d/v2.beton", "a=/d/a"])] == [
        ("v2", "/d/v2.beton"),
        ("a", "/d/a"),
    ]
    for bad in (["v2"], ["=/x"], ["v 2=/x"], ["a=/x", "a=/y"]):
        with pytest.raises(ConfigError):
            parse_sets(bad)


@pytest.fixture(scope="module")
def val_named(tmp_path_factory):
    """A 4-class validation tree whose files carry ImageNet validation names, and a real.json for it."""
    root = tmp_path_factory.mktemp("real")
    src = root / "src"
    make_imagefolder(src, num_classes=4, per_class=3, seed=8, min_side=24, max_side=40)
    k = 0
    for c in sorted(src.iterdir()):
        for f in sorted(c.iterdir()):
            k += 1
            os.rename(f, c / f"ILSVRC2012_val_{k:08d}.JPEG")
    real = [[i % 4] if i % 5 else [] for i in range(12)]  # entries 0, 5, 10 empty
    real[3] = [0, 1, 2, 3]
    (root / "real.json").write_text(json.dumps(real))
    convert(str(src), str(root / "val.beton"), workers=1, show_progress=False, page_size=2 << 20)
    return root


@pytest.mark.slow
def test_eval_several_sets_real_and_saved_predictions(val_named, data, tmp_path, capsys):
    """One eval: the plain set, a second name for it, ReaL and the predictions file; ReaL equals the hand computation
    from the saved predictions, and each set's top-1 equals the saved top-1."""
    from deit3_fast.config import load_config
    from deit3_fast.models import create_model

    cfg = load_config("quickstart", ["model.num_classes=4"])
    torch.manual_seed(0)
    model = create_model(cfg.model.name, num_classes=4, img_size=cfg.aug.img_size)
    torch.save({"model": model.state_dict()}, tmp_path / "ck.pt")
    preds = tmp_path / "p.jsonl"
    # The eval command's main, in this process: its output, table and exit codes are what is tested.
    from deit3_fast import cli

    eval_ = [
        "eval",
        "--cfg",
        "quickstart",
        "--set",
        "model.num_classes=4",
        "--set",
        "data.workers=1",
        "--device",
        "cpu",
        "--checkpoint",
        str(tmp_path / "ck.pt"),
    ]
    code = cli.main(
        [
            *eval_,
            "--val",
            f"in1k={val_named / 'val.beton'}",
            "--val",
            f"v2={data / 'val.beton'}",
            "--real",
            str(val_named / "real.json"),
            "--save-predictions",
            str(preds),
        ]
    )
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    out = json.loads(stdout.strip().splitlines()[-1])["sets"]
    assert "ReaL labels" in stderr and "in1k" in stderr  # the table
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    real = json.loads((val_named / "real.json").read_text())
    mine = [x for x in rows if x["set"] == "in1k"]
    assert [x["index"] for x in mine] == list(range(12)) and out["in1k"]["n"] == 12
    counted = [x for x in mine if real[int(x["source"][-13:-5]) - 1]]
    hits = sum(x["top5"][0] in real[int(x["source"][-13:-5]) - 1] for x in counted)
    assert len(counted) == 9 and out["real"] == {"acc1": pytest.approx(100 * hits / 9), "n": 9}
    for name in ("in1k", "v2"):
        these = [x for x in rows if x["set"] == name]
        assert out[name]["acc1"] == pytest.approx(100 * np.mean([x["top5"][0] == x["label"] for x in these]))
    # ReaL on a set whose files are not ImageNet validation files is one clear error.
    assert cli.main([*eval_, "--val", f"in1k={data / 'val.beton'}", "--real", str(val_named / "real.json")]) == 2
    assert "ReaL labels are indexed by ImageNet validation file names" in capsys.readouterr().err
    # ReaL without the IN-1k validation set named is refused before a model is built.

    assert (
        cli.main(
            [
                "eval",
                "--cfg",
                "quickstart",
                "--checkpoint",
                str(tmp_path / "missing.pt"),
                "--val",
                f"v2={data / 'val.beton'}",
                "--real",
                str(val_named / "real.json"),
            ]
        )
        == 2
    )
    assert "--real scores the ImageNet-1k validation set" in capsys.readouterr().err


@pytest.mark.slow
def test_training_logs_extra_sets_at_the_chosen_epochs(data, tmp_path):
    from deit3_fast.config import load_config
    from deit3_fast.trainer import train

    base = {
        "data.train": data / "train.beton",
        "data.val": data / "val.beton",
        "model.num_classes": 4,
        "data.batch_size": 8,
        "train.global_batch": 16,
        "schedule.epochs": 3,
        "schedule.warmup_epochs": 1,
        "data.workers": 1,
        "train.extra_val": f"[v2={data / 'val.beton'}]",
    }
    for every, evaluated in ((0, [False, False, True]), (2, [False, True, True])):
        cfg = load_config("quickstart", [f"{k}={v}" for k, v in {**base, "train.extra_val_every": every}.items()])
        rows = train(cfg, tmp_path / f"every{every}", torch.device("cpu"), quiet=True)
        assert [r["val_v2_acc1"] is not None for r in rows] == evaluated
        last = rows[-1]
        # The same set under two names gives the same number: the extra set really is evaluated.
        assert last["val_v2_acc1"] == pytest.approx(last["val_acc1"]) and "val_v2_acc5" in last
    logged = [json.loads(line) for line in (tmp_path / "every2" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("val_v2_acc1") is not None for r in logged if "epoch" in r] == [False, True, True]


@pytest.mark.slow
def test_zoo_counts_equal_the_official_table():
    """All eight IN-1k rows: GFLOPs (fvcore's multiply-adds: matrix products + 5 per LayerNorm element) truncated to
    one decimal are the official figures; parameters agree to the table's last digit, except ViT-S at 384, whose
    official count repeats the 224 one without the larger position embedding."""
    import math

    from deit3_fast.zoo import MODELS, count, official_rows

    rows = official_rows()
    assert len(rows) == 8
    for r in rows:
        params, gflops = count(MODELS[r["model"]], int(r["resolution"]))
        assert math.floor(gflops * 10 + 1e-9) / 10 == float(r["gflops"]), r
        if (r["model"], r["resolution"]) == ("vit_s", "384"):
            assert params - float(r["params_M"]) == pytest.approx((24 * 24 - 14 * 14) * 384 / 1e6 + 0.06, abs=0.01)
        else:
            assert abs(params - float(r["params_M"])) < 0.1, r


@pytest.mark.slow
def test_zoo_command_times_on_this_device_and_says_so(capsys):
    """Every row of the table (the official 8 and the recipes' 4 resolutions) is counted; timing all of them takes
    minutes on a CPU, so two models' rows are timed (--models), and a model name that is not one is one line.
    The command's main in this process: its output and exit codes are what is tested (a fresh process each would
    add three torch imports)."""
    from deit3_fast.cli import main

    assert main(["zoo", "--json", "--no-timing"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows) == 12 and all("img_s" not in row for row in rows)
    measured = {(row["model"], row["resolution"]) for row in rows}
    assert {("deit3_base", 192), ("deit3_large", 192), ("deit3_huge", 160), ("deit3_huge", 128)} <= measured
    assert main(["zoo", "--json", "--device", "cpu", "--batch", "1", "--models", "deit3_small", "deit3_medium"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["timing_device"] == "cpu"
    assert [(row["model"], row["resolution"]) for row in result["rows"]] == [
        (row["model"], row["resolution"]) for row in rows if row["model"] in ("deit3_small", "deit3_medium")
    ]
    assert all(
        row["img_s"] > 0 and row["official_img_s_v100"] != row["img_s"]
        for row in result["rows"]
        if row["official_img_s_v100"]
    )
    assert main(["zoo", "--models", "deit3_tiny"]) == 2
    assert "zoo --models: unknown deit3_tiny; choose from deit3_small" in capsys.readouterr().err


def test_the_shared_real_json_loads_as_reals_labels():
    from deit3_fast.evalsets import load_real

    from ..conftest import SHARED_DATA

    path = SHARED_DATA / "real.json"
    if not path.exists():
        pytest.skip(f"{path} is absent (it ships in the project's shared/data)")
    real = load_real(path)
    assert len(real) == 50_000 and sum(1 for x in real if not x) == 3_163
    assert all(0 <= c < 1000 for x in real for c in x)
    # Scored against its own first labels, every counted image is right: the file maps names as documented.
    sources = [f"n/ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(50_000)]
    top1 = [x[0] if x else 0 for x in real]
    assert real_top1(top1, sources, real) == {"acc1": 100.0, "n": 46_837}

"""Bad configs, as files and as `--set`: unknown keys, wrong types, values out of range, files that are not YAML or not
text, missing data paths, and a `--cfg` that does not exist. Each is one line `deit3-fast: error: ...` and exit 2,
before anything is built or written.

Covered elsewhere (not repeated here): tests/deit3_fast/test_train.py::test_cli_dry_run_and_one_line_errors runs
four of these (`optim.lrr`, `data.batch_size=big`, an unknown recipe, an absent .beton) as separate processes.
"""

import pytest

from deit3_fast import cli


FILES = {  # name: (file content, fragment of the message)
    "unknown_key": (b"optim:\n  lrr: 0.1\n", "unknown config key 'optim.lrr' (did you mean 'lr'?)"),
    "unknown_section": (b"optimiser:\n  lr: 0.1\n", "unknown config key 'optimiser' (did you mean 'optim'?)"),
    "number_key": (b"1: 2\n", "unknown config key '1'"),
    "null_key": (b"~: 2\n", "unknown config key 'None'"),
    "wrong_type": (b"data:\n  batch_size: big\n", "data.batch_size: expected int, got 'big'"),
    "bool_for_int": (b"schedule:\n  epochs: true\n", "schedule.epochs: expected int, got True"),
    "float_for_int": (b"data:\n  batch_size: 8.5\n", "data.batch_size: expected int, got 8.5"),
    "short_tuple": (b"aug:\n  rrc_scale: [0.5]\n", "aug.rrc_scale: expected a list of 2 numbers"),
    "not_a_choice": (b"train:\n  amp: fp8\n", "train.amp: 'fp8' is not one of auto, bf16, fp16, fp32"),
    "zero_batch": (b"data:\n  batch_size: 0\n", "data.batch_size: must be at least 1, got 0"),
    "zero_image": (b"aug:\n  img_size: 0\n", "aug.img_size: must be at least 1, got 0"),
    "section_scalar": (b"model: 3\n", "model: expected a mapping, got 3"),
    "section_list": (b"model: []\n", "model: expected a mapping, got []"),
    "top_level_list": (b"- model\n- data\n", "expected a mapping of sections"),
    "top_level_text": (b"just some words\n", "expected a mapping of sections"),
    "bad_yaml": (b"model: {name: [\n", "not valid YAML"),
    "tabs": (b"model:\n\tname: x\n", "not valid YAML"),
    "python_tag": (b"model: !!python/object/apply:os.system [ls]\n", "not valid YAML"),
    "deep_nesting": (b"[" * 5000 + b"]" * 5000, "not valid YAML"),
    "binary": (bytes(range(256)) * 4, "not a YAML text file (not UTF-8)"),
}


def _run(args, capsys) -> str:
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deit3-fast: error: "), err
    return lines[0]


@pytest.mark.parametrize("case", sorted(FILES))
def test_bad_config_file(case, tmp_path, capsys):
    content, fragment = FILES[case]
    cfg = tmp_path / f"{case}.yaml"
    cfg.write_bytes(content)
    line = _run(["train", "--cfg", str(cfg), "--out", str(tmp_path / "run")], capsys)
    assert fragment in line
    assert not (tmp_path / "run").exists()  # nothing built, nothing written


def test_top_level_not_a_mapping_with_set(tmp_path, capsys):
    """A file holding a list, plus a `--set` (which once failed with AttributeError: no setdefault on a list)."""
    cfg = tmp_path / "list.yaml"
    cfg.write_text("- model\n- data\n")
    line = _run(["train", "--cfg", str(cfg), "--set", "model.name=deit3_nano", "--out", str(tmp_path / "run")], capsys)
    assert "expected a mapping of sections" in line


SETS = {  # --set value: fragment
    "optim.lrr=1": "unknown config key 'optim.lrr' (did you mean 'lr'?)",
    "optim=1": "optim: expected a mapping, got 1",
    "optim.lr.x=1": "'lr' is not a section",
    "optim.lr": "--set takes KEY=VALUE (got 'optim.lr'): write --set optim.lr=VALUE",
    "=1": "unknown config key ''",
    "data.batch_size=big": "data.batch_size: expected int, got 'big'",
    "data.batch_size=-8": "data.batch_size: must be at least 1, got -8",
    "train.global_batch=0": "train.global_batch: must be at least 1, got 0",
    "train.log_every=0": "train.log_every: must be at least 1, got 0",
    "model.num_classes=0": "model.num_classes: must be at least 1, got 0",
    "optim.betas=[0.9]": "optim.betas: expected a list of 2 numbers",
    "model.name=[": "--set 'model.name=[': the value is not valid YAML",
    "model.name={a: [}": "the value is not valid YAML",
    "model.name=!!python/name:os.system": "the value is not valid YAML",
    "loss=mse": "loss: 'mse' is not one of bce, ce",
    "aug.auto_augment=rand-m9-mstd0.5-inc": "aug.auto_augment 'rand-m9-mstd0.5-inc': unknown section 'inc'",
    "aug.auto_augment=autoaug-v0": "aug.auto_augment 'autoaug-v0': not a RandAugment policy",
    "train.global_batch=40": "train.global_batch 40 is not a multiple of data.batch_size 32 x world size 1: use "
    "--set data.batch_size=20 (2 accumulation steps)",
}


@pytest.mark.parametrize("assignment", list(SETS))
def test_bad_set_override(assignment, tmp_path, capsys):
    line = _run(["train", "--cfg", "quickstart", "--set", assignment, "--out", str(tmp_path / "run")], capsys)
    assert SETS[assignment] in line
    assert not any((tmp_path / "run").glob("checkpoint*"))


@pytest.mark.parametrize(
    "cfg, fragment",
    [
        ("no_such_recipe", "config 'no_such_recipe' not found"),
        ("vit_s_in1kk", "did you mean 'vit_s_in1k'?"),
        ("/nonexistent/dir/run.yaml", "config '/nonexistent/dir/run.yaml' not found"),
        ("configs", "config 'configs' not found"),  # a folder is not a config file
        ("bad\0name", "not found"),
    ],
)
def test_missing_cfg(cfg, fragment, tmp_path, capsys):
    assert fragment in _run(["train", "--cfg", cfg, "--out", str(tmp_path / "run")], capsys)


@pytest.mark.parametrize("what", ["train_unset", "train_missing", "val_missing", "train_is_folder"])
def test_missing_data_path(what, data, tmp_path, capsys):
    """Data paths are checked before the first step: nothing is trained and no checkpoint is written."""
    sets = {
        "model.num_classes": 4,
        "data.batch_size": 4,
        "train.global_batch": 4,
        "data.workers": 1,
        "data.repeats": 1,
        "data.val": data / "val.beton",
        "data.train": data / "train.beton",
    }
    if what == "train_unset":
        sets["data.train"] = "null"
    elif what == "train_missing":
        sets["data.train"] = tmp_path / "absent.beton"
    elif what == "val_missing":
        sets["data.val"] = tmp_path / "absent_val.beton"
    else:
        sets["data.train"] = tmp_path
    args = ["train", "--cfg", "quickstart", "--out", str(tmp_path / "run")]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    line = _run(args, capsys)
    fragment = {
        "train_unset": "no train data: pass --data-train PATH or set data.train",
        "train_missing": f"{tmp_path / 'absent.beton'}: cannot open (No such file or directory): write it with "
        "deit3-convert, or pass --data-train PATH",
        "val_missing": f"{tmp_path / 'absent_val.beton'}: cannot open (No such file or directory): write it with "
        "deit3-convert, or pass --data-val PATH",
        "train_is_folder": f"{tmp_path}: a folder without manifest.json, so not a .beton or a shard set",
    }[what]
    assert fragment in line
    assert not any((tmp_path / "run").glob("checkpoint*")) and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "recipe, said",
    [
        # a recipe of one's own without a data section
        (
            "own.yaml",
            "no train data: pass --data-train PATH or set data.train (a .beton or shard folder written by "
            "deit3-convert)",
        ),
        # the shipped recipes on a machine without their data (paths relative to the working directory; {cwd}/ in
        # the message, as train resolves them)
        (
            "vit_s_in1k",
            "{cwd}/data/imagenet/train_256.beton: cannot open (No such file or directory): write it with "
            "deit3-convert, or pass --data-train PATH",
        ),
        (  # model.num_classes: auto, counted from the data before it is opened
            "vit_s_in21k",
            "model.num_classes: auto counts the classes of {cwd}/data/imagenet21k/train, which does not exist: "
            "write it with deit3-convert, or pass --data-train PATH",
        ),
    ],
)
def test_a_recipe_without_its_data_says_to_pass_data_train(recipe, said, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "own.yaml").write_text("schedule:\n  epochs: 1\n")
    line = _run(["train", "--cfg", recipe, "--out", str(tmp_path / "run"), "--device", "cpu"], capsys)
    assert line == "deit3-fast: error: " + said.format(cwd=tmp_path)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

"""Our own .beton writer (read by FFCV unchanged), shard sets with their manifest, --shard-index re-runs, --holdout,
--short-side, and every reader taking a shard set as one data set over the global sample index."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dataset_tools.beton import ALLOC_ENTRY, HEADER, Beton, BetonError, BetonWriter
from dataset_tools.convert import convert
from dataset_tools.images import stored_size
from dataset_tools.shards import ShardSet, classes_of, open_samples, shard_name
from dataset_tools.synthetic import make_imagefolder

from ..conftest import REPO, env_without, plain_loader, run_cli

PAGE = 2 << 20


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """4 classes of 9, 7, 5 and 3 images (uneven, so dealing to shards is visible), 40..90 px."""
    root = tmp_path_factory.mktemp("shards") / "src"
    make_imagefolder(root, num_classes=4, per_class=9, seed=3, min_side=40, max_side=90)
    for c, keep in ((1, 7), (2, 5), (3, 3)):
        for p in sorted((root / f"class_{c:02d}").iterdir())[keep:]:
            p.unlink()
    return root


def _digests(samples) -> list[tuple[int, str]]:
    labels = samples.labels_at(np.arange(len(samples)))
    return sorted((int(y), hashlib.sha256(bytes(samples.image_bytes(i))).hexdigest()) for i, y in enumerate(labels))


@pytest.fixture(scope="module")
def single(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "all.beton"
    convert(str(tree), str(out), workers=2, show_progress=False, page_size=PAGE)
    return out


@pytest.fixture(scope="module")
def sharded(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "train"
    convert(str(tree), str(out), shards=3, workers=2, show_progress=False, page_size=PAGE)
    return out


@pytest.mark.slow
def test_written_layout_is_ffcvs_and_ffcv_reads_it(tmp_path):
    """Header, sorted allocation table (by sample and pointer), no sample across a page boundary, whole pages; and
    FFCV's own Reader and Loader (page cache and mmap) read the file: same labels, same pixels (both decoders are
    libjpeg-turbo, FFCV's with its fast DCT and upsampling: > 40 dB PSNR)."""
    ffcv_reader = pytest.importorskip("ffcv.reader")
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    src = tmp_path / "src"
    make_imagefolder(src, num_classes=3, per_class=5, seed=2, min_side=48, max_side=48)  # one size: FFCV's
    out = tmp_path / "same.beton"  # simple decoder needs it
    convert(str(src), str(out), workers=2, show_progress=False, page_size=PAGE)
    b = Beton(out)
    t = b.alloc_table
    assert (t["sample_id"] == np.arange(len(b))).all() and (np.diff(t["ptr"].astype(np.int64)) > 0).all()
    first_page = int(b.image_meta()["data_ptr"].min())
    start, end = t["ptr"].astype(np.int64) - first_page, (t["ptr"] + t["size"] - 1).astype(np.int64) - first_page
    assert first_page % PAGE == 0 and (start // PAGE == end // PAGE).all()
    assert (b.alloc_table_ptr - first_page) % PAGE == 0
    theirs = ffcv_reader.Reader(str(out))
    assert theirs.num_samples == len(b) == 15 and theirs.field_names == ["image", "label"]
    np.testing.assert_array_equal(theirs.metadata["f1"], b.labels())
    for os_cache in (False, True):
        loader = Loader(
            str(out),
            batch_size=4,
            num_workers=1,
            order=OrderOption.SEQUENTIAL,
            os_cache=os_cache,
            drop_last=False,
            pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]},
        )
        images = np.concatenate([np.asarray(x).copy() for x, _ in loader])
        ours = np.stack([b.decode(i) for i in range(len(b))])
        mse = ((images.astype(np.float64) - ours) ** 2).mean()
        assert images.shape == ours.shape and 10 * np.log10(255**2 / mse) > 40
        labels = np.concatenate([np.asarray(y).ravel().copy() for _, y in loader])
        np.testing.assert_array_equal(labels, b.labels())


def test_an_unfinished_file_is_never_a_beton(tmp_path):
    """Until close() the header says version 0: a file left by a crash is refused, not half-read."""
    w = BetonWriter(str(tmp_path / "x.beton"), 2, PAGE)
    w.add(np.frombuffer(b"\xff\xd8abc", np.uint8), 0, 1, 1, 0)
    w.fp.flush()
    with pytest.raises(BetonError, match="format version 0"):
        Beton(tmp_path / "x.beton")
    size = w.close()
    b = Beton(tmp_path / "x.beton")
    assert size == os.path.getsize(tmp_path / "x.beton") == b.alloc_table_ptr + ALLOC_ENTRY.itemsize
    assert np.frombuffer(open(tmp_path / "x.beton", "rb").read(HEADER.itemsize), HEADER)["num_samples"] == 1


def test_shards_hold_every_class_in_proportion_and_together_the_single_files_samples(tree, single, sharded):
    manifest = json.loads((sharded / "manifest.json").read_text())
    assert manifest["classes"] == json.loads(open(f"{single}.json").read())["classes"]
    assert [e["file"] for e in manifest["shards"]] == [shard_name(s, 3) for s in range(3)]
    per_shard = []
    for e in manifest["shards"]:
        path = sharded / e["file"]
        assert e["bytes"] == path.stat().st_size
        assert e["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        per_shard.append(np.bincount(Beton(path).labels(), minlength=4))
        assert e["num_samples"] == per_shard[-1].sum()
    counts = np.stack(per_shard)
    assert (counts.max(0) - counts.min(0) <= 1).all() and counts.sum(0).tolist() == [9, 7, 5, 3]
    assert manifest["num_samples"] == 24 and manifest["report"]["class_counts"] == [9, 7, 5, 3]
    # Same pixels, same bytes: a shard set is the single file's samples, dealt out.
    assert _digests(ShardSet(sharded)) == _digests(Beton(single))


def test_shard_index_tasks_then_the_manifest_then_reruns_skip_verified_shards(tree, tmp_path):
    out = tmp_path / "train"
    args = [tree, out, "--shards", "3", "--workers", "1", "--quiet"]
    r = run_cli(*args, "--shard-index", "1")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        shard_name(1, 3),
        shard_name(1, 3) + ".json",
        shard_name(1, 3) + ".sources.txt",
    ]
    with pytest.raises(BetonError, match="no manifest.json yet: 1 shard file"):
        open_samples(out)
    for i in (0, 2):
        assert run_cli(*args, "--shard-index", str(i)).returncode == 0
    assert len(ShardSet(out)) == 24
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.beton")}
    assert run_cli(*args).returncode == 0  # all complete and verified: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.beton")} == stamps
    damaged = out / shard_name(2, 3)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert run_cli(*args).returncode == 0  # shard 2 fails its checksum and is written again, alone
    now = {p.name: p.stat().st_mtime_ns for p in out.glob("*.beton")}
    assert [n for n in now if now[n] != stamps[n]] == [shard_name(2, 3)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"][2]["sha256"] == hashlib.sha256(damaged.read_bytes()).hexdigest()
    r = run_cli(*args, "--shard-index", "3")
    assert r.returncode == 2 and "--shard-index 3: there are 3 tasks" in r.stderr


def test_holdout_is_k_per_class_excluded_from_training_and_seeded(tree, tmp_path):
    out = tmp_path / "t.beton"
    convert(str(tree), str(out), holdout=2, workers=2, show_progress=False, page_size=PAGE)
    held = Beton(tmp_path / "t-holdout.beton")
    assert np.bincount(held.labels()).tolist() == [2, 2, 2, 2]
    assert np.bincount(Beton(out).labels()).tolist() == [7, 5, 3, 1]
    assert classes_of(tmp_path / "t-holdout.beton") == classes_of(out)
    train, hold = set(_digests(Beton(out))), set(_digests(held))
    assert not train & hold and len(train | hold) == 24
    again = tmp_path / "again.beton"
    convert(str(tree), str(again), holdout=2, workers=1, show_progress=False, page_size=PAGE)
    assert set(_digests(Beton(tmp_path / "again-holdout.beton"))) == hold
    other = tmp_path / "seed1.beton"
    convert(str(tree), str(other), holdout=2, seed=1, workers=1, show_progress=False, page_size=PAGE)
    assert set(_digests(Beton(tmp_path / "seed1-holdout.beton"))) != hold
    # With shards, the held-out split is the last task and named in the manifest.
    sh = tmp_path / "sh"
    convert(str(tree), str(sh), shards=2, holdout=2, workers=2, show_progress=False, page_size=PAGE)
    manifest = json.loads((sh / "manifest.json").read_text())
    assert manifest["holdout"]["file"] == "holdout.beton" and manifest["holdout"]["num_samples"] == 8
    assert set(_digests(Beton(sh / "holdout.beton"))) == hold and len(ShardSet(sh)) == 16


@pytest.mark.parametrize(
    "w, h, max_res, short, expected",
    [
        (500, 375, 256, None, (256, 192)),
        (500, 375, None, 256, (341, 256)),
        (375, 500, None, 256, (256, 341)),
        (200, 150, None, 256, (200, 150)),
        (1000, 300, 512, 256, (512, 153)),
        (640, 480, 512, 256, (341, 256)),
    ],
)
def test_stored_size(w, h, max_res, short, expected):
    assert stored_size(w, h, max_res, short) == expected


def test_short_side_keeps_aspect_and_stores_the_short_side(tmp_path):
    src = tmp_path / "src"
    make_imagefolder(src, num_classes=2, per_class=3, seed=1, min_side=300, max_side=420)
    out = tmp_path / "s.beton"
    r = run_cli(src, out, "--short-side", "256", "--workers", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads(open(f"{out}.json").read())
    assert report["options"]["short_side"] == 256 and report["options"]["max_resolution"] is None
    from PIL import Image

    meta = Beton(out).image_meta()
    files = sorted(p for p in src.rglob("*.JPEG"))
    for m, f in zip(meta, files):
        w, h = Image.open(f).size
        sw, sh = int(m["width"]), int(m["height"])
        assert min(sw, sh) == min(256, w, h)
        assert abs(max(sw, sh) - max(w, h) * min(sw, sh) / min(w, h)) <= 1  # aspect kept


@pytest.mark.parametrize("engine", ["nvjpeg", "dali"])
def test_engines_read_a_shard_set_as_the_same_global_index(sharded, tmp_path, engine):
    """A shard set and one .beton holding the same samples in the global order give the same batches: same samples,
    order, dealing to ranks and keyed crops, pixel for pixel (the engine reads shards, nothing else changes)."""
    if engine == "dali":
        pytest.importorskip("pipelines.dali_engine")  # DALI, imported as the engine does
    shards = ShardSet(sharded)
    flat = tmp_path / "flat.beton"  # the shard files' samples one after another, read without ShardSet
    w = BetonWriter(str(flat), len(shards), PAGE)
    for entry in json.loads((sharded / "manifest.json").read_text())["shards"]:
        b = Beton(sharded / entry["file"])
        for j in range(len(b)):
            m = b.image_meta()[j]
            w.add(np.array(b.image_bytes(j)), int(m["mode"]), int(m["height"]), int(m["width"]), int(b.labels()[j]))
    w.close()
    common = {
        "data.engine": engine,
        "data.workers": 1,
        "data.batch_size": 4,
        "data.repeats": 1,
        "data.seed": 5,
        "aug.img_size": 32,
        "aug.crop": "rrc",
        "aug.mixup": 0.0,
        "aug.cutmix": 0.0,
        "model.num_classes": 4,
    }
    for rank in (0, 1):
        a = plain_loader("train", **common, **{"data.train": sharded}, rank=rank, world=2)
        b = plain_loader("train", **common, **{"data.train": flat}, rank=rank, world=2)
        for epoch in (0, 1):
            pa, pb = list(a.engine.batches(epoch)), list(b.engine.batches(epoch))
            assert len(pa) == len(pb) > 0
            for (xa, ya), (xb, yb) in zip(pa, pb):
                assert ya.tolist() == yb.tolist()
                assert (xa.numpy() == xb.numpy()).all()
    val = plain_loader("val", **{**common, "data.val": sharded})
    labels = np.concatenate([y.numpy() for _, y in val.engine.batches(0)])
    assert labels.tolist() == shards.labels_at(np.arange(len(shards))).tolist()


def test_ffcv_engine_and_broken_shard_sets_are_one_clear_message(sharded, tmp_path):
    import shutil

    from pipelines.build import DataError

    with pytest.raises(DataError, match="shard set; FFCV's loader reads one file: set data.stage_to"):
        plain_loader("train", **{"data.train": sharded, "data.engine": "ffcv", "model.num_classes": 4})
    copy = tmp_path / "copy"
    shutil.copytree(sharded, copy)
    victim = copy / shard_name(1, 3)
    victim.write_bytes(victim.read_bytes()[:-100])  # an incomplete copy
    with pytest.raises(DataError, match=r"shard-00001-of-00003.beton: \d+ bytes, the manifest says"):
        plain_loader(
            "train", **{"data.train": copy, "data.engine": "nvjpeg", "data.repeats": 1, "model.num_classes": 4}
        )
    with pytest.raises(DataError, match="has 4 classes but model.num_classes is 3"):
        plain_loader(
            "train", **{"data.train": sharded, "data.engine": "nvjpeg", "data.repeats": 1, "model.num_classes": 3}
        )


def test_inspect_and_classes_take_a_shard_set(tree, sharded, tmp_path):
    r = run_cli("--inspect", sharded, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["num_samples"], info["shards"], info["num_classes"], info["decode_failures"]) == (24, 3, 4, 0)
    # A val split takes its labels from the shard set's manifest (folder or file).
    for ref in (sharded, sharded / "manifest.json"):
        out = tmp_path / f"val_{ref.name}.beton"
        assert run_cli(tree, out, "--classes", ref, "--max-per-class", "1", "--quiet").returncode == 0
        assert classes_of(out) == classes_of(sharded)


def test_num_classes_auto_counts_the_classes_of_the_data(sharded, single, tmp_path):
    from deit3_fast.config import ConfigError, load_config, resolve_num_classes

    for data in (sharded, single):
        cfg = load_config("quickstart", ["model.num_classes=auto", f"data.train={data}"])
        assert cfg.model.num_classes == "auto" and resolve_num_classes(cfg).model.num_classes == 4
    bare = tmp_path / "bare.beton"
    bare.write_bytes(single.read_bytes())  # no report beside it
    with pytest.raises(ConfigError, match="has no conversion report"):
        resolve_num_classes(load_config("quickstart", ["model.num_classes=auto", f"data.train={bare}"]))
    with pytest.raises(ConfigError, match="a class count or auto"):
        load_config("quickstart", ["model.num_classes=many"])


def test_conversion_and_the_nvjpeg_engine_need_no_ffcv(tree, tmp_path):
    """FFCV hidden: conversion (sharded), --inspect and a training batch from the nvjpeg engine still work."""
    env = env_without(tmp_path / "block", "ffcv")
    out = tmp_path / "train"
    code = (
        "import sys\n"
        "from dataset_tools.convert import main\n"
        f"assert main([{str(tree)!r}, {str(out)!r}, '--shards', '2', '--workers', '2', '--quiet']) == 0\n"
        f"assert main(['--inspect', {str(out)!r}, '--json']) == 0\n"
        "import torch\n"
        "from pipelines import build_loader\n"
        "from pipelines.config import AugConfig, DataConfig\n"
        f"loader = build_loader(DataConfig(train={str(out)!r}, engine='nvjpeg', batch_size=4, workers=1, repeats=1),\n"
        "                      AugConfig(img_size=32), 'train', num_classes=4, device='cpu')\n"
        "x, y = next(iter(loader))\n"
        "assert x.shape == (4, 3, 32, 32), x.shape\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'ffcv']\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_local_executor_runs_one_task_per_shard_and_the_holdout(tree, tmp_path):
    """--local: submitit's local executor runs `--shard-index I` for every shard and the held-out split; the
    manifest is complete at the end. The Slurm path (--submit) builds the same tasks with map_array."""
    pytest.importorskip("submitit")
    from dataset_tools.convert_jobs import _task_argv

    out = tmp_path / "train"
    r = run_cli(
        tree, out, "--shards", "2", "--holdout", "1", "--local", "--workers", "1", "--timeout-min", "10", timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["num_samples"] for e in manifest["shards"]] == [10, 10] and manifest["holdout"]["num_samples"] == 4
    assert len(list((out / "submitit").glob("*_log.out"))) == 3
    assert _task_argv(
        ["s", "o", "--shards", "2", "--submit", "--partition", "p", "--timeout-min=5", "--workers", "4"]
    ) == ["s", "o", "--shards", "2", "--workers", "4"]
    r = run_cli(tree, out, "--shards", "2", "--submit", "--local")
    assert r.returncode == 2 and "not both" in r.stderr


def test_stage_copies_verifies_and_resumes(sharded, tmp_path):
    from dataset_tools.stage import stage

    dest = tmp_path / "local"
    assert stage(sharded, dest) == dest
    staged = ShardSet(dest)
    assert _digests(staged) == _digests(ShardSet(sharded)) and classes_of(dest) == classes_of(sharded)
    stamps = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    (dest / shard_name(0, 3)).unlink()  # one file lost (or a copy killed half-way: the atomic write left nothing)
    stage(sharded, dest)  # only that file is copied again
    now = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    assert sorted(n for n in now if now[n] != stamps.get(n)) == sorted(
        [shard_name(0, 3), ".staged.json", "manifest.json"]
    )
    # A source file re-written since (same size: .beton files are page-padded) is copied again.
    src_file = sharded / shard_name(2, 3)
    os.utime(src_file, ns=(src_file.stat().st_atime_ns, src_file.stat().st_mtime_ns + 10**9))
    stage(sharded, dest)
    again = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    assert again[shard_name(2, 3)] != now[shard_name(2, 3)] and again[shard_name(1, 3)] == now[shard_name(1, 3)]
    # A source shard whose bytes are not the manifest's is refused, and nothing of it is left at the destination.
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(sharded, bad)
    victim = bad / shard_name(1, 3)
    data = bytearray(victim.read_bytes())
    data[100] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(BetonError, match="sha256 differs from the manifest's"):
        stage(bad, tmp_path / "local_bad")
    assert not (tmp_path / "local_bad" / shard_name(1, 3)).exists()
    assert not (tmp_path / "local_bad" / "manifest.json").exists()
    r = subprocess.run(
        [sys.executable, "-m", "deit3_fast", "stage", str(bad), str(tmp_path / "x"), "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "sha256 differs" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["nvjpeg", "ffcv"])
def test_training_with_stage_to_reads_the_staged_copy(sharded, single, tmp_path, engine):
    """data.stage_to: the run stages both splits at its start and reads them from there (config.yaml says so); for
    the ffcv engine, which reads one file, the shard set is merged into one .beton on the way."""
    import yaml

    from deit3_fast import cli

    if engine == "ffcv":
        pytest.importorskip("ffcv")
    out, local = tmp_path / "run", tmp_path / "node_local"
    sets = {
        "model.num_classes": "auto",
        "data.batch_size": 8,
        "train.global_batch": 8,
        "schedule.epochs": 1,
        "schedule.warmup_epochs": 0,
        "data.workers": 1,
        "data.engine": engine,
        "data.repeats": 1,
        "data.stage_to": str(local),
    }
    args = [
        "train",
        "--cfg",
        "quickstart",
        "--data-train",
        str(sharded),
        "--data-val",
        str(single),
        "--out",
        str(out),
        "--quiet",
        *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
    ]
    assert cli.main(args) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    train = local / "train" / ("merged.beton" if engine == "ffcv" else "")
    assert saved["data"]["train"] == str(train) and saved["data"]["val"] == str(local / "val" / "all.beton")
    assert saved["model"]["num_classes"] == 4 and (local / "val" / "all.beton.json").exists()
    if engine == "ffcv":  # the merge is the shard set's samples in global order
        merged, shards = Beton(train), ShardSet(sharded)
        assert [bytes(merged.image_bytes(i)) for i in range(len(merged))] == [
            bytes(shards.image_bytes(i)) for i in range(len(shards))
        ]
        assert merged.labels().tolist() == shards.labels_at(np.arange(len(shards))).tolist()
    else:
        assert (local / "train" / "manifest.json").exists()


@pytest.mark.slow
def test_submit_sends_one_array_task_per_shard(tree, tmp_path, monkeypatch, capsys):
    """--submit: the Slurm path (map_array of ShardTask over the task indices, the sbatch options set) run through
    submitit's local cluster instead of Slurm; the tasks write the shards and the last one the manifest."""
    import time

    submitit = pytest.importorskip("submitit")
    from dataset_tools.convert import main

    real, seen = submitit.AutoExecutor, {}

    def local_instead_of_slurm(folder, cluster=None):
        seen["cluster"] = cluster
        executor = real(folder=folder, cluster="local")
        update = executor.update_parameters
        executor.update_parameters = lambda **kw: (seen.update(kw), update(**kw))
        return executor

    monkeypatch.setattr(submitit, "AutoExecutor", local_instead_of_slurm)
    out = tmp_path / "train"
    assert (
        main(
            [
                str(tree),
                str(out),
                "--shards",
                "3",
                "--submit",
                "--partition",
                "cpu",
                "--workers",
                "1",
                "--array-parallelism",
                "3",
            ]
        )
        == 0
    )
    assert "submitted 3 shard task(s) as a job array" in capsys.readouterr().out
    assert seen["cluster"] is None and seen["slurm_partition"] == "cpu" and seen["slurm_array_parallelism"] == 3
    deadline = time.time() + 300
    while not (out / "manifest.json").exists() and time.time() < deadline:
        time.sleep(0.5)
    assert len(ShardSet(out)) == 24


def test_main_called_in_process_leaves_the_sigterm_handler_as_it_was(tree, tmp_path):
    """A submitit shard task calls main() in its own process; its SIGTERM handler must be the caller's again after."""
    import signal

    from dataset_tools.convert import main

    before = signal.getsignal(signal.SIGTERM)
    assert main([str(tree), str(tmp_path / "o.beton"), "--workers", "1", "--quiet"]) == 0
    assert main([str(tree), str(tmp_path / "missing" / "o.beton"), "--quiet"]) == 2
    assert signal.getsignal(signal.SIGTERM) is before

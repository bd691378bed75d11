"""torchrun with gloo on CPU: 2 processes x batch B train like 1 process x batch 2B; evaluation counts are exact."""
import json
import subprocess
import sys

import pytest
import torch

from deit3_fast.checkpoint import load

from .conftest import REPO, make_splits

pytestmark = pytest.mark.slow  # ~1.5 min: four multi-process runs

# Augmentation off and square images with scale/ratio 1 crops: every sample is the same whatever rank or batch slot
# it lands in, so only the batch split differs between the two runs.
DETERMINISTIC = ["aug.three_augment=false", "aug.color_jitter=0", "aug.hflip=0", "aug.mixup=0", "aug.cutmix=0",
                 "aug.rrc_scale=[1,1]", "aug.rrc_ratio=[1,1]", "model.drop_path=0", "model.num_classes=4",
                 "data.workers=1", "schedule.epochs=2", "schedule.warmup_epochs=1", "train.global_batch=16",
                 "train.log_every=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # val: 15 samples, not divisible by the world size
    return make_splits(tmp_path_factory.mktemp("ddp"), {"train": (4, 12, 0), "val": (3, 5, 1)}, min_side=48,
                       max_side=48)


def run(args, nproc):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    r = subprocess.run([*launcher, "-m", "deit3_fast", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("per_process", [8, 4], ids=["no-accumulation", "accumulation-2"])
def test_two_processes_train_like_one_with_twice_the_batch(data, tmp_path, per_process):
    """Global batch 16 = 2 processes x 8, or 2 x 4 x 2 accumulation steps (gradients all-reduced once per step,
    under DDP no_sync for the first micro-batch) == 1 process x 16."""
    common = ["train", "--cfg", "quickstart", "--data-train", data / "train.beton", "--data-val", data / "val.beton",
              "--device", "cpu", "--quiet"]
    sets = [x for s in DETERMINISTIC for x in ("--set", s)]
    run([*common, *sets, "--set", "data.batch_size=16", "--out", tmp_path / "one"], nproc=1)
    two = run([*common, *sets, "--set", f"data.batch_size={per_process}", "--out", tmp_path / "two"], nproc=2)
    summaries = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and json.loads(summaries[0])["world_size"] == 2  # only rank 0 reports
    a, b = load(tmp_path / "one" / "checkpoint-last.pt"), load(tmp_path / "two" / "checkpoint-last.pt")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    rows = [[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("one", "two")]
    for ra, rb in zip(*rows):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
        assert ra["val_acc1"] == pytest.approx(rb["val_acc1"])  # distributed eval: the same 15 samples, once each
    assert not (tmp_path / "two" / ".checkpoint-last.pt.partial-0").exists()


def test_distributed_eval_counts_every_sample_once(data, tmp_path):
    sets = [x for s in DETERMINISTIC + ["data.batch_size=4"] for x in ("--set", s)]
    run(["train", "--cfg", "quickstart", "--data-train", data / "train.beton", "--data-val", data / "val.beton",
         "--device", "cpu", "--quiet", "--out", tmp_path, *sets, "--set", "schedule.epochs=1"], nproc=1)
    r = run(["eval", "--cfg", "quickstart", "--data-val", data / "val.beton", "--device", "cpu",
             "--checkpoint", tmp_path / "checkpoint-last.pt", *sets], nproc=2)
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1 and results[0]["n"] == 15
    single = run(["eval", "--cfg", "quickstart", "--data-val", data / "val.beton", "--device", "cpu",
                  "--checkpoint", tmp_path / "checkpoint-last.pt", *sets], nproc=1)
    assert json.loads(single.stdout.strip().splitlines()[-1]) == results[0]


def test_cli_leaves_the_process_group_on_every_exit(tmp_path):
    """gloo threads alive at interpreter exit abort the process (SIGABRT) after a successful run: `main` must leave
    the group whether the command succeeds or fails."""
    from deit3_fast.cli import main

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert main(["eval", "--cfg", "quickstart", "--data-val", str(tmp_path / "missing.beton"), "--device", "cpu",
                 "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert not torch.distributed.is_initialized()

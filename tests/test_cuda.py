"""What only a GPU can show: every CUDA-only line of the product, run. Skipped without a CUDA device (conftest);
`scripts/gpu-check.sh` runs them on a GPU machine, with the .beton files it brings along (DEIT3_GPU_CHECK_DATA)."""

import json
import os

import numpy as np
import pytest
import torch

from deit3_fast import trainer
from deit3_fast.loaders import make_loader
from deit3_fast.checkpoint import load
from deit3_fast.config import load_config
from pipelines.augment import BatchAugment, augment, normalize, to_float
from pipelines.config import AugConfig

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda", 0)


def cfg_for(data, engine_name="nvjpeg", **sets):
    base = {
        "data.train": data / "train.beton",
        "data.val": data / "val.beton",
        "model.num_classes": 4,
        "data.batch_size": 8,
        "train.global_batch": 16,
        "schedule.epochs": 1,
        "schedule.warmup_epochs": 1,
        "model.drop_path": 0.1,
        "train.log_every": 2,
        "data.workers": 2,
        "data.engine": engine_name,
        "data.repeats": 1,
        "aug.img_size": 48,
    }
    base.update(sets)
    return load_config("quickstart", [f"{k}={v}" for k, v in base.items()])


def build_loader(cfg, split, device):
    return make_loader(cfg, split, torch.device(device))


def engine_batches(cfg, split, device, epoch=0):
    loader = build_loader(cfg, split, device)
    return [(x.cpu(), y.cpu()) for x, y in loader.engine.batches(epoch)]


@pytest.mark.parametrize("split, crop", [("train", "rrc"), ("train", "src"), ("val", "rrc")])
def test_nvjpeg_gpu_decode_is_pixel_close_to_the_cpu_path(data, split, crop):
    """Same samples, order, crop boxes, resampling (Pillow's bicubic weights on both) and SRC's reflect padding (the
    GPU's torch pad); only the decoders differ, nvJPEG vs libjpeg-turbo: a grey level or two."""
    cfg = cfg_for(data, **{"aug.crop": crop})
    gpu, cpu = engine_batches(cfg, split, CUDA), engine_batches(cfg, split, "cpu")
    assert len(gpu) == len(cpu)
    for (xg, yg), (xc, yc) in zip(gpu, cpu):
        assert torch.equal(yg, yc) and xg.shape == xc.shape and xg.dtype == torch.uint8
        diff = (xg.float() - xc.float()).abs()
        assert diff.mean() < 1.5 and diff.mean(dim=(1, 2, 3)).max() < 3.0, diff.mean()


def test_nvjpeg_reads_raw_pixel_files_on_the_gpu(data):
    """A batch with no JPEG at all (raw .beton, the CIFAR example) must not call decode_jpeg([])."""
    cfg = cfg_for(data, **{"data.val": data / "raw.beton", "model.num_classes": 3})
    gpu, cpu = engine_batches(cfg, "val", CUDA), engine_batches(cfg, "val", "cpu")
    assert len(gpu) == len(cpu) > 0
    for (xg, yg), (xc, yc) in zip(gpu, cpu):  # no decoder at all: equal but for float summation order
        diff = (xg.int() - xc.int()).abs()
        assert torch.equal(yg, yc) and diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_nvjpeg_batches_survive_a_consumer_that_frees_memory_under_load(data):
    """The stream race of decode_jpeg: its outputs are written from nvJPEG's own stream while blocks the caller
    freed may still be read by queued kernels. A consumer that queues long kernels on each batch and drops it must
    see the same pixels as one that waits for the device after every batch."""
    cfg = cfg_for(data, **{"data.batch_size": 4})
    loader = build_loader(cfg, "train", CUDA)
    reference = []
    for x, _ in loader.engine.batches(0):
        torch.cuda.synchronize()
        reference.append(x.cpu())
    checksums = []
    big = torch.randn(2048, 2048, device=CUDA)
    for x, _ in loader.engine.batches(0):
        checksums.append(x.to(torch.int64).sum())  # read on the caller's stream, queued behind the work below
        for _ in range(20):
            big = big @ big.T / 2048  # keeps the stream busy while the engine decodes the next batch
        del x
    got = torch.stack(checksums).cpu()
    assert torch.equal(got, torch.stack([r.to(torch.int64).sum() for r in reference]))


def test_ffcv_batches_keep_their_own_pixels_and_labels_behind_a_slow_step(data):
    """FFCV decodes batch k + 4 into the pinned slot that batch k's copy to the device reads; with a training step
    that keeps the GPU well behind the host, every batch must still hold its own pixels and labels: those the same
    engine gives on the CPU (the same CPU decode, without the copy)."""
    cfg = cfg_for(data, "ffcv", **{"data.batch_size": 4})
    cpu = engine_batches(cfg, "train", "cpu")
    got = []
    for x, y in build_loader(cfg, "train", CUDA).engine.batches(0):
        torch.cuda._sleep(1 << 26)  # a slow step: the host, and FFCV's decode, run several batches ahead of it
        got.append((x.clone(), y.clone()))
    assert len(got) == len(cpu) >= 8  # three times round FFCV's 4 slots
    for k, ((xg, yg), (xc, yc)) in enumerate(zip(got, cpu)):
        assert torch.equal(yg.cpu(), yc) and torch.equal(xg.cpu(), xc), f"batch {k} is not its own"


def test_dali_mixed_decode_matches_the_cpu_engines(data):
    pytest.importorskip("pipelines.dali_engine")  # DALI, imported as the engine does
    cfg = cfg_for(data, "dali")
    gpu, cpu = engine_batches(cfg, "val", CUDA), engine_batches(cfg_for(data), "val", "cpu")
    for (xg, yg), (xc, yc) in zip(gpu, cpu):  # DALI's cubic ROI resize is within a grey level or two of Pillow's
        assert torch.equal(yg, yc) and (xg.float() - xc.float()).abs().mean() < 3.0


def test_batch_augment_on_cuda_equals_the_cpu_to_fp32_tolerance():
    """The same parameters on both devices (a CUDA generator draws other numbers than a CPU one). The CPU blurs only
    the blur branch's samples, the GPU blurs all and selects: both paths are compared."""
    images = torch.randint(0, 256, (16, 40, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    train = BatchAugment(AugConfig(), train=True)
    p = train.draw(16, 0, torch.device("cpu"))
    on = {}
    for device in ("cpu", CUDA):
        x = augment(to_float(images.to(device)), train.ops, p.to(device))
        on[torch.device(device).type] = normalize(x, torch.float32).cpu()
    branch = p["three_augment"].branch
    assert (branch == 2).any() and (branch != 2).any()
    torch.testing.assert_close(on["cuda"], on["cpu"], rtol=1e-5, atol=1e-4)


def test_the_whole_batch_training_augmentation_on_cuda_equals_the_cpu_operations():
    """On a GPU BatchAugment runs the whole batch at once and blurs by select (no CPU slices, no gather): its output
    equals the CPU operations on the parameters it returns."""
    train = BatchAugment(AugConfig(), train=True)
    images = torch.randint(0, 256, (40, 24, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out, p = train(images.to(CUDA), 0)
    q = p.to("cpu")
    assert set(q["three_augment"].branch.tolist()) == {0, 1, 2}
    ref = normalize(augment(to_float(images), train.ops, q), torch.float32)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-4)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_prefetching_loader_gives_exactly_the_batches_of_the_plain_one(data):
    """On CUDA the next batch's augmentation runs on a side stream: the batches must be those of running each step
    on the caller's stream, bit for bit."""
    loader = build_loader(cfg_for(data), "train", CUDA)
    loader.set_epoch(2)
    prefetched = [(x.clone(), y.clone()) for x, y in loader]
    raw = [(i.clone(), y.clone()) for i, y in loader.engine.batches(2)]
    loader.epoch = 2
    for b, (images, labels) in enumerate(raw):
        x, y, _, _ = loader.prepare(b, images, labels)
        assert torch.equal(x, prefetched[b][0]) and torch.equal(y, prefetched[b][1])
        assert x.is_contiguous(memory_format=torch.channels_last)
    # One side stream for every epoch, from the high-priority pool (not shared with the decoders' streams).
    side = loader._side
    epoch = iter(loader)
    next(epoch)
    epoch.close()
    assert loader._side is side and side.priority < 0


class SlowDecode:
    """An engine whose every batch queues a long kernel (a decode) on the stream current where it is advanced, and
    records an event after it."""

    def __init__(self, batches: int):
        self.n, self.decoded = batches, []

    def batches(self, epoch, start=0):
        for b in range(start, self.n):
            torch.cuda._sleep(1 << 28)  # ~0.15 s at 1.8 GHz: far longer than the host takes between two calls
            images = torch.full((2, 8, 8, 3), b, dtype=torch.uint8, device=CUDA)
            done = torch.cuda.Event()
            done.record()
            self.decoded.append(done)
            yield images, torch.full((2,), b, device=CUDA)


def test_the_training_step_does_not_wait_for_the_next_batchs_decode():
    """When the loop gets batch b the loader has already asked the engine for batch b+1; the step on batch b,
    queued on the caller's stream, must not run after that decode: the decode goes to the loader's side stream,
    and the step finishes while it is still running."""
    from pipelines.loader import Loader

    engine = SlowDecode(4)
    loader = Loader(engine, None, None, device=CUDA, seed=0, rank=0)
    for b, (x, y, _, _) in enumerate(loader.iter_with_params()):
        total = x.sum()  # the step, on the caller's stream
        stepped = torch.cuda.Event()
        stepped.record()
        stepped.synchronize()
        assert total.item() == b * x.numel() and (y == b).all()
        if b + 1 < engine.n:
            assert len(engine.decoded) == b + 2
            assert not engine.decoded[b + 1].query(), f"step {b} waited for the decode of batch {b + 1}"


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_training_run_on_cuda(data, tmp_path, amp):
    rows = trainer.train(cfg_for(data, **{"train.amp": amp}), tmp_path, CUDA, quiet=True)
    assert np.isfinite(rows[0]["train_loss"]) and rows[0]["val_acc1"] is not None
    assert rows[0]["max_mem_mb"] > 0
    state = load(tmp_path / "checkpoint-last.pt")
    assert state["scaler"] if amp == "fp16" else not state["scaler"]
    assert json.loads((tmp_path / "run.json").read_text())["amp"] == amp


def test_amp_auto_on_this_gpu(data):
    run = trainer.build(cfg_for(data, **{"train.amp": "auto"}), CUDA)
    native = torch.cuda.get_device_capability(CUDA) >= (8, 0)
    assert run.amp == ("bf16" if native else "fp16") and run.scaler.is_enabled() == (not native)


@pytest.mark.compiles
def test_lamb_on_cuda_matches_the_float64_reference():
    """Eager in float64 and float32, also with GradScaler-scaled gradients (fp16's path: the scale folded into the
    clip divisor), and torch.compile'd in float32 (the training dtype; one compilation per gradient-list length
    the reference's schedule produces)."""
    from .deit3_fast.test_optim import _run_both

    _run_both(steps=20, dtype=torch.float64, device=CUDA, rtol=1e-9, atol=1e-11)
    _run_both(steps=20, dtype=torch.float32, device=CUDA, rtol=1e-4, atol=1e-5)
    _run_both(steps=20, dtype=torch.float32, device=CUDA, rtol=1e-4, atol=1e-5, grad_scale=2.0**16)
    torch._dynamo.reset()  # the compiled step gets its own recompilation budget
    _run_both(steps=20, dtype=torch.float32, device=CUDA, compile=True, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize(
    "compiled", [False, pytest.param(True, marks=pytest.mark.compiles)], ids=["eager", "compiled-lamb"]
)
def test_a_training_step_never_waits_for_the_device(data, compiled, amp):
    """BatchAugment, mixing, forward/backward, LAMB (eager and torch.compile'd, whose scalars used to be
    blocking copies), the schedule and the EMA under torch.cuda.set_sync_debug_mode("error"): any blocking copy or
    read-back in the step raises. fp16 adds the GradScaler, whose inf flag LAMB consumes on the device (torch's
    fallback for other optimisers reads it back before every step). (The engine is outside: nvjpeg synchronises its
    own decode stream by design.)"""
    from deit3_fast.optim import build_optimizer

    torch._dynamo.reset()
    run = trainer.build(cfg_for(data, **{"train.amp": amp, "train.ema_decay": 0.99}), CUDA)
    if compiled:  # only LAMB compiled: the model's compilation would add minutes and no host sync
        run.optimizer = build_optimizer("lamb", run.raw_model, lr=1e-3, weight_decay=0.05, compile=True)
        run.scheduler.optimizer = run.optimizer
    raw = [(i.clone(), y.clone()) for i, y in run.train_loader.engine.batches(0)]
    x, y, _, _ = run.train_loader.prepare(0, *raw[0])
    for i in range(2 * run.accum):  # warm-up: compilation, optimiser state, cached constants
        trainer.train_micro_batch(run, x, y, step=i // run.accum, last_micro=(i + 1) % run.accum == 0, accum=run.accum)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(run.accum):
            x, y, _, _ = run.train_loader.prepare(1, *raw[1])
            torch.manual_seed(i)  # what the loop does per micro-batch for drop-path
            trainer.train_micro_batch(run, x, y, step=2, last_micro=i == run.accum - 1, accum=run.accum)
        run.train_loader.augment(raw[1][0], 0)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_profile_on_cuda(data):
    from deit3_fast.profile import profile

    r = profile(cfg_for(data, **{"train.amp": "auto"}), CUDA, steps=3)
    # An idle GPU: numbers that can be (profile.implausible), so a verdict and an MFU below 100%.
    assert r["measurement_failed"] is None and r["verdict"] in ("input-bound", "compute-bound"), r
    assert 0 < r["mfu"] < 1 and r["peak_tflops"] > r["achieved_tflops"] > 0
    for key in (
        "engine_img_per_s",
        "device_stage_img_per_s",
        "loader_img_per_s",
        "model_img_per_s",
        "end_to_end_img_per_s",
    ):
        assert r[key] > 0, key
    assert r["device"] == torch.cuda.get_device_name(CUDA)
    from pipelines.nvjpeg_engine import gpu_decoder_kind

    assert r["jpeg_decoder"] == gpu_decoder_kind(CUDA)


def test_peak_memory_is_per_run(data, tmp_path):
    """Two runs in one process (as ablate does): the second, a smaller model, reports its own smaller peak."""
    big = trainer.train(
        cfg_for(data, **{"model.name": "deit3_micro", "data.batch_size": 16}), tmp_path / "a", CUDA, quiet=True
    )
    small = trainer.train(cfg_for(data), tmp_path / "b", CUDA, quiet=True)
    assert small[0]["max_mem_mb"] < big[0]["max_mem_mb"]


def test_nccl_group_of_one(monkeypatch, tmp_path):
    from deit3_fast import distributed

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
    device = distributed.join_group("cuda")
    try:
        assert device == CUDA and torch.distributed.get_backend() == "nccl"
        t = torch.ones(4, device=device)
        torch.distributed.all_reduce(t)
        assert t.sum().item() == 4
    finally:
        distributed.shutdown()


@pytest.mark.compiles
def test_device_randaugment_on_cuda_is_the_cpu_op_and_never_waits():
    """Fine-tuning's RandAugment on the GPU: the whole-batch pass equals the CPU's per-op subsets (colour ops
    exactly, warps within a grey level), with no host sync (set_sync_debug_mode), eager and compiled."""
    from pipelines.randaugment import RandAugment

    images = torch.randint(0, 256, (48, 40, 56, 3), generator=torch.Generator().manual_seed(5)).float()
    for compile in (False, True):
        torch._dynamo.reset()
        ra = RandAugment("rand-m9-mstd0.5-inc1", (124, 116, 104), compile=compile)
        p = ra.draw(len(images), torch.Generator(device=CUDA).manual_seed(0))
        ra(images.to(CUDA), p)  # warm-up: compilation, constants
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = ra(images.to(CUDA, non_blocking=True), p)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        q = p.to("cpu")
        ref = ra.apply(images, q, subset=True)
        assert (out.cpu() - ref).abs().max() <= 1 and (out.cpu() != ref).float().mean() < 0.01


@pytest.mark.compiles
def test_a_ramped_finetuning_run_on_cuda(data, tmp_path):
    """Progressive resolution (24 -> 48 px; epoch 1 is 36 px, rounded half to even to 32) with the device
    RandAugment, compiled, on the GPU, 16 per process at 24 px and 4 at 32 (batch_sizes): trains at each size with
    its batch, evaluates at the final one."""
    torch._dynamo.reset()
    ramp = "{start: 24, start_epoch: 0, end_epoch: 2, step: 8, batch_sizes: {24: 16, 32: 4}}"
    rows = trainer.train(
        cfg_for(
            data,
            **{
                "schedule.epochs": 3,
                "train.compile": "true",
                "aug.auto_augment": "rand-m9-mstd0.5-inc1",
                "schedule.resolution": ramp,
            },
        ),
        tmp_path,
        CUDA,
        quiet=True,
    )
    assert [(r["train_img_size"], r["per_process_batch"]) for r in rows] == [(24, 16), (32, 4), (48, 8)]
    assert all(np.isfinite(r["train_loss"]) for r in rows)
    assert rows[-1]["val_acc1"] is not None


def _nvjpeg_engine_for_speed(data, imagenet_sample_path, tmp_path):
    """The real-photo .beton gpu-check brings (the ImageNet sample, max side 256), or one written here."""
    beton = data / "imagenet.beton"
    if not beton.exists():
        from dataset_tools.convert import convert

        beton = tmp_path / "imagenet.beton"
        convert(
            str(imagenet_sample_path()),
            str(beton),
            max_resolution=256,
            jpeg_quality=90,
            workers=os.cpu_count(),
            show_progress=False,
        )
    return beton


def test_nvjpeg_engine_alone_outruns_vit_s_at_224_on_an_h100(data, request, tmp_path):
    """The point of the batched crop and the decode thread: on an H100-class GPU (hardware JPEG engine), the nvjpeg
    engine alone (decode + RandomResizedCrop to 224, batch 256, real photos stored at max side 256) delivers more
    images per second than ViT-S@224 trains alone in bf16 (forward, backward, AdamW step), so it cannot be what an
    end-to-end run waits for. Both timed on the GPU's clock (CUDA events) after a warm-up, best of 3 repeats; the
    numbers are in the message either way."""
    from dataset_tools.shards import open_samples
    from deit3_fast.models import create_model
    from pipelines.crops import CropSpec
    from pipelines.nvjpeg_engine import NvjpegEngine, gpu_decoder_kind

    kind = gpu_decoder_kind(CUDA)
    if torch.cuda.get_device_capability(CUDA) < (9, 0):
        pytest.skip(f"needs an H100-class GPU (sm_90+); this is {torch.cuda.get_device_name(CUDA)}, {kind}")
    beton = _nvjpeg_engine_for_speed(data, lambda: request.getfixturevalue("imagenet_sample"), tmp_path)
    batch = 256
    n = open_samples(beton).num_samples

    class EverySampleFourTimes:  # an epoch long enough to time (the sampler's epoch of the sample is 3 batches)
        def indices(self, epoch):
            return np.random.default_rng(epoch).permutation(np.tile(np.arange(n), 4))

    engine = NvjpegEngine(
        str(beton), EverySampleFourTimes(), batch, CropSpec("rrc", 224), CUDA, workers=4, drop_last=True
    )
    assert len(engine) >= 10

    def timed(step, n: int) -> float:
        """Images per second of n calls of step, on the GPU's clock (the caller's stream waits for each batch)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            step()
        end.record()
        end.synchronize()
        return n * batch / (start.elapsed_time(end) / 1e3)

    def engine_epoch_rate(epoch: int) -> float:
        """A whole epoch, the thread's start and first decode included (nothing decoded ahead before the clock
        starts): a read of each batch on the caller's stream, which waits for the batch's event."""
        it = engine.batches(epoch)
        rate = timed(lambda: next(it)[0].sum(dtype=torch.int64), len(engine))
        it.close()
        return rate

    engine_epoch_rate(0)  # warm-up: nvJPEG's handle, the allocator, numba
    engine_rates = [engine_epoch_rate(e) for e in (1, 2, 3)]

    model = create_model("deit3_small", num_classes=1000, img_size=224).to(CUDA).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 3, 224, 224, device=CUDA).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=CUDA)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    timed(step, 5)  # warm-up: cuBLAS/cuDNN heuristics, the optimiser's state
    model_rates = [timed(step, 10) for _ in range(3)]
    msg = (
        f"{torch.cuda.get_device_name(CUDA)} ({kind}): nvjpeg engine alone {max(engine_rates):,.0f} img/s "
        f"(repeats {[round(r) for r in engine_rates]}), ViT-S@224 bf16 model alone {max(model_rates):,.0f} img/s "
        f"(repeats {[round(r) for r in model_rates]}), batch {batch}"
    )
    print(msg)  # in gpu-check's log even when it passes
    assert max(engine_rates) > max(model_rates), msg

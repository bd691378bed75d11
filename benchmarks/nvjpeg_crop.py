"""The nvjpeg engine's GPU path run with the CPU as its device: how many torch ops one batch launches, and its host
time, at a few batch sizes (issue 27). On a GPU every counted op is at least one kernel launch (views excluded: they
launch none), so the count is what the training thread's host time and the launch queue scale with.

Real photos: the shared ImageNet sample converted at max side 256 (the recipe's storage), RandomResizedCrop at 224.

With --parity N, instead: the GPU path on --device against the CPU path (libjpeg-turbo and the CPU resampler) over
the first N batches of an epoch, same samples and crop boxes: the pixel differences. On a GPU that is nvJPEG's
decode against libjpeg-turbo's (the crops are equal but for summation order, tests/pipelines/test_loader.py); run with
the CPU as the device it is the batched crop's summation order alone.

    python benchmarks/nvjpeg_crop.py [--batch-sizes 32 256] [--crop rrc] [--repeats 3]
    python benchmarks/nvjpeg_crop.py --beton .gpu-check/data/imagenet.beton --device cuda --parity 4 --json p.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from contextlib import closing
from itertools import islice
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import unpack_imagenet_sample  # noqa: E402


class CountOps(TorchDispatchMode):
    """Counts the aten/torchvision ops dispatched inside the block, views excluded (no kernel behind them)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def parity(beton: str, batch: int, crop, device: torch.device, batches: int) -> dict:
    """Pixel differences between the GPU path on `device` and the CPU path, over the epoch's first `batches`."""
    from dataset_tools.shards import open_samples
    from pipelines.nvjpeg_engine import NvjpegEngine, gpu_decoder_kind
    from pipelines.sampler import EpochOrder

    order = EpochOrder(open_samples(beton).num_samples, train=True)
    gpu_path = NvjpegEngine(beton, order, batch, crop, device, workers=1, drop_last=True)
    cpu_path = NvjpegEngine(beton, order, batch, crop, torch.device("cpu"), workers=2, drop_last=True)
    total, values, over_one, worst, image_means, labels_equal = 0, 0, 0, 0, [], True
    with closing(gpu_path._gpu_batches(0)) as gpu, closing(cpu_path.batches(0)) as cpu:
        for (xg, yg), (xc, yc) in islice(zip(gpu, cpu), batches):
            labels_equal &= torch.equal(yg.cpu(), yc)
            diff = (xg.cpu().int() - xc.int()).abs()
            total += int(diff.sum())
            values += diff.numel()
            over_one += int((diff > 1).sum())
            worst = max(worst, int(diff.max()))
            image_means += diff.float().mean(dim=(1, 2, 3)).tolist()
    return {
        "device": str(device),
        "jpeg_decoder": gpu_decoder_kind(device),
        "images": len(image_means),
        "crop": f"{crop.kind}@{crop.size}",
        "labels_equal": labels_equal,
        "mean_abs_diff": total / values,
        "max_image_mean_abs_diff": max(image_means),
        "share_over_1": over_one / values,
        "max_abs_diff": worst,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256])
    p.add_argument("--crop", default="rrc")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--beton", help="a .beton to read (kept); by default the sample is converted into a temp dir")
    p.add_argument("--device", default="cpu", help="where the GPU path runs (the op count: cpu only)")
    p.add_argument("--parity", type=int, default=0, metavar="N", help="measure parity over N batches (see above)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    from dataset_tools.convert import convert
    from pipelines.crops import CropSpec
    from pipelines.nvjpeg_engine import NvjpegEngine
    from pipelines.sampler import EpochOrder

    with tempfile.TemporaryDirectory() as tmp:
        beton = args.beton or f"{tmp}/s.beton"
        if not Path(beton).exists():
            convert(str(unpack_imagenet_sample(Path(tmp))), beton, workers=2, max_resolution=256, show_progress=False)
        out = {}
        for b in args.batch_sizes:
            if args.parity:
                out[b] = parity(beton, b, CropSpec(args.crop, args.size), torch.device(args.device), args.parity)
                print(b, json.dumps(out[b]), flush=True)
                continue
            order = EpochOrder(1000, train=True)
            engine = NvjpegEngine(
                beton, order, b, CropSpec(args.crop, args.size), torch.device("cpu"), workers=1, drop_last=True
            )
            idx, keys = next(engine.index_batches(0))
            engine._gpu_batch(idx, keys)  # warm-up (numba, allocator)
            with CountOps() as c:
                engine._gpu_batch(idx, keys)
            decode = c.ops["image.decode_jpeg"] + c.ops["image.decode_jpegs"]  # torchvision's decoder, by device
            whole, dec = [], []
            for _ in range(args.repeats):  # best of `repeats`: the dev box's 2 cores are shared
                t0 = time.perf_counter()
                engine._gpu_batch(idx, keys)
                t1 = time.perf_counter()
                engine._decode_on_gpu(idx, [engine._bytes(i) for i in idx])
                whole.append(t1 - t0)
                dec.append(time.perf_counter() - t1)
            out[b] = {
                "ops": sum(c.ops.values()) - decode,
                "decode_ops": decode,
                "batch_ms": 1e3 * min(whole),
                "decode_ms": 1e3 * min(dec),
                "crop_ms": 1e3 * (min(whole) - min(dec)),
                "ops_by_name": dict(c.ops),
            }
            print(b, json.dumps(out[b]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

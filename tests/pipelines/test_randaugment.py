"""The device RandAugment against timm's PIL RandAugment: every op, the composition, the random draws, the wiring.

Tolerances (stated once): the colour ops (lookup tables and blends) are PIL's integer results exactly; the
geometric ops (rotate, shear, translate: PIL's bicubic, a = -1) are at most one grey level off PIL, on a small
fraction of pixels (float32 coordinates against PIL's doubles), PSNR >= 50 dB.
"""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from dataset_tools.synthetic import class_image
from pipelines.augment import BatchAugment, normalize, to_float
from pipelines.config import AugConfig
from pipelines.pixels import flip
from pipelines.randaugment import SUPPORTED, WARP_OPS, RandAugment, RandAugmentError, RandAugParams

FILL = (124, 116, 104)  # timm: the ImageNet mean, rounded to 0..255
POLICY = "rand-m9-mstd0.5-inc1"


@pytest.fixture(scope="module")
def images():
    """Eight 72x88 (HxW, not square: warps must use the right axis) textured RGB images with sharp edges."""
    rng = np.random.default_rng(0)
    return np.stack([np.array(class_image(k, 8, rng, (88, 72))) for k in range(8)])


def timm_op(name: str, magnitude: float, negate: bool, translate_const: int = 100):
    """timm's op as the official fine-tuning builds it (bicubic, mean fill), at a fixed magnitude and sign."""
    from timm.data import auto_augment as A

    op = A.AugmentOp(
        name,
        prob=1.0,
        magnitude=magnitude,
        hparams={"translate_const": translate_const, "img_mean": FILL, "interpolation": Image.BICUBIC},
    )

    def run(img: np.ndarray) -> np.ndarray:
        state = random.random
        random.random = (lambda: 0.9) if negate else (lambda: 0.1)  # timm negates when random() > 0.5
        try:
            return np.asarray(op(Image.fromarray(img)))
        except ValueError:  # Pillow 13 refuses posterize to 0 bits; timm's old meaning (and ours) is black
            return np.zeros_like(img)
        finally:
            random.random = state

    return run


def ours(name: str, x: torch.Tensor, magnitude: float, negate: bool, subset: bool = False) -> np.ndarray:
    ra = RandAugment(POLICY, FILL)
    ra.names = [name]  # a one-op policy: every sample draws `name`
    b = len(x)
    out = ra.layer(
        x,
        torch.zeros(b, dtype=torch.long),
        torch.ones(b, dtype=torch.bool),
        torch.full((b,), float(magnitude)),
        torch.full((b,), negate),
        subset,
    )
    return out.numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_each_op_is_timms_pil_op(images, name):
    x = to_float(torch.from_numpy(images))
    for magnitude in (0.0, 2.7, 9.0, 10.0):
        for negate in (False, True):
            ref = np.stack([timm_op(name, magnitude, negate)(im) for im in images])
            got = ours(name, x, magnitude, negate)
            diff = np.abs(got - ref)
            where = f"{name} m={magnitude} negate={negate}"
            if name in WARP_OPS:
                assert diff.max() <= 1 and psnr(got, ref) >= 50, where
            else:
                assert diff.max() == 0, where


def test_the_cpu_subset_path_is_the_whole_batch_path(images):
    """On a CPU the blend and the warp run only on their samples; elsewhere on all, selected: the same pixels."""
    ra = RandAugment(POLICY, FILL)
    x = to_float(torch.from_numpy(images))
    p = ra.draw(len(x), torch.Generator().manual_seed(3))
    p.apply[:] = True
    assert torch.equal(ra.apply(x, p, subset=True), ra.apply(x, p, subset=False))


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize"])
def test_the_histogram_ops_count_pixels_in_integers(images, name):
    """The per-sample histogram behind AutoContrast and Equalize is counted in integers (narrower atomic adds on a GPU
    than float64's), every accumulating op of the pass on an integer tensor; the tables are still PIL's exactly."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Accumulations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            op = func.overloadpacket.__name__
            if "scatter_add" in op or "index_add" in op or "scatter_reduce" in op or "histc" in op:
                self.dtypes.append(args[0].dtype)
            elif op.startswith("index_put") and (kwargs.get("accumulate") or (len(args) > 3 and args[3])):
                self.dtypes.append(args[0].dtype)
            return func(*args, **kwargs)

    x = to_float(torch.from_numpy(images))
    spy = Accumulations()
    with spy:
        got = ours(name, x, 9.0, False)
    assert spy.dtypes and not any(d.is_floating_point for d in spy.dtypes), spy.dtypes
    assert np.array_equal(got, np.stack([timm_op(name, 9.0, False)(img) for img in images]))


def test_a_batch_is_each_samples_own_timm_ops_in_order(images):
    """Two layers, each sample with its own ops, magnitudes, signs and skips: sample by sample, timm's ops applied
    in that order give the same image (exactly where no warp is involved)."""
    ra = RandAugment(POLICY, FILL, translate_const=40)
    x = to_float(torch.from_numpy(np.concatenate([images, images[::-1]])))
    for seed in range(3):
        p = ra.draw(len(x), torch.Generator().manual_seed(seed))
        got = ra(x, p).numpy()
        for i, img in enumerate(x.numpy().astype(np.uint8)):
            warped = False
            for layer in range(ra.layers):
                if bool(p.apply[layer, i]):
                    name = ra.names[int(p.op[layer, i])]
                    img = timm_op(name, float(p.magnitude[layer, i]), bool(p.negate[layer, i]), 40)(img)
                    warped |= name in WARP_OPS
            if warped:
                assert psnr(got[i], img) >= 40
            else:
                np.testing.assert_array_equal(got[i], img)


def test_op_magnitude_and_sign_frequencies():
    """timm's draws: ops uniform with replacement, each applied with p 0.5, magnitude N(9, 0.5) clipped to [0, 10],
    sign +-1 with p 1/2."""
    ra = RandAugment(POLICY, FILL)
    n = 40000
    p = ra.draw(n, torch.Generator().manual_seed(0))
    assert p.op.shape == (2, n)
    counts = torch.bincount(p.op.flatten(), minlength=15).double()
    expected = 2 * n / 15
    assert ((counts - expected).abs() < 5 * expected**0.5).all()  # 5 sigma
    assert abs(p.apply.double().mean() - 0.5) < 0.01 and abs(p.negate.double().mean() - 0.5) < 0.01
    m = p.magnitude.double()
    ref = np.clip(np.random.default_rng(0).normal(9, 0.5, 10**6), 0, 10)
    assert abs(m.mean() - ref.mean()) < 0.01 and abs(m.std() - ref.std()) < 0.01 and m.max() <= 10
    # mstd0 is the fixed magnitude; mstd101 (> 100) is timm's uniform [0, m].
    assert (RandAugment("rand-m7-mstd0", FILL).draw(100, torch.Generator()).magnitude == 7).all()
    pu = RandAugment("rand-m8-mstd101", FILL).draw(n, torch.Generator().manual_seed(1))
    u = pu.magnitude.double()
    assert 0 <= u.min() and u.max() <= 8 and abs(u.mean() - 4) < 0.05
    # ... drawn independently of the sign (a shared uniform once made every large rotation turn the same way)
    big = u > 4
    assert abs(pu.negate[big].double().mean() - 0.5) < 0.02 and abs(pu.negate[~big].double().mean() - 0.5) < 0.02
    # n3: three layers; p0.2: each applies with p 0.2.
    p3 = RandAugment("rand-m9-n3-p0.2", FILL).draw(n, torch.Generator().manual_seed(2))
    assert p3.op.shape == (3, n) and abs(p3.apply.double().mean() - 0.2) < 0.01


def test_weighted_policies_draw_without_replacement():
    """timm's weighted choice (t0) draws without replacement: the two ops of a sample differ, in proportion."""
    ra = RandAugment("rand-m9-tweights", FILL)
    p = ra.draw(20000, torch.Generator().manual_seed(0))
    assert (p.op[0] != p.op[1]).all()
    first = torch.bincount(p.op[0], minlength=len(ra.names)).double() / 20000
    w = ra.weights / ra.weights.sum()
    assert (first - w.float()).abs().max() < 0.02


def test_policies_the_device_cannot_run_are_refused_with_the_reason():
    with pytest.raises(RandAugmentError, match="rand-"):
        RandAugment("augmix-m5-w4", FILL)
    with pytest.raises(RandAugmentError, match="not a policy timm parses"):
        RandAugment("rand-m9-q3", FILL)
    with pytest.raises(RandAugmentError, match="GaussianBlur"):  # timm's 3-Augment set, not a RandAugment op here
        RandAugment("rand-m9-t3a", FILL)


def test_batch_augment_runs_randaugment_after_the_flip(images):
    """Fine-tuning's BatchAugment: flip -> RandAugment (the drawn ops, visible in the returned parameters) ->
    normalise, nothing else when 3-Augment and jitter are off (the fine-tuning recipes)."""
    aug = AugConfig(img_size=72, three_augment=False, color_jitter=0.0, auto_augment=POLICY)
    augment = BatchAugment(aug, train=True)
    ra = augment.op("randaugment")
    u8 = torch.from_numpy(np.concatenate([images] * 4))
    out, p = augment(u8, 4)
    flips, rp = p["flip"].flip, p["randaugment"]
    assert list(p) == ["flip", "randaugment"] and rp.op.shape == (2, len(u8)) and flips.any() and (~flips).any()
    warps = [ra.names.index(n) for n in WARP_OPS if n in ra.names]
    warped = (torch.isin(rp.op, torch.tensor(warps)) & rp.apply).any(0)
    assert (warped & flips).sum() >= 3  # where the order shows: a flipped sample's shear is not the flip's
    x = to_float(u8)
    ref = torch.cat(
        [ra(flip(x[s : s + 16], flips[s : s + 16]), rp.slice(slice(s, s + 16))) for s in range(0, len(x), 16)]
    )
    torch.testing.assert_close(out, normalize(ref, torch.float32), atol=1e-6, rtol=0)
    assert not torch.equal(
        ref,
        torch.cat(
            [flip(ra(x[s : s + 16], rp.slice(slice(s, s + 16))), flips[s : s + 16]) for s in range(0, len(x), 16)]
        ),
    )
    # Without auto_augment the flip draws exactly what it drew with it (each op has its own stream).
    plain, q = BatchAugment(AugConfig(img_size=72), train=True)(u8, 4)
    assert "randaugment" not in q and torch.equal(q["flip"].flip, flips)


@pytest.mark.slow
def test_device_randaugment_traces_as_one_graph(images):
    """torch.compile-able: the whole-batch pass (what a GPU runs) has no graph break (no host sync, no
    data-dependent shapes)."""
    import torch._dynamo

    ra = RandAugment(POLICY, FILL)
    x = to_float(torch.from_numpy(images))
    p = ra.draw(len(x), torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(ra.apply)(x, p, False)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_preview_captions_name_each_samples_ops():
    from pipelines.preview import captions

    ra = RandAugment(POLICY, FILL)
    names = ra.names
    p = RandAugParams(
        op=torch.tensor([[names.index("Rotate"), 0], [names.index("Equalize"), 0]]),
        apply=torch.tensor([[True, False], [True, False]]),
        magnitude=torch.tensor([[9.3, 9.0], [8.0, 9.0]]),
        negate=torch.tensor([[True, False], [False, False]]),
    )
    from pipelines.augment import Flip, FlipParams
    from pipelines.ops import AugParams

    params = AugParams(flip=FlipParams(torch.tensor([True, False])), randaugment=p)
    texts = captions(params, torch.tensor([3, 5]), [Flip(0.5), ra])
    assert texts[0].startswith("+flip Rotate -9.3, Equalize") and texts[0].endswith("y=3")
    assert texts[1].startswith("no op")


def test_preview_of_a_finetuning_recipe_shows_the_ops(data, tmp_path):
    """`deit3-fast preview` on a fine-tuning recipe: the grid is written and the ops it drew are reported."""
    import subprocess
    import sys

    from ..conftest import REPO

    out = tmp_path / "p.png"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "deit3_fast",
            "preview",
            "--cfg",
            "vit_b_in1k_ft224",
            "--data-train",
            str(data / "train.beton"),
            "--out",
            str(out),
            "--n",
            "8",
            "--set",
            "model.num_classes=4",
            "--set",
            "aug.img_size=64",
            "--set",
            "data.workers=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "RandAugment ops {" in r.stdout and ", mix " in r.stdout
    assert Image.open(out).size[0] == 8 * 128  # 64 px images, enlarged 2x for their captions
